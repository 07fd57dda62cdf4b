"""Datasets, splits, augmentation, batching and image grids for JEM.

Everything is held in memory as one float32 tensor: images are ``[N, C, H, W]`` scaled to
``[-1, 1]`` (as in the JEM reference code), toy sets are ``[N, 2]`` points inside ``[-1, 1]``.
Nothing is ever downloaded; datasets that are not bundled with scikit-learn must already be on
disk under ``root``. A new data set is one :class:`DatasetEntry` in :data:`DATASET_REGISTRY`.

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
    Any image folder with at least two sub-folders (classes) holding ``.png`` / ``.jpg`` /
    ``.jpeg`` files (class names are the sorted sub-folder names; hidden files and folders,
    such as macOS ``._name`` files, other extensions and loose files are ignored)::

        root/<class>/<image>            split deterministically, stratified 80/10/10
        root/train/<class>/<image>      or an explicit split: test = root/test,
        root/test/<class>/<image>       val held out of train

    Every split must hold at least one image. All images must share one size; they are
    loaded as grey (1 channel) when every image is grey (1-bit, 8-bit or 16-bit, with or
    without alpha) and as RGB otherwise (palette, RGB, RGBA, CMYK). Values are scaled by each
    image's bit depth (16-bit grey by 65535); images with transparent pixels, and modes with
    no such scale (32-bit float or integer), are refused.

``"rings"``, ``"moons"``, ``"gmm"``
    2-D toy sets with 3, 2 and 8 classes: 2000/500/500 points for train/val/test, drawn from
    ``seed``.

Held-out validation sets (CIFAR, SVHN, folder with train/test) are a fixed, stratified
``min(5000, N // 10)`` images of the official training set. All splits of real data are
independent of ``seed``, so every run sees the same train/val/test images.

Every problem with the data (missing or empty folder, wrong format, corrupt file, mismatched
shapes, unknown dataset) raises :class:`DataError` with one message saying what was expected.

Each loaded split carries a digest (:attr:`ImageData.digest`), gathered by
:func:`data_fingerprint` into the fingerprint a run records, so that a resume or an evaluation
notices data that changed since training (:func:`fingerprint_changes`).

This module is the data's public face: the augmentation (:mod:`jem_ext.augment`), the
fingerprints (:mod:`jem_ext.image_data`) and the readers (:mod:`jem_ext.data_files`) are
imported from here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ._io import atomic_path
from .augment import Augment, check_augment
from .data_files import (
    CIFAR_NAMES,
    DataError,
    ImageData,
    read_cifar,
    read_digits,
    read_folder,
    read_svhn,
    read_toy,
)
from .image_data import FINGERPRINT_SCHEME as FINGERPRINT_SCHEME
from .image_data import data_fingerprint, fingerprint_changes

__all__ = [
    "DataError",
    "ImageData",
    "DATASETS",
    "DATASET_REGISTRY",
    "DatasetEntry",
    "dataset_entry",
    "file_datasets",
    "FILE_DATASETS",
    "TOY_DATASETS",
    "load_dataset",
    "num_batches",
    "labeled_mask",
    "Augment",
    "default_augment",
    "batches",
    "save_image_grid",
    "check_augment",
    "data_fingerprint",
    "fingerprint_changes",
]

SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def load_dataset(
    name: str, root: str | os.PathLike | None = None, split: str = "train", seed: int = 0
) -> ImageData:
    """Load one split of a dataset into memory.

    Args:
        name: a key of :data:`DATASET_REGISTRY` (see the module docstring for the on-disk
            layouts).
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
    return dataset_entry(name).reader(name, root, split, seed)


def dataset_entry(name: str) -> DatasetEntry:
    """The registered entry of a dataset name (raises DataError naming the choices)."""
    try:
        return DATASET_REGISTRY[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}: expected one of {', '.join(DATASET_REGISTRY)}"
        ) from None


def file_datasets() -> tuple[str, ...]:
    """Names of the registered datasets read from files under a root folder."""
    return tuple(name for name, entry in DATASET_REGISTRY.items() if entry.reads_files)


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


_IMAGE_AUGMENT = Augment(pad=4, flip=True, noise_sigma=0.03)
_NO_AUGMENT = Augment(pad=0, flip=False, noise_sigma=0.0)


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset: everything the package needs to know about it.

    Attributes:
        reader: ``reader(name, root, split, seed)`` returns the split as :class:`ImageData`.
        reads_files: whether it is read from files under a root folder (``--data-root``);
            the others are built in or generated.
        toy: whether it is a low-dimensional toy set (points, not images).
        augment: the JEM reference augmentation of its training batches.
    """

    reader: Callable[[str, str | os.PathLike | None, str, int], ImageData]
    reads_files: bool
    toy: bool
    augment: Augment


def _cifar(name: str, root: str | os.PathLike | None, split: str, seed: int) -> ImageData:
    return read_cifar(name, root, split)


def _toy(name: str, root: str | os.PathLike | None, split: str, seed: int) -> ImageData:
    return read_toy(name, split, seed)


# The one table of datasets: the --dataset choices, load_dataset's dispatch, which sets read
# files, which are toy sets and the default augmentations are all read from it. Add a dataset
# here and nowhere else.
DATASET_REGISTRY: dict[str, DatasetEntry] = {
    # 8x8: shift by at most 1 pixel
    "digits": DatasetEntry(
        lambda name, root, split, seed: read_digits(split),
        reads_files=False,
        toy=False,
        augment=Augment(pad=1, flip=False, noise_sigma=0.03),
    ),
    **{
        name: DatasetEntry(_cifar, reads_files=True, toy=False, augment=_IMAGE_AUGMENT)
        for name in CIFAR_NAMES
    },
    # digits are not mirror-symmetric
    "svhn": DatasetEntry(
        lambda name, root, split, seed: read_svhn(root, split),
        reads_files=True,
        toy=False,
        augment=Augment(pad=4, flip=False, noise_sigma=0.03),
    ),
    "folder": DatasetEntry(
        lambda name, root, split, seed: read_folder(root, split),
        reads_files=True,
        toy=False,
        augment=_IMAGE_AUGMENT,
    ),
    **{
        name: DatasetEntry(_toy, reads_files=False, toy=True, augment=_NO_AUGMENT)
        for name in ("rings", "moons", "gmm")
    },
}
# Snapshots of the table as it is built (the functions above read the table itself).
DATASETS = tuple(DATASET_REGISTRY)
TOY_DATASETS = tuple(name for name, entry in DATASET_REGISTRY.items() if entry.toy)
FILE_DATASETS = file_datasets()


def default_augment(name: str) -> Augment:
    """The JEM reference augmentation for a dataset name (its entry's ``augment``).

    CIFAR and image folders: pad 4 + crop, flip, noise 0.03; SVHN: the same without flip;
    digits: pad 1 + crop, no flip, noise 0.03; toy sets: nothing.
    """
    return dataset_entry(name).augment


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
        ``(x, y, idx)``: the batch and the int64 indices of its samples in ``data``, on
        ``data.x``'s device. The order is moved to that device once per pass, so batches need
        no host-to-device copy (on a GPU: no synchronisation with the host).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(data.x.device)
    order_y = order.to(data.y.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        idx_y = order_y[start : start + batch_size]
        if world_size > 1:
            if len(idx) < world_size:
                continue
            idx, idx_y = idx[rank::world_size], idx_y[rank::world_size]
        yield data.x[idx], data.y[idx_y], idx


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
