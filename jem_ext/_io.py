"""Atomic file writes, shared by every writer in jem_ext.

Checkpoints, run files (config.json, summary.json, metrics.jsonl), reports and PNGs all go
through :func:`atomic_path`: the content is written to a temporary file beside the target,
flushed to disk, then renamed over it, so a crash or a kill leaves the old file or the new one,
never half of one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
