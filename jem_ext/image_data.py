"""The in-memory dataset type every reader returns, and the split rules they share.

:class:`ImageData` holds images in ``[-1, 1]`` with their labels; :class:`DataError` says what a
dataset lacked. Real-data splits are stratified and seeded with a fixed seed, never the run's.
:func:`data_fingerprint` gathers the splits' digests into the fingerprint a run records, and
:func:`fingerprint_changes` says how data differ from a recorded one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_SPLIT_SEED = 1234  # fixed: real-data splits never depend on the run's seed
_MAX_VAL = 5000


class DataError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message says what was expected."""


@dataclass
class ImageData:
    """An in-memory labelled dataset.

    Attributes:
        x: float32 ``[N, C, H, W]`` images in ``[-1, 1]``, or ``[N, 2]`` points for toy sets.
        y: int64 ``[N]`` labels in ``0 .. num_classes - 1``.
        num_classes: number of classes.
        name: dataset name (as given to :func:`load_dataset`).
        classes: class names, ``classes[k]`` is the name of label ``k``.
        digest: ``"sha256:<hex>"`` identifying this split's samples (see
            :func:`jem_ext.data.data_fingerprint`), or None when unknown.
    """

    x: Tensor
    y: Tensor
    num_classes: int
    name: str
    classes: list[str]
    digest: str | None = None

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"{self.name}: expected as many labels as samples, "
                f"got {self.y.shape[0]} labels for {self.x.shape[0]} samples"
            )
        if len(self.classes) != self.num_classes:
            raise DataError(
                f"{self.name}: expected {self.num_classes} class names, got {len(self.classes)}"
            )
        if self.y.device.type == "cpu":
            # Checked here, on the host, where it costs nothing: on a GPU the energy kernels
            # can only report a bad label later (see jem_ext.ops.raise_label_errors).
            bad = ((self.y < 0) | (self.y >= self.num_classes)).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise DataError(
                    f"{self.name}: expected labels in 0 .. {self.num_classes - 1}, "
                    f"got y[{i}] = {int(self.y[i])}"
                )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(3, 32, 32)`` or ``(2,)``."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def _stratified_holdout(y: np.ndarray, n_holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``arange(len(y))`` into sorted ``(rest, holdout)`` with exactly ``n_holdout`` held out.

    Each class contributes in proportion to its size (largest-remainder rounding).
    """
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * (n_holdout / len(y))
    take = np.floor(quota).astype(np.int64)
    short = n_holdout - int(take.sum())
    take[np.argsort(take - quota, kind="stable")[:short]] += 1
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    is_held = np.zeros(len(y), dtype=bool)
    is_held[np.concatenate(held)] = True
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def _split_fractions(y: np.ndarray, split: str, val_frac: float, test_frac: float) -> np.ndarray:
    """Indices of ``split`` in a fixed stratified train/val/test split of one labelled pool."""
    n = len(y)
    rest, test = _stratified_holdout(y, round(n * test_frac), _SPLIT_SEED)
    if split == "test":
        return test
    train, val = _stratified_holdout(y[rest], round(n * val_frac), _SPLIT_SEED + 1)
    return rest[val] if split == "val" else rest[train]


def _split_heldout_val(y: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` ("train" or "val") in an official training set with held-out val."""
    train, val = _stratified_holdout(y, min(_MAX_VAL, len(y) // 10), _SPLIT_SEED)
    return val if split == "val" else train


def _to_unit_range(images: np.ndarray) -> Tensor:
    """uint8 ``[N, C, H, W]`` (0..255) -> float32 tensor in ``[-1, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)


def _digest(parts: Iterable[bytes | str]) -> str:
    """``"sha256:<hex>"`` over ``parts`` (each length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        h.update(b"%d:" % len(data))
        h.update(data)
    return "sha256:" + h.hexdigest()


# The version of the fingerprint's rules: fingerprints of other versions are not compared.
FINGERPRINT_SCHEME = 1


def data_fingerprint(datasets: dict[str, ImageData]) -> dict[str, object]:
    """What identifies a run's data: the data set, its classes and sample shape, and per split
    the number of samples and :attr:`ImageData.digest`.

    The digests hash content, and cost little at every start: an image folder's cover each
    file's path, label and the SHA-256 of its bytes (read anyway to decode it); CIFAR's and
    SVHN's the split's uint8 pixels and labels (about 0.15 s for 50000 CIFAR images); the
    built-in digits and the toy sets are hashed whole (a few kilobytes). Modification times
    are left out: copying a folder changes them, not the data. Adding, removing, renaming,
    moving or rewriting an image changes the fingerprint.
    """
    first = next(iter(datasets.values()))
    return {
        "scheme": FINGERPRINT_SCHEME,
        "dataset": first.name,
        "num_classes": first.num_classes,
        "shape": list(first.shape),
        "splits": {k: {"n": len(d), "digest": d.digest} for k, d in datasets.items()},
    }


def fingerprint_changes(recorded: object, current: dict[str, object]) -> list[str]:
    """How ``current`` (from :func:`data_fingerprint`) differs from a ``recorded`` one, as short
    phrases (empty: the same data, or nothing comparable recorded). Only the splits present in
    both are compared."""
    if not isinstance(recorded, dict) or recorded.get("scheme") != current.get("scheme"):
        return []
    changes = []
    if recorded.get("dataset") != current["dataset"]:
        return [f"data set {current['dataset']!r}, trained on {recorded.get('dataset')!r}"]
    if recorded.get("num_classes") != current["num_classes"]:
        changes.append(
            f"the data now has {current['num_classes']} classes, trained on "
            f"{recorded.get('num_classes')}"
        )
    if recorded.get("shape") != current["shape"]:
        changes.append(
            f"samples now have shape {tuple(current['shape'])}, trained on "
            f"{tuple(recorded.get('shape') or ())}"
        )
    old_splits = recorded.get("splits") if isinstance(recorded.get("splits"), dict) else {}
    for split, now in current["splits"].items():  # type: ignore[union-attr]
        was = old_splits.get(split)
        if not isinstance(was, dict):
            continue
        if was.get("n") != now["n"]:
            changes.append(f"the {split} split now has {now['n']} samples, was {was.get('n')}")
        elif was.get("digest") != now["digest"] and None not in (was.get("digest"), now["digest"]):
            changes.append(f"the {split} split holds other samples or labels")
    return changes
