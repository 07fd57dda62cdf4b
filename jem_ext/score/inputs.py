"""The scorer's inputs: the files named by ``--inputs``, read as the training data are, and the
scorer's error type."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data_files import IMAGE_EXTS
from ..trained import InputError, Trained

__all__ = ["PROG", "ScoreError", "list_inputs", "read_inputs"]

PROG = "jem_ext.score"


class ScoreError(Exception):
    """Bad input to the scorer (one line on stderr, exit status 2)."""


_INPUT_EXTS = (*IMAGE_EXTS, ".npy")


def list_inputs(paths: Sequence[str]) -> list[Path]:
    """The input files: each file as given, each folder's .png/.jpg/.jpeg/.npy files found
    recursively (sorted; hidden files and folders skipped, as the training reader does)."""
    out: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(
                f
                for f in path.rglob("*")
                if f.is_file()
                and f.suffix.lower() in _INPUT_EXTS
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                raise ScoreError(f"--inputs {path}: a folder without .png/.jpg/.jpeg/.npy files")
            out += found
        elif path.is_file():
            if path.suffix.lower() not in _INPUT_EXTS:
                raise ScoreError(
                    f"--inputs {path}: expected a .png/.jpg/.jpeg image, a .npy array or a folder"
                )
            out.append(path)
        else:
            raise ScoreError(f"--inputs {path}: no such file or folder")
    return out


def read_inputs(
    trained: Trained, files: list[Path], progress: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, x [n, *in_shape])`` per readable file (``PATH[i]`` names an array's rows);
    an unreadable or unfitting file gets one ``skipped`` line on stderr."""
    with tqdm(total=len(files), desc="reading", unit="file", disable=not progress) as bar:
        for f in files:
            try:
                if f.suffix.lower() == ".npy":
                    try:
                        array = np.load(f, allow_pickle=False)
                    except (OSError, ValueError, EOFError) as err:
                        raise InputError(f"{f}: not a readable .npy array ({err})") from None
                    yield str(f), trained.from_array(array, str(f))
                else:
                    yield str(f), trained.read_image(f)[None]
            except InputError as err:
                tqdm.write(f"{PROG}: skipped {err}", file=sys.stderr)
            bar.update(1)
