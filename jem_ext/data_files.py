"""The readers behind :func:`jem_ext.data.load_dataset`.

One reader per source: scikit-learn's digits, the generated 2-D toy sets, the CIFAR pickles,
the SVHN MATLAB files and class-per-folder image trees (their layouts are described in
:mod:`jem_ext.data`; the folder reader lives in :mod:`jem_ext.image_folder` and is re-exported
here). Each returns an :class:`ImageData` with values in ``[-1, 1]`` or raises
:class:`DataError` saying what was expected (both defined in :mod:`jem_ext.image_data` and
re-exported here).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .image_data import (
    DataError,
    ImageData,
    _digest,
    _split_fractions,
    _split_heldout_val,
    _to_unit_range,
)
from .image_folder import GREY_MODES as GREY_MODES
from .image_folder import IMAGE_EXTS as IMAGE_EXTS
from .image_folder import decode_image as decode_image
from .image_folder import probe_image as probe_image
from .image_folder import read_folder as read_folder


def _content_digest(x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> str:
    """Digest of samples held in memory (built-in and generated sets: small, so hashed whole)."""
    return _digest([x.contiguous().numpy().tobytes(), y.contiguous().numpy().tobytes(), *classes])


def _array_digest(images: np.ndarray, y: np.ndarray, classes: list[str]) -> str:
    """Digest of a split's uint8 pixels and labels as read from the data files (about 0.15 s
    for CIFAR-10's 50000 training images)."""
    return _digest(
        [
            str(images.shape),
            memoryview(np.ascontiguousarray(images)).cast("B"),
            np.ascontiguousarray(y, dtype=np.int64).tobytes(),
            *classes,
        ]
    )


# ----------------------------------------------------------------------------------------------
# Digits and toy sets
# ----------------------------------------------------------------------------------------------


def read_digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits  # here: slow to import, only this reader needs it

    digits = load_digits()
    idx = _split_fractions(digits.target, split, val_frac=0.1, test_frac=0.2)
    x = torch.from_numpy(digits.data[idx]).float().div_(8.0).sub_(1.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(digits.target[idx]).long()
    classes = [str(k) for k in range(10)]
    return ImageData(x, y, 10, "digits", classes, _content_digest(x, y, classes))


_TOY_SIZES = {"train": (0, 2000), "val": (2000, 2500), "test": (2500, 3000)}


def read_toy(name: str, split: str, seed: int) -> ImageData:
    n = _TOY_SIZES["test"][1]
    rng = np.random.default_rng(seed)
    if name == "moons":
        from sklearn.datasets import make_moons  # here: slow to import, only moons need it

        points, labels = make_moons(n_samples=n, noise=0.08, random_state=seed)
        points = (points - np.array([0.5, 0.25])) / 1.7
        classes = ["upper", "lower"]
    else:
        k = 3 if name == "rings" else 8
        labels = rng.permutation(np.arange(n) % k)
        if name == "rings":
            radius = np.array([0.25, 0.55, 0.85])[labels] + 0.04 * rng.standard_normal(n)
            angle = rng.uniform(0.0, 2.0 * np.pi, n)
            points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
            classes = ["inner", "middle", "outer"]
        else:
            angle = 2.0 * np.pi * labels / k
            centres = 0.7 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
            points = centres + 0.07 * rng.standard_normal((n, 2))
            classes = [f"mode{j}" for j in range(k)]
    lo, hi = _TOY_SIZES[split]
    x = torch.from_numpy(np.clip(points[lo:hi], -1.0, 1.0)).float()
    y = torch.from_numpy(np.asarray(labels[lo:hi])).long()
    return ImageData(x, y, len(classes), name, classes, _content_digest(x, y, classes))


# ----------------------------------------------------------------------------------------------
# CIFAR (python pickles)
# ----------------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}

# The globals a pickled dict of numpy arrays may reference (Python 2 or 3, numpy 1 or 2).
CIFAR_NAMES = tuple(_CIFAR)

_PICKLE_ALLOWED = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers (no arbitrary code)."""

    def find_class(self, module: str, name: str):
        canonical = module.replace("numpy._core", "numpy.core", 1)
        if (canonical, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if canonical.startswith("numpy.core") and hasattr(np, "_core"):
            module = canonical.replace("numpy.core", "numpy._core", 1)  # numpy 2 location
        return super().find_class(module, name)


def _load_pickle_dict(path: Path, what: str) -> dict[str, object]:
    """Unpickle a CIFAR file into a dict with ``str`` keys, or raise DataError."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as err:  # corrupt pickles raise many different exception types
        raise DataError(f"{what}: {path} is not a valid CIFAR python pickle ({err})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{what}: {path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _find_root(name: str, root: str | os.PathLike | None, folder: str, needed: list[str]) -> Path:
    """Return ``root/folder`` or ``root``, whichever holds all ``needed`` files."""
    if root is None:
        raise DataError(f"{name}: expected root=<folder holding the dataset files>, got None")
    base = Path(root)
    candidates = [base / folder, base] if folder else [base]
    for cand in candidates:
        if all((cand / f).is_file() for f in needed):
            return cand
    where = next((c for c in candidates if c.is_dir()), None)
    if where is None:
        raise DataError(f"{name}: folder {base} does not exist")
    missing = [f for f in needed if not (where / f).is_file()]
    raise DataError(
        f"{name}: expected files {', '.join(needed)} in {candidates[0]}"
        + (f" or {base}" if folder else "")
        + f"; missing in {where}: {', '.join(missing)}"
    )


def read_cifar(name: str, root: str | os.PathLike | None, split: str) -> ImageData:
    spec = _CIFAR[name]
    files = spec["test"] if split == "test" else spec["train"]
    base = _find_root(name, root, spec["folder"], files + [spec["meta"]])

    meta = _load_pickle_dict(base / spec["meta"], name)
    names = meta.get(spec["names_key"])
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{name}: {base / spec['meta']}: expected a '{spec['names_key']}' list")
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]

    images, labels = [], []
    for fname in files:
        batch = _load_pickle_dict(base / fname, name)
        if "data" not in batch or spec["label_key"] not in batch:
            raise DataError(
                f"{name}: {base / fname}: expected keys 'data' and '{spec['label_key']}', "
                f"found {sorted(map(str, batch))}"
            )
        data = np.asarray(batch["data"])
        lab = np.asarray(batch[spec["label_key"]])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{name}: {base / fname}: expected 'data' as uint8 [N, 3072], "
                f"got {data.dtype} {list(data.shape)}"
            )
        if lab.shape != (data.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
            raise DataError(
                f"{name}: {base / fname}: expected {data.shape[0]} integer labels, "
                f"got {lab.dtype} {list(lab.shape)}"
            )
        if lab.size and (lab.min() < 0 or lab.max() >= len(classes)):
            raise DataError(
                f"{name}: {base / fname}: expected labels in 0..{len(classes) - 1}, "
                f"found {lab.min()}..{lab.max()}"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab.astype(np.int64))
    images_np, labels_np = np.concatenate(images), np.concatenate(labels)
    if split != "test":
        idx = _split_heldout_val(labels_np, split)
        images_np, labels_np = images_np[idx], labels_np[idx]
    digest = _array_digest(images_np, labels_np, classes)
    return ImageData(
        _to_unit_range(images_np), torch.from_numpy(labels_np), len(classes), name, classes, digest
    )


# ----------------------------------------------------------------------------------------------
# SVHN (MATLAB files)
# ----------------------------------------------------------------------------------------------


def read_svhn(root: str | os.PathLike | None, split: str) -> ImageData:
    from scipy.io import loadmat  # here: slow to import, only SVHN needs it

    fname = "test_32x32.mat" if split == "test" else "train_32x32.mat"
    path = _find_root("svhn", root, "", [fname]) / fname
    try:
        mat = loadmat(path)
    except Exception as err:  # scipy raises several types for corrupt files
        raise DataError(f"svhn: {path} is not a readable MATLAB file ({err})") from err
    if "X" not in mat or "y" not in mat:
        raise DataError(f"svhn: {path}: expected variables 'X' and 'y'")
    images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[2] != 3:
        raise DataError(
            f"svhn: {path}: expected 'X' as uint8 [H, W, 3, N], got {images.dtype} "
            f"{list(images.shape)}"
        )
    if labels.shape[0] != images.shape[3]:
        raise DataError(f"svhn: {path}: expected {images.shape[3]} labels, got {labels.shape[0]}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 10):
        raise DataError(
            f"svhn: {path}: expected labels in 1..10 (10 = digit 0), "
            f"found {labels.min()}..{labels.max()}"
        )
    labels[labels == 10] = 0
    if split != "test":
        idx = _split_heldout_val(labels, split)
        images, labels = images[..., idx], labels[idx]
    x = _to_unit_range(images.transpose(3, 2, 0, 1))
    classes = [str(k) for k in range(10)]
    digest = _array_digest(images, labels, classes)
    return ImageData(x, torch.from_numpy(labels), 10, "svhn", classes, digest)
