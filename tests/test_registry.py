"""A model or a data set is added in one place: its registry entry (jem_ext.models.MODELS,
jem_ext.data.DATASET_REGISTRY); the trainer's flags, settings and checks follow from it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from toy_runs import TOY

from jem_ext import data as jdata
from jem_ext import models
from jem_ext import train as jtrain
from jem_ext.checkpoint import load_checkpoint
from jem_ext.data import DATASET_REGISTRY, Augment, DatasetEntry, ImageData
from jem_ext.models import MODELS, ModelEntry
from jem_ext.training.options import ModelOptions
from jem_ext.training.setup import model_kwargs


class TinyNet(torch.nn.Module):
    """One hidden layer; ``units`` wide."""

    def __init__(self, in_dim: int, num_classes: int, units: int = 8) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(in_dim, units), torch.nn.SiLU(), torch.nn.Linear(units, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def _build_tiny(num_classes: int, in_shape: tuple[int, ...], **kwargs) -> torch.nn.Module:
    return TinyNet(math.prod(in_shape), num_classes, **kwargs)


TINY_MODEL = ModelEntry(
    _build_tiny,
    depth_kwarg=None,
    width_kwarg="units",
    takes_norm=False,
    convolutional=False,
    needs_images=False,
)


class TinyConv(torch.nn.Module):
    def __init__(self, in_channels: int, num_classes: int, norm=None, dropout=0.0) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 4, 3, padding=1)
        self.linear = torch.nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv(x).mean(dim=(2, 3)))


TINY_CONV = ModelEntry(
    lambda num_classes, in_shape, **kw: TinyConv(in_shape[0], num_classes, **kw),
    depth_kwarg=None,
    width_kwarg=None,
    takes_norm=True,
    convolutional=True,
    needs_images=True,
)


def _read_blobs(name: str, root, split: str, seed: int) -> ImageData:
    g = torch.Generator().manual_seed(seed + {"train": 0, "val": 1, "test": 2}[split])
    y = torch.arange(64) % 2
    x = torch.randn(64, 2, generator=g).mul_(0.1) + torch.stack([y * 0.8 - 0.4, y * 0.0], 1)
    return ImageData(x.float(), y.long(), 2, name, ["a", "b"])


BLOBS = DatasetEntry(_read_blobs, reads_files=False, toy=True, augment=Augment(0, False, 0.0))


def _read_specks(name: str, root, split: str, seed: int) -> ImageData:
    g = torch.Generator().manual_seed(seed + {"train": 0, "val": 1, "test": 2}[split])
    y = torch.arange(32) % 2
    x = torch.rand(32, 1, 4, 4, generator=g).mul_(2).sub_(1)
    return ImageData(x, y.long(), 2, name, ["a", "b"])


SPECKS = DatasetEntry(_read_specks, reads_files=False, toy=False, augment=Augment(1, True, 0.0))

FAST = ["--max-iters", "3", "--no-progress", "--log-every", "1", "--sample-every", "0"]


def _spec(run) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model_spec"]


def test_a_model_registered_once_trains_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "tiny", TINY_MODEL)
    run = tmp_path / "run"
    argv = [*TOY, "--model", "tiny", "--width", "6", "--max-iters", "3"]
    assert jtrain.main([*argv, "--out", str(run)]) == 0
    spec = _spec(run)
    assert spec["name"] == "tiny" and spec["kwargs"] == {"units": 6}
    assert json.loads((run / "config.json").read_text())["model"] == "tiny"
    # it resumes and is rebuilt from its spec by the same entry
    assert jtrain.main(["--resume", str(run), "--max-iters", "5"]) == 0
    assert isinstance(models.build_from_spec(spec), TinyNet)


def test_model_kwargs_follow_the_entry_instead_of_a_second_table(monkeypatch):
    cfg = ModelOptions(name="tiny", norm="batch", dropout=0.1, depth=4, width=6)
    monkeypatch.setitem(MODELS, "tiny", TINY_MODEL)
    assert model_kwargs(cfg) == {"units": 6}  # no depth setting, no norm/dropout
    monkeypatch.setitem(MODELS, "tiny", TINY_CONV)
    assert model_kwargs(cfg) == {"norm": "batch", "dropout": 0.1}
    # the built-in models keep their arguments
    base = {"norm": "none", "dropout": 0.0, "depth": 10, "width": 2}
    assert model_kwargs(ModelOptions(name="wrn", **base)) == {
        "norm": None,
        "dropout": 0.0,
        "depth": 10,
        "widen_factor": 2,
    }
    assert model_kwargs(ModelOptions(name="small_cnn", **base)) == {
        "norm": None,
        "dropout": 0.0,
        "width": 2,
    }
    assert model_kwargs(ModelOptions(name="mlp", **base)) == {"depth": 10, "hidden": 2}


def test_convolutional_models_come_from_the_registry(tmp_path, monkeypatch, capsys):
    assert models.convolutional_models() == ("wrn", "small_cnn")
    monkeypatch.setitem(MODELS, "tiny_conv", TINY_CONV)
    monkeypatch.setitem(MODELS, "tiny", TINY_MODEL)
    assert models.convolutional_models() == ("wrn", "small_cnn", "tiny_conv")
    # a registered convolutional model takes --channels-last
    run = tmp_path / "conv"
    argv = ["--dataset", "digits", "--model", "tiny_conv", "--objective", "ce", *FAST]
    assert jtrain.main([*argv, "--channels-last", "--out", str(run)]) == 0
    assert _spec(run)["name"] == "tiny_conv"
    # a registered fully connected one is refused, naming the registry's convolutional models
    bad = tmp_path / "bad"
    argv = [*TOY, "--model", "tiny", "--channels-last", "--out", str(bad)]
    assert jtrain.main(argv) == 2
    err = capsys.readouterr().err
    assert "expected a convolutional model (wrn, small_cnn, tiny_conv), got tiny" in err
    assert not bad.exists()


def test_an_image_model_is_refused_on_a_toy_set_by_its_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(MODELS, "tiny_conv", TINY_CONV)
    monkeypatch.setitem(MODELS, "tiny", TINY_MODEL)
    assert jtrain.main([*TOY, "--model", "tiny_conv", "--out", str(tmp_path / "r")]) == 2
    assert "tiny_conv needs images; the 2-D set moons needs --model mlp or tiny" in (
        capsys.readouterr().err
    )


def test_a_dataset_registered_once_trains_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASET_REGISTRY, "blobs", BLOBS)
    assert jdata.load_dataset("blobs", split="val").x.shape == (64, 2)
    assert jdata.default_augment("blobs") == Augment(0, False, 0.0)
    run = tmp_path / "run"
    argv = [*TOY, "--dataset", "blobs", "--max-iters", "3", "--batch-size", "16"]
    assert jtrain.main([*argv, "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["dataset"] == "blobs"
    assert _spec(run)["in_shape"] == [2]
    assert jtrain.main(["--resume", str(run), "--max-iters", "5"]) == 0


def test_a_registered_image_dataset_uses_its_augmentation(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(DATASET_REGISTRY, "specks", SPECKS)
    run = tmp_path / "run"
    argv = ["--dataset", "specks", "--model", "small_cnn", "--width", "4", "--objective", "ce"]
    assert jtrain.main([*argv, *FAST, "--batch-size", "8", "--out", str(run)]) == 0
    assert _spec(run)["in_shape"] == [1, 4, 4]
    # it reads no files, so --data-root is refused, and the message names the file sets
    bad = tmp_path / "bad"
    assert jtrain.main([*argv, *FAST, "--data-root", str(tmp_path), "--out", str(bad)]) == 2
    assert "the specks dataset reads no files (only cifar10, cifar100, svhn, folder do)" in (
        capsys.readouterr().err
    )
    assert not bad.exists()


def test_unknown_names_give_the_registry_choices():
    with pytest.raises(ValueError, match="unknown model 'nope': expected one of wrn, small_cnn"):
        models.build_model("nope", 2, (2,))
    with pytest.raises(jdata.DataError, match="unknown dataset 'nope'.*digits.*gmm"):
        jdata.default_augment("nope")
    with pytest.raises(jdata.DataError, match="unknown dataset 'nope'.*digits.*gmm"):
        jdata.load_dataset("nope")


def test_the_built_in_tables_are_unchanged():
    assert jdata.DATASETS == (
        "digits", "cifar10", "cifar100", "svhn", "folder", "rings", "moons", "gmm",
    )  # fmt: skip
    assert jdata.TOY_DATASETS == ("rings", "moons", "gmm")
    assert jdata.FILE_DATASETS == ("cifar10", "cifar100", "svhn", "folder")
    assert tuple(MODELS) == ("wrn", "small_cnn", "mlp")
    presets = {name: jdata.default_augment(name) for name in jdata.DATASETS}
    assert presets["cifar10"] == presets["cifar100"] == presets["folder"] == Augment(4, True, 0.03)
    assert presets["svhn"] == Augment(4, False, 0.03)
    assert presets["digits"] == Augment(1, False, 0.03)
    assert all(presets[t] == Augment(0, False, 0.0) for t in jdata.TOY_DATASETS)
