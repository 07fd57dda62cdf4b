"""Atomic file writes, shared by every writer in jem_ext.

Checkpoints, run files (config.json, summary.json, metrics.jsonl), reports and PNGs all go
through :func:`atomic_path`: the content is written to a temporary file beside the target,
flushed to disk, then renamed over it, so a crash or a kill leaves the old file or the new one,
never half of one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The name atomic_path gives its temporary files: .<name>.<32 hex digits>.tmp[<suffix>]
_TEMPORARY = re.compile(r"^\.(.+)\.[0-9a-f]{32}\.tmp(\.[^.]*)?$")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to.

    The temporary file sits in ``path``'s folder (created if needed) and keeps its extension,
    so writers that infer the format from the name (Pillow, matplotlib) work. When the block
    ends normally the file is fsync'ed and renamed over ``path`` (then the folder is fsync'ed,
    best effort); when it raises, the temporary file is removed. It is created with the usual
    umask permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not supported on every file system
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as :func:`atomic_path`'s temporary files are."""
    return bool(_TEMPORARY.match(Path(path).name))


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (and staging folders, named alike) that writers left under
    ``folder``, at any depth, when their process was killed outright (SIGKILL, a power cut);
    returns what was removed.

    Call it only on a folder no other process is writing (a claimed run folder).
    """
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in list(dirs):
            if _TEMPORARY.match(name):  # a staging folder (an evaluation report's)
                dirs.remove(name)
                shutil.rmtree(Path(root) / name, ignore_errors=True)
                removed.append(Path(root) / name)
        for name in files:
            if _TEMPORARY.match(name):
                path = Path(root) / name
                try:
                    path.unlink()
                except OSError:
                    continue
                removed.append(path)
    return removed


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that fails with the file system's own ``OSError``.

    torch's writer turns a failed write (a full disk, a read-only file system) into a
    RuntimeError such as ``unexpected pos 691456 vs 691320``; here the file is written through
    Python, and the OSError of the failed write is raised instead.
    """
    import torch  # here, so that the module stays light for writers without torch

    errors: list[OSError] = []

    class _Writer:
        def __init__(self, f: Any) -> None:
            self._f = f

        def write(self, data: Any) -> int:
            try:
                return self._f.write(data)
            except OSError as err:
                errors.append(err)
                raise

        def flush(self) -> None:
            self._f.flush()

    try:
        with open(path, "wb") as f:
            torch.save(obj, _Writer(f))
    except RuntimeError:
        if errors:
            raise with_filename(errors[0], path) from None
        raise
    except OSError as err:
        raise with_filename(err, path) from None


def with_filename(err: OSError, path: str | os.PathLike) -> OSError:
    """``err``, naming ``path`` when it names no file (a failed ``write`` names none)."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror or str(err), os.fspath(path))


# What each errno of a failed write means, in the words of the one-line error.
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}


def write_failure(err: OSError, what: str | os.PathLike | None = None) -> str:
    """One line for an OSError met while writing: the cause in words, and where.

    ``what`` names the file or folder when the error does not (the error's own file name wins).
    """
    cause = _WRITE_ERRORS.get(err.errno or -1) or (err.strerror or str(err) or type(err).__name__)
    where = err.filename if err.filename is not None else what
    match = None if where is None else _TEMPORARY.match(Path(where).name)
    if match:  # name the file the temporary was to become
        where = Path(where).with_name(match.group(1))
    return f"cannot write {where}: {cause}" if where is not None else f"cannot write: {cause}"
