"""Claiming a run folder, so that one training process at a time writes it.

A fresh run creates its folder (or takes an existing empty one) and a resumed run takes its
existing folder; either way the process then holds an exclusive ``flock`` on ``RUN/.lock``
until it ends. A second process that wants the same folder is refused at once, before any
slow work. The lock dies with its process, so a killed run can still be resumed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from .config import ConfigError

LOCK_NAME = ".lock"


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
        return cls(path, _lock(path, flag), created=False)

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
