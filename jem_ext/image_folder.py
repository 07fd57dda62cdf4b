"""The image-folder reader: class-per-folder trees of PNG/JPEG files (the ``"folder"`` data set,
whose layouts :mod:`jem_ext.data` describes), and the header probe and decoder that
:mod:`jem_ext.trained` also reads images with.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .image_data import DataError, ImageData, _digest, _split_fractions, _split_heldout_val

__all__ = ["GREY_MODES", "IMAGE_EXTS", "decode_image", "probe_image", "read_folder"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
# Pillow modes an image folder reads, each with the scale of its values: 8-bit modes (and the
# 1-bit mode "1", which Pillow converts to 0/255), 16-bit grey ("I;16*", and "I" as Pillow
# opens 16-bit grey PNGs) scaled by 65535. Modes with an alpha channel (and palettes with a
# transparent entry) load only when every pixel is opaque.
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_COLOUR_MODES = frozenset({"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})


def _is_hidden(path: Path) -> bool:
    """Hidden files and folders (``.DS_Store``, macOS ``._name`` resource forks) are skipped."""
    return path.name.startswith(".")


def _list_class_folder(root: Path, min_classes: int = 2) -> dict[str, list[Path]]:
    """Map each class sub-folder of ``root`` to its sorted image files (hidden ones skipped);
    a classifier needs at least two classes to learn (a test/ folder may hold fewer)."""
    if not root.is_dir():
        raise DataError(f"image folder {root}: folder does not exist")
    tree: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p)):
        files = sorted(
            f
            for f in sub.iterdir()
            if f.is_file() and not _is_hidden(f) and f.suffix.lower() in IMAGE_EXTS
        )
        if not files:
            raise DataError(
                f"image folder {root}: expected .png/.jpg files in class folder "
                f"'{sub.name}', found none"
            )
        tree[sub.name] = files
    if len(tree) < min_classes or not tree:
        found = f"only '{next(iter(tree))}'" if tree else "none"
        raise DataError(
            f"image folder {root}: expected at least {max(min_classes, 1)} sub-folders of "
            f"classes containing .png/.jpg files, found {found}"
        )
    return tree


def _flatten(tree: dict[str, list[Path]], classes: list[str]) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for name, files in tree.items():
        paths += files
        labels += [classes.index(name)] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _unreadable(path: Path, err: BaseException) -> DataError:
    return DataError(f"image folder: {path} is not a readable PNG/JPEG image ({err})")


def probe_image(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and (width, height) of an image, read from its header only; refuses modes whose
    values the folder reader cannot scale to [-1, 1]."""
    try:
        with Image.open(path) as im:
            mode, size, fmt = im.mode, im.size, im.format
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise _unreadable(path, err) from err
    if mode not in GREY_MODES | _COLOUR_MODES or (mode == "I" and fmt != "PNG"):
        raise DataError(
            f"image folder: {path} has Pillow mode {mode!r} ({fmt}), which cannot be read as "
            "8- or 16-bit pixels; expected grey, grey+alpha, palette, RGB, RGBA or CMYK images"
        )
    return mode, size


def decode_image(path: Path, grey: bool) -> tuple[np.ndarray, str]:
    """An image as float32 ``[C, H, W]`` in [-1, 1] (C = 1 when ``grey``, else 3), scaled by
    its bit depth (8-bit values by 255, 16-bit ones by 65535), and the SHA-256 of the file.

    Raises:
        DataError: unreadable file, or a pixel that is not fully opaque.
    """
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            mode = im.mode
            alpha = None
            if mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info):
                alpha = np.asarray(im.convert("RGBA" if mode != "LA" else "LA"))[..., -1]
            if mode in _SIXTEEN_BIT_MODES:
                values = np.asarray(im).astype(np.float64)
                if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
                    raise DataError(
                        f"image folder: {path} has {mode} pixel values outside 0..65535; "
                        "expected a 16-bit image"
                    )
                pixels = (values / 32767.5 - 1.0).astype(np.float32)[None]
                if not grey:
                    pixels = np.repeat(pixels, 3, axis=0)
            else:
                array = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
                pixels = array.reshape(array.shape[0], array.shape[1], -1).transpose(2, 0, 1)
                # as _to_unit_range computes it: float32 value / 127.5 - 1
                pixels = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    except DataError:
        raise
    except Exception as err:
        raise _unreadable(path, err) from err
    if alpha is not None and int(alpha.min(initial=255)) < 255:
        raise DataError(
            f"image folder: {path} has transparent pixels (mode {mode}); expected opaque "
            "images (flatten them onto a background first)"
        )
    return pixels, hashlib.sha256(raw).hexdigest()


def _folder_digest(
    base: Path, paths: list[Path], hashes: list[str], labels: np.ndarray, classes: list[str]
) -> str:
    """Digest of a split of an image folder: each file's path under the folder, the SHA-256 of
    its bytes (read anyway to decode it) and its label."""
    parts: list[bytes | str] = [
        f"{p.relative_to(base).as_posix()}\0{h}\0{int(k)}" for p, h, k in zip(paths, hashes, labels)
    ]
    return _digest([*parts, *classes])


def read_folder(root: str | os.PathLike | None, split: str) -> ImageData:
    if root is None:
        raise DataError("folder: expected root=<image folder with one sub-folder per class>")
    base = Path(root)
    explicit = (base / "train").is_dir() and (base / "test").is_dir()
    if explicit:
        train_tree = _list_class_folder(base / "train")
        test_tree = _list_class_folder(base / "test", min_classes=1)
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
        rule = "train/ with a tenth held out for validation"
    else:
        tree = _list_class_folder(base)
        classes = sorted(tree)
        all_paths, all_y = _flatten(tree, classes)
        idx = _split_fractions(all_y, split, val_frac=0.1, test_frac=0.1)
        paths, labels = [all_paths[i] for i in idx], all_y[idx]
        rule = "the 80/10/10 split"
    if not paths:
        raise DataError(
            f"image folder {base}: {rule} leaves the {split} split without images "
            f"({len(all_paths)} images in all); expected at least 10 images per split"
        )

    # Mode and size are checked over every split (headers only) so that all splits agree.
    # A plain loop: for small images Pillow is GIL-bound and threads only add overhead.
    probes = [probe_image(p) for p in all_paths]
    sizes = {size: path for path, (_, size) in zip(all_paths, probes)}
    if len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise DataError(
            f"image folder {base}: expected all images to share one size, but {p1} is "
            f"{s1[0]}x{s1[1]} and {p2} is {s2[0]}x{s2[1]}"
        )
    grey = all(m in GREY_MODES for m, _ in probes)
    width, height = probes[0][1]
    channels = 1 if grey else 3
    images = np.empty((len(paths), channels, height, width), dtype=np.float32)
    hashes = []
    for i, path in enumerate(paths):
        images[i], file_hash = decode_image(path, grey)
        hashes.append(file_hash)
    x = torch.from_numpy(images)
    digest = _folder_digest(base, paths, hashes, labels, classes)
    return ImageData(x, torch.from_numpy(labels), len(classes), "folder", classes, digest)
