"""Datasets, splits, augmentation, batching and image grids for JEM.

Everything is held in memory as one float32 tensor: images are ``[N, C, H, W]`` scaled to
``[-1, 1]`` (as in the JEM reference code), toy sets are ``[N, 2]`` points inside ``[-1, 1]``.
Nothing is ever downloaded; datasets that are not bundled with scikit-learn must already be on
disk under ``root``.

Datasets (``load_dataset(name, root, split)``, ``split`` in ``"train"``, ``"val"``, ``"test"``)
------------------------------------------------------------------------------------------------
``"digits"``
    scikit-learn's bundled 8x8 grey digits (1797 images, no ``root``), shape ``[N, 1, 8, 8]``.
    Fixed stratified 70/10/20 train/val/test split (1258/180/359 images).

``"cifar10"`` / ``"cifar100"``
    The official *python version* pickles, either in ``root`` itself or in its extracted
    sub-folder::

        root/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
        root/cifar-100-python/train, test, meta

    Each batch is a pickled dict with ``data`` (uint8 ``[N, 3072]``, row-major R, G, B planes of
    a 32x32 image) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100); the meta file holds
    ``label_names`` / ``fine_label_names``. Keys may be ``str`` or ``bytes``. Only numpy arrays
    and plain containers are unpickled; any other object is refused.

``"svhn"``
    The cropped-digit MATLAB files ``root/train_32x32.mat`` and ``root/test_32x32.mat`` with
    ``X`` uint8 ``[32, 32, 3, N]`` and ``y`` ``[N, 1]`` in ``1..10`` (10 means digit 0, mapped
    to 0). ``extra_32x32.mat`` is not used.

``"folder"``
    Any image folder with one sub-folder per class holding ``.png`` / ``.jpg`` / ``.jpeg`` files
    (class names are the sorted sub-folder names; hidden folders and loose files are ignored)::

        root/<class>/<image>            split deterministically, stratified 80/10/10
        root/train/<class>/<image>      or an explicit split: test = root/test,
        root/test/<class>/<image>       val held out of train

    All images must share one size; they are loaded as grey (1 channel) when every image is
    grey and as RGB otherwise.

``"rings"``, ``"moons"``, ``"gmm"``
    2-D toy sets with 3, 2 and 8 classes: 2000/500/500 points for train/val/test, drawn from
    ``seed``.

Held-out validation sets (CIFAR, SVHN, folder with train/test) are a fixed, stratified
``min(5000, N // 10)`` images of the official training set. All splits of real data are
independent of ``seed``, so every run sees the same train/val/test images.

Every problem with the data (missing or empty folder, wrong format, corrupt file, mismatched
shapes, unknown dataset) raises :class:`DataError` with one message saying what was expected.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ._io import atomic_path

__all__ = [
    "DataError",
    "ImageData",
    "DATASETS",
    "FILE_DATASETS",
    "TOY_DATASETS",
    "load_dataset",
    "num_batches",
    "labeled_mask",
    "Augment",
    "default_augment",
    "batches",
    "save_image_grid",
]

SPLITS = ("train", "val", "test")
DATASETS = ("digits", "cifar10", "cifar100", "svhn", "folder", "rings", "moons", "gmm")
TOY_DATASETS = ("rings", "moons", "gmm")
# The datasets read from files under a root folder (the others are built in or generated).
FILE_DATASETS = ("cifar10", "cifar100", "svhn", "folder")

_SPLIT_SEED = 1234  # fixed: real-data splits never depend on the run's seed
_MAX_VAL = 5000
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


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
    """

    x: Tensor
    y: Tensor
    num_classes: int
    name: str
    classes: list[str]

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


# ----------------------------------------------------------------------------------------------
# Digits and toy sets
# ----------------------------------------------------------------------------------------------


def _load_digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = _split_fractions(digits.target, split, val_frac=0.1, test_frac=0.2)
    x = torch.from_numpy(digits.data[idx]).float().div_(8.0).sub_(1.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(digits.target[idx]).long()
    return ImageData(x, y, 10, "digits", [str(k) for k in range(10)])


_TOY_SIZES = {"train": (0, 2000), "val": (2000, 2500), "test": (2500, 3000)}


def _load_toy(name: str, split: str, seed: int) -> ImageData:
    n = _TOY_SIZES["test"][1]
    rng = np.random.default_rng(seed)
    if name == "moons":
        from sklearn.datasets import make_moons

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
    return ImageData(x, y, len(classes), name, classes)


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


def _load_cifar(name: str, root: str | os.PathLike | None, split: str) -> ImageData:
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
    return ImageData(
        _to_unit_range(images_np), torch.from_numpy(labels_np), len(classes), name, classes
    )


# ----------------------------------------------------------------------------------------------
# SVHN (MATLAB files)
# ----------------------------------------------------------------------------------------------


def _load_svhn(root: str | os.PathLike | None, split: str) -> ImageData:
    from scipy.io import loadmat

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
        raise DataError(
            f"svhn: {path}: expected {images.shape[3]} labels, got {labels.shape[0]}"
        )
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
    return ImageData(x, torch.from_numpy(labels), 10, "svhn", [str(k) for k in range(10)])


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------


def _list_class_folder(root: Path) -> dict[str, list[Path]]:
    """Map each class sub-folder of ``root`` to its sorted image files."""
    if not root.is_dir():
        raise DataError(f"image folder {root}: folder does not exist")
    tree: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_EXTS
        )
        if not files:
            raise DataError(
                f"image folder {root}: expected .png/.jpg files in class folder "
                f"'{sub.name}', found none"
            )
        tree[sub.name] = files
    if not tree:
        raise DataError(
            f"image folder {root}: expected one sub-folder per class containing .png/.jpg "
            "files, found none"
        )
    return tree


def _flatten(tree: dict[str, list[Path]], classes: list[str]) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for name, files in tree.items():
        paths += files
        labels += [classes.index(name)] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _probe_image(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and (width, height) of an image, read from its header only."""
    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"image folder: {path} is not a readable PNG/JPEG image ({err})") from err


def _decode_image(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except Exception as err:
        raise DataError(f"image folder: {path} is not a readable PNG/JPEG image ({err})") from err


def _load_folder(root: str | os.PathLike | None, split: str) -> ImageData:
    if root is None:
        raise DataError("folder: expected root=<image folder with one sub-folder per class>")
    base = Path(root)
    explicit = (base / "train").is_dir() and (base / "test").is_dir()
    if explicit:
        train_tree = _list_class_folder(base / "train")
        test_tree = _list_class_folder(base / "test")
        classes = sorted(train_tree)
        unknown = sorted(set(test_tree) - set(train_tree))
        if unknown:
            raise DataError(
                f"image folder {base}: expected the classes of test/ to be among those of "
                f"train/, but test/ also has {unknown}"
            )
        train_paths, train_y = _flatten(train_tree, classes)
        test_paths, test_y = _flatten(test_tree, classes)
        all_paths = train_paths + test_paths
        if split == "test":
            paths, labels = test_paths, test_y
        else:
            idx = _split_heldout_val(train_y, split)
            paths, labels = [train_paths[i] for i in idx], train_y[idx]
    else:
        tree = _list_class_folder(base)
        classes = sorted(tree)
        all_paths, all_y = _flatten(tree, classes)
        idx = _split_fractions(all_y, split, val_frac=0.1, test_frac=0.1)
        paths, labels = [all_paths[i] for i in idx], all_y[idx]

    # Mode and size are checked over every split (headers only) so that all splits agree.
    # A plain loop: for small images Pillow is GIL-bound and threads only add overhead.
    probes = [_probe_image(p) for p in all_paths]
    sizes = {size: path for path, (_, size) in zip(all_paths, probes)}
    if len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise DataError(
            f"image folder {base}: expected all images to share one size, but {p1} is "
            f"{s1[0]}x{s1[1]} and {p2} is {s2[0]}x{s2[1]}"
        )
    mode = "L" if all(m in _GREY_MODES for m, _ in probes) else "RGB"
    width, height = probes[0][1]
    channels = 1 if mode == "L" else 3
    images = np.empty((len(paths), height, width, channels), dtype=np.uint8)
    for i, path in enumerate(paths):
        images[i] = _decode_image(path, mode).reshape(height, width, channels)
    x = _to_unit_range(images.transpose(0, 3, 1, 2))
    return ImageData(x, torch.from_numpy(labels), len(classes), "folder", classes)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def load_dataset(
    name: str, root: str | os.PathLike | None = None, split: str = "train", seed: int = 0
) -> ImageData:
    """Load one split of a dataset into memory.

    Args:
        name: one of :data:`DATASETS` (see the module docstring for the on-disk layouts).
        root: folder holding the files (CIFAR, SVHN, folder); unused for digits and toy sets.
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: only used by the toy sets (rings, moons, gmm) to draw their points; the splits of
            real data are fixed.

    Returns:
        An :class:`ImageData` with ``x`` in ``[-1, 1]``.

    Raises:
        DataError: unknown name or split, missing/corrupt/inconsistent files.
    """
    if split not in SPLITS:
        raise DataError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if name == "digits":
        return _load_digits(split)
    if name in _CIFAR:
        return _load_cifar(name, root, split)
    if name == "svhn":
        return _load_svhn(root, split)
    if name == "folder":
        return _load_folder(root, split)
    if name in TOY_DATASETS:
        return _load_toy(name, split, seed)
    raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def labeled_mask(y: Tensor, labels_per_class: int | None, seed: int = 0) -> Tensor:
    """Choose which training labels a semi-supervised run may use.

    Args:
        y: int64 labels ``[N]``; classes are ``0 .. y.max()``.
        labels_per_class: keep exactly this many randomly chosen labels of each class, or all
            labels when ``None``.
        seed: seed of the random choice.

    Returns:
        Bool tensor ``[N]`` (on ``y``'s device), True where the label is kept.

    Raises:
        DataError: ``labels_per_class`` is below 1 or some class has fewer samples.
    """
    if labels_per_class is None:
        return torch.ones_like(y, dtype=torch.bool)
    if labels_per_class < 1:
        raise DataError(f"labels_per_class: expected None or >= 1, got {labels_per_class}")
    y_cpu = y.detach().cpu()
    counts = torch.bincount(y_cpu)
    if (counts < labels_per_class).any():
        short = {k: int(c) for k, c in enumerate(counts.tolist()) if c < labels_per_class}
        raise DataError(
            f"labels_per_class={labels_per_class}: expected every class to have that many "
            f"samples, but these classes have fewer (class: count): {short}"
        )
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(y_cpu.shape[0], dtype=torch.bool)
    for k in range(counts.shape[0]):
        members = torch.nonzero(y_cpu == k).flatten()
        mask[members[torch.randperm(members.shape[0], generator=gen)[:labels_per_class]]] = True
    return mask.to(y.device)


@dataclass(frozen=True)
class Augment:
    """Batched data augmentation: reflect-pad random crop, horizontal flip, Gaussian noise.

    Args:
        pad: reflect-pad each side by this many pixels, then crop back to the input size at a
            random offset (``0`` disables cropping).
        flip: flip each image left-right with probability 1/2.
        noise_sigma: add ``noise_sigma * N(0, 1)`` noise to every value (JEM uses 0.03).

    Calling it on ``x`` (``[B, C, H, W]``; any shape if ``pad == 0`` and ``flip`` is False)
    returns a new tensor on ``x``'s device. Random numbers come from ``generator`` when given
    (drawn on the generator's device), so results are reproducible.
    """

    pad: int = 4
    flip: bool = True
    noise_sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.pad < 0 or self.noise_sigma < 0:
            raise ValueError(f"Augment: expected pad >= 0 and noise_sigma >= 0, got {self}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        rand_device = generator.device if generator is not None else x.device
        if self.pad > 0 or self.flip:
            if x.dim() != 4:
                raise ValueError(f"Augment: expected images [B, C, H, W], got {list(x.shape)}")
            x = self._crop_and_flip(x, generator, rand_device)
        if self.noise_sigma > 0:
            noise = torch.randn(x.shape, generator=generator, device=rand_device, dtype=x.dtype)
            x = x + self.noise_sigma * noise.to(x.device)
        return x

    def _crop_and_flip(self, x: Tensor, generator: torch.Generator | None, rand_device) -> Tensor:
        b, _, h, w = x.shape
        p = self.pad
        if p > 0:
            x = F.pad(x, (p, p, p, p), mode="reflect")
        top = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=rand_device)
        left = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=rand_device)
        cols = torch.arange(w, device=rand_device).expand(b, w)
        if self.flip:
            flipped = torch.rand(b, generator=generator, device=rand_device) < 0.5
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        rows = (top[:, None] + torch.arange(h, device=rand_device)).to(x.device)
        cols = (left[:, None] + cols).to(x.device)
        batch = torch.arange(b, device=x.device)
        # Advanced indices around a slice: the result is [B, H, W, C].
        out = x[batch[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()


_AUGMENT_PRESETS = {
    "cifar10": Augment(pad=4, flip=True, noise_sigma=0.03),
    "cifar100": Augment(pad=4, flip=True, noise_sigma=0.03),
    "folder": Augment(pad=4, flip=True, noise_sigma=0.03),
    "svhn": Augment(pad=4, flip=False, noise_sigma=0.03),  # digits are not mirror-symmetric
    "digits": Augment(pad=1, flip=False, noise_sigma=0.03),  # 8x8: shift by at most 1 pixel
    "rings": Augment(pad=0, flip=False, noise_sigma=0.0),
    "moons": Augment(pad=0, flip=False, noise_sigma=0.0),
    "gmm": Augment(pad=0, flip=False, noise_sigma=0.0),
}


def default_augment(name: str) -> Augment:
    """The JEM reference augmentation for a dataset name (see ``_AUGMENT_PRESETS``).

    CIFAR and image folders: pad 4 + crop, flip, noise 0.03; SVHN: the same without flip;
    digits: pad 1 + crop, no flip, noise 0.03; toy sets: nothing.
    """
    try:
        return _AUGMENT_PRESETS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}: expected one of {', '.join(_AUGMENT_PRESETS)}"
        ) from None


def batches(
    data: ImageData,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Iterate once over ``data`` in mini-batches (or one process's share of each).

    Args:
        data: the dataset (its tensors may live on any device).
        batch_size: samples per batch (the global batch when ``world_size > 1``).
        shuffle: visit samples in a random order (from ``generator``, a CPU generator).
        generator: source of the shuffling order; the global RNG when None.
        drop_last: skip the final batch when it is smaller than ``batch_size``.
        rank, world_size: yield rows ``rank, rank + world_size, ...`` of every batch; a batch
            with fewer than ``world_size`` rows is skipped (see :func:`num_batches`).

    Yields:
        ``(x, y, idx)``: the batch and the int64 CPU indices of its samples in ``data``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        if world_size > 1:
            if len(idx) < world_size:
                continue
            idx = idx[rank::world_size]
        dev_idx = idx.to(data.x.device)
        yield data.x[dev_idx], data.y[dev_idx.to(data.y.device)], idx


def num_batches(n: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """How many batches :func:`batches` yields for ``n`` samples."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= world_size and not drop_last else 0)


def save_image_grid(
    x: Tensor, path: str | os.PathLike, nrow: int | None = None, border: int = 2
) -> None:
    """Write a batch of images as one PNG grid (atomically, via :func:`jem_ext._io.atomic_path`).

    Args:
        x: ``[B, C, H, W]`` images in ``[-1, 1]`` (clamped), ``C`` 1 (grey) or 3 (RGB).
        path: output file; parent folders are created.
        nrow: images per row (default ``ceil(sqrt(B))``).
        border: white border width in pixels between and around tiles.

    Images smaller than 32 pixels are enlarged by an integer factor (nearest neighbour), so an
    8x8 digit becomes 32x32.
    """
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"save_image_grid: expected [B>0, 1 or 3, H, W], got {list(x.shape)}")
    b, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    img = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    scale = max(1, 32 // max(h, w))
    if scale > 1:
        img = img.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    th, tw = h * scale + border, w * scale + border
    tiles = torch.full((rows * nrow, c, th, tw), 255, dtype=torch.uint8)
    tiles[:b, :, : th - border, : tw - border] = img
    grid = tiles.reshape(rows, nrow, c, th, tw).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(c, rows * th, nrow * tw)
    grid = F.pad(grid, (border, 0, border, 0), value=255)
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if c == 1 else array)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
