"""Claiming a run folder, so that one training process at a time writes it.

A fresh run creates its folder (or takes an existing empty one) and a resumed run takes its
existing folder; either way the process then holds an exclusive ``flock`` on ``RUN/.lock``
until it ends. A second process that wants the same folder is refused at once, before any
slow work. The lock dies with its process, so a killed run can still be resumed. While the run
writes, :class:`IntactFolder` checks before each write that the folder is still the one it
opened.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .._io import is_temporary, remove_temporaries
from .config import ConfigError
from .distributed import SINGLE, Dist, on_main

LOCK_NAME = ".lock"
# What a run writes before its first checkpoint (config.json, then checkpoints/last.pt at once).
_START_FILES = {"config.json", "metrics.jsonl"}
_START_FOLDERS = {"samples", "checkpoints"}


def stopped_before_first_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds only what a run writes before its first checkpoint (a run killed
    then has nothing to resume, and its command, re-run with the same ``--out``, starts afresh).
    Temporary files are not counted."""
    path = Path(path)
    entries = [p for p in path.iterdir() if p.name != LOCK_NAME and not is_temporary(p)]
    if not _written_here(path / "config.json"):
        return False  # an empty folder, or not this run folder
    for p in entries:
        if p.name in _START_FOLDERS and p.is_dir() and not p.is_symlink():
            if any(not is_temporary(q) for q in p.iterdir()):
                return False
        elif not (p.name in _START_FILES and p.is_file()):
            return False
    return True


def _written_here(config: Path) -> bool:
    """Whether ``config`` is the config.json a run wrote for this folder (not a config file
    someone keeps there)."""
    try:
        record = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or "global_batch_size" not in record:
        return False
    try:
        return Path(str(record.get("out"))).resolve() == config.parent.resolve()
    except OSError:
        return False


def _clear_start(path: Path) -> None:
    for name in _START_FILES:
        (path / name).unlink(missing_ok=True)
    for name in _START_FOLDERS:
        if (path / name).is_dir():
            shutil.rmtree(path / name)


class RunFolder:
    """A run folder held by this process (see the module docstring).

    Use :meth:`claim_new` or :meth:`claim_existing`; :meth:`release` gives it back.
    """

    def __init__(self, path: Path, fd: int, created: bool) -> None:
        self.path = path
        self._fd: int | None = fd
        self.created = created

    @classmethod
    def claim_new(cls, path: str | os.PathLike, flag: str = "--out") -> RunFolder:
        """Create ``path`` (or take it if it is an empty folder) and lock it.

        Raises:
            ConfigError: the folder cannot be created, is not empty, or is held by another run.
        """
        path = Path(path)
        created = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path)
            created = True
        except OSError as err:
            if not path.is_dir():
                raise ConfigError(
                    f"{flag} {path}: cannot create the run folder ({err.strerror or err})"
                ) from None
        folder = cls(path, _lock(path, flag), created)
        remove_temporaries(path)
        if not created and stopped_before_first_checkpoint(path):
            _clear_start(path)  # the same command, re-run, starts such a run afresh
        if any(p.name != LOCK_NAME for p in path.iterdir()):
            folder.release()
            raise ConfigError(
                f"{flag} {path}: already exists and is not empty (use --resume to continue a run)"
            )
        return folder

    @classmethod
    def claim_existing(cls, path: str | os.PathLike, flag: str = "--resume") -> RunFolder:
        """Lock an existing run folder (to resume it).

        Raises:
            ConfigError: the folder cannot be written or is held by another run.
        """
        path = Path(path)
        folder = cls(path, _lock(path, flag), created=False)
        remove_temporaries(path)  # left by a run killed outright while it wrote a file
        return folder

    def release(self, remove: bool = False) -> None:
        """Unlock; with ``remove``, delete the folder if this claim created it."""
        if self._fd is None:
            return
        (self.path / LOCK_NAME).unlink(missing_ok=True)
        os.close(self._fd)  # closing the descriptor drops the lock
        self._fd = None
        if remove and self.created:
            shutil.rmtree(self.path, ignore_errors=True)


def _lock(path: Path, flag: str) -> int:
    try:
        fd = os.open(path / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as err:
        raise ConfigError(
            f"{flag} {path}: cannot write in the run folder ({err.strerror or err})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"{flag} {path}: in use by another training process") from None
    return fd


class RunFolderLost(Exception):
    """The run folder was removed or replaced while the run was writing it."""


def folder_identity(path: str | os.PathLike) -> tuple[int, int]:
    """``(device, inode)`` of a folder: a folder removed and created again has another."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def check_intact(path: str | os.PathLike, identity: tuple[int, int]) -> None:
    """Check that the run folder is still the one the run created, with its config.json.

    Writing on would recreate a folder holding only the files written from now on (no config,
    no earlier metrics), which neither ``--resume`` nor ``--config`` could use.

    Raises:
        RunFolderLost: the folder (or its config.json) is gone, or another folder took its place.
    """
    path = Path(path)
    try:
        now = folder_identity(path)
    except OSError:
        now = None
    if now is None or now != identity:
        what = "was removed" if now is None else "was removed and created again"
        raise RunFolderLost(
            f"run folder {path} {what} during the run; stopped without writing to it again "
            "(its config and metrics are gone, so the run cannot be resumed: start it afresh)"
        )
    if not (path / "config.json").is_file():
        raise RunFolderLost(
            f"run folder {path}: config.json was removed during the run; stopped without "
            "writing to the folder again (without it the run cannot be resumed)"
        )


@dataclass(frozen=True)
class IntactFolder:
    """The check made before each write of a run (every process of a job together): the run
    folder ``path`` is still the one opened with ``identity`` (None: not opened yet, nothing
    to check).

    Raises (from :meth:`check`):
        RunFolderLost
    """

    path: Path | None = None
    identity: tuple[int, int] | None = None
    dist: Dist = SINGLE

    def check(self) -> None:
        def check() -> None:
            if self.path is not None and self.identity is not None:
                check_intact(self.path, self.identity)

        on_main(check, self.dist)
