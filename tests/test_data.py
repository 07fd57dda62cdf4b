"""Tests for jem_ext.data: loaders, splits, errors, labeled_mask, Augment, batching, grids."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jem_ext.data import (
    DATASETS,
    Augment,
    DataError,
    ImageData,
    batches,
    check_augment,
    data_fingerprint,
    default_augment,
    fingerprint_changes,
    labeled_mask,
    load_dataset,
    save_image_grid,
)


def _sorted_rows(x: torch.Tensor) -> np.ndarray:
    """Samples of x as rows, in lexicographic order (to compare datasets as multisets)."""
    rows = x.reshape(x.shape[0], -1).numpy()
    return rows[np.lexsort(rows.T[::-1])]


def _check_image_data(d: ImageData, n: int, shape: tuple, num_classes: int) -> None:
    assert len(d) == n and d.shape == shape
    assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64
    assert d.x.shape == (n, *shape) and d.y.shape == (n,)
    assert d.x.min() >= -1 and d.x.max() <= 1
    assert d.num_classes == num_classes == len(d.classes)
    assert d.y.min() >= 0 and d.y.max() < num_classes


# ---------------------------------------------------------------------------------------------
# digits and toy sets
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return {s: load_dataset("digits", split=s) for s in ("train", "val", "test")}


def test_digits_shapes_and_sizes(digits):
    for split, n in (("train", 1258), ("val", 180), ("test", 359)):
        _check_image_data(digits[split], n, (1, 8, 8), 10)
        assert digits[split].name == "digits"
    assert digits["train"].x.min() == -1 and digits["train"].x.max() == 1


def test_digits_split_is_a_fixed_partition(digits):
    from sklearn.datasets import load_digits

    # Same split whatever the seed, and on every call.
    again = load_dataset("digits", split="val", seed=123)
    assert torch.equal(again.x, digits["val"].x) and torch.equal(again.y, digits["val"].y)
    # Train + val + test is exactly the whole data set (disjoint and complete).
    union = torch.cat([digits[s].x for s in ("train", "val", "test")])
    full = torch.from_numpy(load_digits().data).float().div(8).sub(1).reshape(-1, 1, 8, 8)
    np.testing.assert_array_equal(_sorted_rows(union), _sorted_rows(full))


def test_digits_split_is_stratified(digits):
    total = sum(torch.bincount(digits[s].y, minlength=10) for s in digits)
    for split, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        counts = torch.bincount(digits[split].y, minlength=10)
        assert (counts.float() - frac * total.float()).abs().max() <= 1.0


@pytest.mark.parametrize("name,num_classes", [("rings", 3), ("moons", 2), ("gmm", 8)])
def test_toy_sets(name, num_classes):
    splits = {s: load_dataset(name, split=s, seed=3) for s in ("train", "val", "test")}
    for split, n in (("train", 2000), ("val", 500), ("test", 500)):
        _check_image_data(splits[split], n, (2,), num_classes)
        assert set(splits[split].y.tolist()) == set(range(num_classes))
    again = load_dataset(name, split="train", seed=3)
    assert torch.equal(again.x, splits["train"].x) and torch.equal(again.y, splits["train"].y)
    assert not torch.equal(load_dataset(name, split="train", seed=4).x, splits["train"].x)
    assert not torch.equal(splits["train"].x[:500], splits["val"].x)


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*digits.*cifar10.*gmm"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="split: expected one of train, val, test"):
        load_dataset("digits", split="valid")
    assert set(DATASETS) >= {"digits", "cifar10", "cifar100", "svhn", "folder", "rings"}


def test_image_data_checks_lengths():
    with pytest.raises(DataError, match="expected as many labels as samples"):
        ImageData(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 2, "toy", ["a", "b"])
    with pytest.raises(DataError, match="expected 2 class names"):
        ImageData(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 2, "toy", ["a"])


@pytest.mark.parametrize("bad", [2, -1])
def test_image_data_refuses_labels_out_of_range(bad):
    # Checked on the host: on a GPU the energy kernels could only report it later.
    with pytest.raises(DataError, match=rf"toy: expected labels in 0 \.\. 1, got y\[1\] = {bad}"):
        ImageData(torch.zeros(3, 2), torch.tensor([0, bad, 1]), 2, "toy", ["a", "b"])


# ---------------------------------------------------------------------------------------------
# CIFAR pickles
# ---------------------------------------------------------------------------------------------


def _dump(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar10(root, n_per_batch=20, seed=0):
    """Write the official cifar-10-batches-py layout with tiny random batches."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches_ = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(n_per_batch) % 10]
        _dump(folder / name, {b"batch_label": b"x", b"data": data, b"labels": labels})
        batches_[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"] + [
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return folder, batches_


def test_cifar10_loader(tmp_path):
    folder, raw = _fake_cifar10(tmp_path)
    test = load_dataset("cifar10", root=tmp_path, split="test")
    _check_image_data(test, 20, (3, 32, 32), 10)
    assert test.classes[0] == "airplane" and test.classes[9] == "truck"
    data, labels = raw["test_batch"]
    assert test.y.tolist() == labels
    img = torch.from_numpy(data[0]).float().div(127.5).sub(1)
    assert test.x[0, 0, 0, 1] == img[1]  # red plane, row 0, column 1
    assert test.x[0, 1, 0, 0] == img[1024]  # green plane starts at 1024
    assert test.x[0, 2, 1, 0] == img[2048 + 32]  # blue plane, row 1

    # Root may be the extracted folder itself; val is a fixed 10% (< 5000) of train.
    train = load_dataset("cifar10", root=folder, split="train")
    val = load_dataset("cifar10", root=tmp_path, split="val", seed=7)
    assert (len(train), len(val)) == (90, 10)
    assert torch.bincount(val.y, minlength=10).tolist() == [1] * 10
    all_train = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)])
    expected = torch.from_numpy(all_train).float().div(127.5).sub(1)
    union = torch.cat([train.x, val.x]).reshape(100, -1)
    np.testing.assert_array_equal(_sorted_rows(union), _sorted_rows(expected))


def test_cifar100_loader(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 200), ("test", 50)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in np.arange(n) % 100]
        _dump(folder / name, {"data": data, "fine_labels": fine, "coarse_labels": [0] * n})
    _dump(folder / "meta", {"fine_label_names": [f"c{k}" for k in range(100)]})
    test = load_dataset("cifar100", root=tmp_path, split="test")
    _check_image_data(test, 50, (3, 32, 32), 100)
    assert test.classes[42] == "c42"
    assert len(load_dataset("cifar100", root=folder, split="train")) == 180


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="cifar10: folder .* does not exist"):
        load_dataset("cifar10", root=tmp_path / "nowhere")
    with pytest.raises(DataError, match="expected root="):
        load_dataset("cifar10", root=None)
    with pytest.raises(DataError, match="expected files .*data_batch_1.*missing in .*batches.meta"):
        load_dataset("cifar10", root=tmp_path)

    folder, _ = _fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02this is not a pickle")
    with pytest.raises(DataError, match="test_batch is not a valid CIFAR python pickle"):
        load_dataset("cifar10", root=tmp_path, split="test")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    _dump(folder / "test_batch", {b"data": Evil(), b"labels": []})
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset("cifar10", root=tmp_path, split="test")

    _dump(folder / "test_batch", [1, 2, 3])
    with pytest.raises(DataError, match="expected a pickled dict, got list"):
        load_dataset("cifar10", root=tmp_path, split="test")

    _dump(folder / "test_batch", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    bad_shape = r"expected 'data' as uint8 \[N, 3072\], got uint8 \[4, 100\]"
    with pytest.raises(DataError, match=bad_shape):
        load_dataset("cifar10", root=tmp_path, split="test")

    _dump(folder / "test_batch", {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3})
    with pytest.raises(DataError, match="expected 4 integer labels"):
        load_dataset("cifar10", root=tmp_path, split="test")

    _dump(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(DataError, match=r"expected labels in 0..9, found 0..10"):
        load_dataset("cifar10", root=tmp_path, split="test")

    _dump(folder / "test_batch", {b"pixels": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(DataError, match="expected keys 'data' and 'labels'"):
        load_dataset("cifar10", root=tmp_path, split="test")


# ---------------------------------------------------------------------------------------------
# SVHN .mat files
# ---------------------------------------------------------------------------------------------


def test_svhn_loader_and_errors(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for name, n in (("train_32x32.mat", 60), ("test_32x32.mat", 30)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 = digit 0
        savemat(tmp_path / name, {"X": x, "y": y})
        if name.startswith("test"):
            test_x, test_y = x, y
    test = load_dataset("svhn", root=tmp_path, split="test")
    _check_image_data(test, 30, (3, 32, 32), 10)
    assert test.y.tolist() == [int(v) % 10 for v in test_y[:, 0]]
    assert test.x[5, 2, 3, 4] == torch.tensor(float(test_x[3, 4, 2, 5])) / 127.5 - 1
    train = load_dataset("svhn", root=tmp_path, split="train")
    val = load_dataset("svhn", root=tmp_path, split="val")
    assert (len(train), len(val)) == (54, 6)

    with pytest.raises(DataError, match="svhn: folder .* does not exist"):
        load_dataset("svhn", root=tmp_path / "missing")
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage" * 20)
    with pytest.raises(DataError, match="test_32x32.mat is not a readable MATLAB file"):
        load_dataset("svhn", root=tmp_path, split="test")
    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[1]]})
    with pytest.raises(DataError, match="expected 2 labels, got 1"):
        load_dataset("svhn", root=tmp_path, split="test")
    savemat(tmp_path / "test_32x32.mat", {"images": np.zeros((2, 2), np.uint8)})
    with pytest.raises(DataError, match="expected variables 'X' and 'y'"):
        load_dataset("svhn", root=tmp_path, split="test")


# ---------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------


def _write_images(folder, n, size=(8, 8), mode="L", fmt="png", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
            folder / f"img{i:03d}.{fmt}"
        )


def test_folder_flat_layout_grey_png(tmp_path):
    for k, cls in enumerate(["cat", "ant", "bee"]):
        _write_images(tmp_path / cls, 10, seed=k)
    (tmp_path / "README.txt").write_text("ignored")
    splits = {s: load_dataset("folder", root=tmp_path, split=s) for s in ("train", "val", "test")}
    for split, n in (("train", 24), ("val", 3), ("test", 3)):
        _check_image_data(splits[split], n, (1, 8, 8), 3)
        assert splits[split].classes == ["ant", "bee", "cat"]
        assert torch.bincount(splits[split].y, minlength=3).min() >= 1
    union = torch.cat([splits[s].x for s in splits])
    pixels = [
        np.asarray(Image.open(tmp_path / c / f"img{i:03d}.png"))
        for c in ("ant", "bee", "cat")
        for i in range(10)
    ]
    expected = torch.from_numpy(np.stack(pixels)[:, None]).float().div(127.5).sub(1)
    np.testing.assert_array_equal(_sorted_rows(union), _sorted_rows(expected))


def test_folder_train_test_layout_rgb_jpeg(tmp_path):
    for k, cls in enumerate(["b", "a"]):
        _write_images(tmp_path / "train" / cls, 20, (12, 10), "RGB", "jpg", seed=k)
        _write_images(tmp_path / "test" / cls, 5, (12, 10), "RGB", "jpeg", seed=10 + k)
    # One grey image among RGB ones: everything is loaded as RGB.
    Image.new("L", (12, 10), 7).save(tmp_path / "train" / "a" / "grey.png")
    # An empty class folder is an error for every split.
    (tmp_path / "test" / "empty").mkdir()
    with pytest.raises(DataError, match="expected .png/.jpg files in class folder 'empty'"):
        load_dataset("folder", root=tmp_path, split="train")
    (tmp_path / "test" / "empty").rmdir()
    train = load_dataset("folder", root=tmp_path, split="train")
    val = load_dataset("folder", root=tmp_path, split="val")
    test = load_dataset("folder", root=tmp_path, split="test")
    _check_image_data(train, 37, (3, 10, 12), 2)
    _check_image_data(val, 4, (3, 10, 12), 2)
    _check_image_data(test, 10, (3, 10, 12), 2)
    assert test.classes == ["a", "b"] and test.y.tolist() == [0] * 5 + [1] * 5


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="folder does not exist"):
        load_dataset("folder", root=tmp_path / "missing")
    with pytest.raises(DataError, match="expected root="):
        load_dataset("folder")
    with pytest.raises(
        DataError,
        match="expected at least 2 sub-folders of classes containing .png/.jpg files, found none",
    ):
        load_dataset("folder", root=tmp_path)

    _write_images(tmp_path / "a", 5, (8, 8))
    _write_images(tmp_path / "b", 5, (9, 8))
    with pytest.raises(DataError, match="expected all images to share one size.* 8x8 .* 9x8"):
        load_dataset("folder", root=tmp_path)

    for f in (tmp_path / "b").iterdir():
        f.unlink()
    _write_images(tmp_path / "b", 5, (8, 8))
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png is not a readable PNG/JPEG image"):
        load_dataset("folder", root=tmp_path)

    split_root = tmp_path / "split"
    _write_images(split_root / "train" / "a", 5)
    _write_images(split_root / "train" / "b", 5)
    _write_images(split_root / "test" / "z", 5)
    with pytest.raises(DataError, match=r"test/ also has \['z'\]"):
        load_dataset("folder", root=split_root, split="test")


# ---------------------------------------------------------------------------------------------
# labeled_mask
# ---------------------------------------------------------------------------------------------


def test_labeled_mask():
    y = torch.arange(100) % 4
    mask = labeled_mask(y, 7, seed=1)
    assert mask.dtype == torch.bool and mask.shape == (100,)
    assert torch.bincount(y[mask], minlength=4).tolist() == [7] * 4
    assert torch.equal(mask, labeled_mask(y, 7, seed=1))
    assert not torch.equal(mask, labeled_mask(y, 7, seed=2))
    assert labeled_mask(y, None).all()
    assert labeled_mask(y, 25).all()
    with pytest.raises(DataError, match="labels_per_class=26: .* fewer .*0: 25"):
        labeled_mask(y, 26)
    with pytest.raises(DataError, match="expected None or >= 1"):
        labeled_mask(y, 0)


# ---------------------------------------------------------------------------------------------
# Augment, batches, grids
# ---------------------------------------------------------------------------------------------


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_augment_flip_only():
    x = torch.randn(64, 3, 5, 6)
    out = Augment(pad=0, flip=True)(x, generator=_gen())
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert out.shape == x.shape
    assert (same | flipped).all() and same.any() and flipped.any()
    assert torch.equal(out, Augment(pad=0, flip=True)(x, generator=_gen()))


@pytest.mark.parametrize("flip", [False, True])
def test_augment_crop_is_a_shift_of_the_padded_image(flip):
    x = torch.randn(32, 2, 6, 7)
    pad = 2
    out = Augment(pad=pad, flip=flip)(x, generator=_gen(1))
    assert out.shape == x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = set()
    for i in range(x.shape[0]):
        candidates = {
            (dy, dx, f): window.flip(-1) if f else window
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for f in ((False, True) if flip else (False,))
            for window in [padded[i, :, dy : dy + 6, dx : dx + 7]]
        }
        matches = [key for key, window in candidates.items() if torch.equal(out[i], window)]
        assert matches, f"image {i} is not a crop of its padded version"
        offsets.add(matches[0][:2])
    assert len(offsets) > 5  # offsets really vary


def test_augment_noise_and_presets():
    x = torch.zeros(256, 3, 16, 16)
    out = Augment(pad=0, flip=False, noise_sigma=0.1)(x, generator=_gen())
    assert abs(out.std().item() - 0.1) < 0.005 and abs(out.mean().item()) < 0.005
    toy = torch.zeros(10, 2)
    assert Augment(pad=0, flip=False, noise_sigma=0.5)(toy).shape == (10, 2)
    with pytest.raises(ValueError, match=r"expected images \[B, C, H, W\]"):
        Augment(pad=1)(toy)
    assert default_augment("cifar10") == Augment(4, True, 0.03)
    assert default_augment("svhn") == Augment(4, False, 0.03)
    assert default_augment("digits") == Augment(1, False, 0.03)
    assert default_augment("moons") == Augment(0, False, 0.0)
    assert torch.equal(default_augment("rings")(toy), toy)
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        default_augment("imagenet")


def test_batches():
    data = ImageData(torch.arange(10.0)[:, None], torch.arange(10) % 2, 2, "toy", ["a", "b"])
    seen = list(batches(data, 4, shuffle=False, generator=None, drop_last=False))
    assert [len(b[2]) for b in seen] == [4, 4, 2]
    assert torch.equal(torch.cat([b[2] for b in seen]), torch.arange(10))
    shuffled = list(batches(data, 4, shuffle=True, generator=_gen(3), drop_last=True))
    assert [len(b[2]) for b in shuffled] == [4, 4]
    for x, y, idx in shuffled:
        assert torch.equal(x, data.x[idx]) and torch.equal(y, data.y[idx])
    again = list(batches(data, 4, shuffle=True, generator=_gen(3), drop_last=True))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(shuffled, again))
    assert len(torch.cat([b[2] for b in shuffled]).unique()) == 8


def test_batches_index_on_the_data_device():
    """The order moves to the data's device once per pass; batches index there (no per-batch
    host-to-device copy). The meta device stands in for a GPU."""
    data = ImageData(
        torch.zeros(10, 2, device="meta"),
        torch.zeros(10, dtype=torch.int64, device="meta"),
        1,
        "toy",
        ["a"],
    )
    for x, y, idx in batches(data, 4, shuffle=True, generator=_gen(1)):
        assert idx.device.type == x.device.type == y.device.type == "meta"


def test_save_image_grid(tmp_path):
    x = torch.full((10, 1, 8, 8), -1.0)
    x[1] = 1.0
    path = tmp_path / "sub" / "grid.png"
    save_image_grid(x, path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        assert im.size == (4 * 34 + 2, 3 * 34 + 2)  # 4 per row, 8x8 upscaled x4, border 2
        arr = np.asarray(im)
    assert arr[0, 0] == 255 and arr[2, 2] == 0 and arr[2, 33] == 0  # border, tile 0 (black)
    assert arr[2, 34] == 255 and arr[2, 36] == 255 and arr[40, 2] == 0  # tile 1 white, tile 4 black
    assert sorted(os.listdir(path.parent)) == ["grid.png"]  # no temporary file left behind

    rgb = torch.rand(6, 3, 32, 32) * 2 - 1
    save_image_grid(rgb, tmp_path / "rgb.png", nrow=3)
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.mode == "RGB" and im.size == (3 * 34 + 2, 2 * 34 + 2)
    with pytest.raises(ValueError, match="expected"):
        save_image_grid(torch.zeros(4, 2), tmp_path / "bad.png")


def test_dataset_type_is_importable_from_data_files_and_data():
    from jem_ext import data, data_files, image_data

    for name in ("DataError", "ImageData"):
        assert getattr(data_files, name) is getattr(image_data, name)
        assert getattr(data, name) is getattr(image_data, name)


# ---------------------------------------------------------------------------------------------
# image folders: pixel modes, hidden files, class and split counts, augmentation sizes
# ---------------------------------------------------------------------------------------------


def _folder_of(tmp_path, image: Image.Image, fmt: str = "png", n: int = 10):
    """A two-class folder: ``image`` in class ``a``, plain 8-bit grey images in class ``b``."""
    (tmp_path / "a").mkdir(parents=True)
    for i in range(n):
        image.save(tmp_path / "a" / f"img{i:03d}.{fmt}")
    _write_images(tmp_path / "b", n, image.size)
    return tmp_path


def _class_a(root) -> torch.Tensor:
    """Every image of class ``a`` over the three splits."""
    splits = [load_dataset("folder", root=root, split=s) for s in ("train", "val", "test")]
    return torch.cat([d.x[d.y == 0] for d in splits])


@pytest.mark.parametrize("fmt, mode", [("PNG", "I;16"), ("TIFF", "I;16B")])
def test_folder_16_bit_grey_png_is_scaled_by_its_bit_depth(tmp_path, fmt, mode):
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(">u2")
    image = Image.fromarray(values)
    (tmp_path / "a").mkdir()
    for i in range(10):
        image.save(tmp_path / "a" / f"img{i:03d}.png", format=fmt)
    assert Image.open(tmp_path / "a" / "img000.png").mode == mode
    _write_images(tmp_path / "b", 10)
    x = _class_a(tmp_path)
    expected = torch.from_numpy(values.astype(np.float64) / 32767.5 - 1).float()
    assert len(x[0].unique()) == 64  # not clipped to 255 (two values)
    torch.testing.assert_close(x[0, 0], expected)


@pytest.mark.parametrize(
    "mode, fill, expected",
    [
        ("1", 1, [1.0]),
        ("L", 51, [51 / 127.5 - 1]),
        ("LA", (51, 255), [51 / 127.5 - 1]),
        ("RGB", (255, 0, 51), [1.0, -1.0, 51 / 127.5 - 1]),
        ("RGBA", (255, 0, 51, 255), [1.0, -1.0, 51 / 127.5 - 1]),
    ],
)
def test_folder_8_bit_modes_load_scaled(tmp_path, mode, fill, expected):
    x = _class_a(_folder_of(tmp_path, Image.new(mode, (8, 8), fill)))
    assert x.shape[1] == len(expected)
    for c, value in enumerate(expected):
        torch.testing.assert_close(x[:, c], torch.full_like(x[:, c], value))


def test_folder_palette_and_cmyk_load_as_rgb(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30])
    x = _class_a(_folder_of(tmp_path / "p", palette))
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([10, 200, 30]) / 127.5 - 1)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    x = _class_a(_folder_of(tmp_path / "c", cmyk, fmt="jpg"))
    assert x.shape[1] == 3 and x[0, 0].mean() > 0.9 and x[0, 1:].mean() < -0.9


@pytest.mark.parametrize("mode", ["LA", "RGBA", "P"])
def test_folder_transparent_pixels_are_refused(tmp_path, mode):
    if mode == "P":
        image = Image.new("P", (8, 8), 0)
        image.putpalette([0, 0, 0, 255, 255, 255])
        image.info["transparency"] = 0
    else:
        image = Image.new(mode, (8, 8), (100, 0) if mode == "LA" else (1, 2, 3, 0))
    with pytest.raises(DataError, match="has transparent pixels .*expected opaque images"):
        _class_a(_folder_of(tmp_path, image))


@pytest.mark.parametrize("mode", ["F", "I"])
def test_folder_modes_without_a_bit_depth_are_refused(tmp_path, mode):
    # a TIFF named .png: Pillow opens it, but 32-bit values have no scale to [-1, 1]
    image = Image.new(mode, (8, 8), 3)
    (tmp_path / "a").mkdir()
    for i in range(10):
        image.save(tmp_path / "a" / f"img{i}.png", format="TIFF")
    _write_images(tmp_path / "b", 10)
    with pytest.raises(DataError, match=f"img0.png has Pillow mode '{mode}' \\(TIFF\\)"):
        load_dataset("folder", root=tmp_path)


def test_folder_skips_hidden_files(tmp_path):
    for cls in ("a", "b"):
        _write_images(tmp_path / cls, 10)
        (tmp_path / cls / "._img000.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
        (tmp_path / cls / ".DS_Store").write_bytes(b"\x00")
    d = load_dataset("folder", root=tmp_path, split="train")
    assert len(d) == 16


@pytest.mark.parametrize("layout", ["flat", "train_test"])
def test_folder_with_one_class_is_refused(tmp_path, layout):
    base = tmp_path / "train" if layout == "train_test" else tmp_path
    _write_images(base / "only", 20)
    _write_images(base / ".hidden", 20)
    if layout == "train_test":
        _write_images(tmp_path / "test" / "only", 5)
    with pytest.raises(DataError, match="expected at least 2 sub-folders of classes.*only 'only'"):
        load_dataset("folder", root=tmp_path, split="test")


def test_folder_with_an_empty_split_is_refused(tmp_path):
    for cls in ("a", "b"):
        _write_images(tmp_path / cls, 2)
    with pytest.raises(DataError, match="leaves the val split without images .*4 images in all"):
        load_dataset("folder", root=tmp_path, split="val")


@pytest.mark.parametrize("size, ok", [(4, False), (5, True)])
def test_augmentation_padding_needs_larger_images(tmp_path, size, ok):
    for cls in ("a", "b"):
        _write_images(tmp_path / cls, 10, (size, size + 3))
    data = load_dataset("folder", root=tmp_path)
    augment = default_augment("folder")
    if ok:
        check_augment(augment, data, str(tmp_path))
        assert augment(data.x).shape == data.x.shape
    else:
        with pytest.raises(DataError, match=r"images are 4x7 pixels, .*pads 4 .*at least 5x5"):
            check_augment(augment, data, str(tmp_path))
    check_augment(None, data)  # --no-augment
    check_augment(Augment(pad=0), data)


# ---------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------


def _fingerprint(root) -> dict:
    return data_fingerprint({s: load_dataset("folder", root, s) for s in ("train", "val", "test")})


def test_folder_fingerprint_follows_files_not_times(tmp_path):
    for k, cls in enumerate(("a", "b", "c")):
        _write_images(tmp_path / cls, 10, seed=k)
    first = _fingerprint(tmp_path)
    assert first["num_classes"] == 3 and first["shape"] == [1, 8, 8]
    assert {s: v["n"] for s, v in first["splits"].items()} == {"train": 24, "val": 3, "test": 3}
    for f in (tmp_path / "a").iterdir():
        os.utime(f, (1, 1))  # copies change times, not data
    assert fingerprint_changes(first, _fingerprint(tmp_path)) == []
    _write_images(tmp_path / "a", 11)  # one image more
    changes = fingerprint_changes(first, _fingerprint(tmp_path))
    assert changes[0] == "the train split now has 25 samples, was 24"
    (tmp_path / "a" / "img010.png").unlink()
    (tmp_path / "a" / "img009.png").rename(tmp_path / "a" / "img099.png")  # renamed
    assert "other samples or labels" in " ".join(fingerprint_changes(first, _fingerprint(tmp_path)))
    (tmp_path / "a" / "img099.png").rename(tmp_path / "a" / "img009.png")
    assert fingerprint_changes(first, _fingerprint(tmp_path)) == []
    rewritten = tmp_path / "a" / "img004.png"
    pixels = np.asarray(Image.open(rewritten)).copy()
    pixels[0, 0] ^= 1  # one pixel: same name, same size
    size = rewritten.stat().st_size
    Image.fromarray(pixels).save(rewritten)
    assert rewritten.stat().st_size == size
    assert "other samples or labels" in " ".join(fingerprint_changes(first, _fingerprint(tmp_path)))
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(rewritten)
    assert fingerprint_changes(first, _fingerprint(tmp_path)) == []
    for f in (tmp_path / "c").iterdir():
        f.unlink()
    (tmp_path / "c").rmdir()
    assert fingerprint_changes(first, _fingerprint(tmp_path))[0] == (
        "the data now has 2 classes, trained on 3"
    )


def test_fingerprints_of_built_in_and_file_data_sets(tmp_path):
    digits = data_fingerprint({s: load_dataset("digits", split=s) for s in ("train", "test")})
    again = data_fingerprint({"test": load_dataset("digits", split="test")})
    assert digits["splits"]["test"] == again["splits"]["test"]
    assert fingerprint_changes(digits, again) == []  # only the splits both hold
    moons = {s: data_fingerprint({s: load_dataset("moons", split=s, seed=1)}) for s in ("test",)}
    other = data_fingerprint({"test": load_dataset("moons", split="test", seed=2)})
    assert fingerprint_changes(moons["test"], other) == [
        "the test split holds other samples or labels"
    ]
    assert fingerprint_changes(digits, other) == ["data set 'moons', trained on 'digits'"]
    folder, raw = _fake_cifar10(tmp_path)
    cifar = data_fingerprint({"test": load_dataset("cifar10", tmp_path, "test")})
    assert cifar["splits"]["test"]["digest"].startswith("sha256:")
    data, labels = raw["test_batch"]
    data[3, 7] ^= 1  # one pixel of one image, same file size
    _dump(folder / "test_batch", {b"batch_label": b"x", b"data": data, b"labels": labels})
    changed = data_fingerprint({"test": load_dataset("cifar10", tmp_path, "test")})
    assert fingerprint_changes(cifar, changed) == ["the test split holds other samples or labels"]
    # unknown or other-scheme fingerprints are not compared
    assert fingerprint_changes(None, cifar) == []
    assert fingerprint_changes({**cifar, "scheme": 0, "num_classes": 3}, cifar) == []
