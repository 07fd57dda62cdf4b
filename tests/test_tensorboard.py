"""The TensorBoard writer of --tensorboard: event files TensorBoard's own reader opens, a null
twin that writes nothing, one clear line when tensorboard is not installed."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

from jem_ext.training.tensorboard import (
    NullTensorBoard,
    TensorBoardLog,
    missing_message,
    open_tensorboard,
)


def _accumulator(folder):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_missing_tensorboard_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    message = missing_message()
    assert message is not None and "\n" not in message
    assert message.startswith("--tensorboard: ")
    assert "pip install 'jem_ext[tensorboard]'" in message


def test_writes_scalars_histograms_images_and_text(tmp_path):
    pytest.importorskip("tensorboard")
    assert missing_message() is None
    png = tmp_path / "grid.png"
    Image.new("RGB", (20, 10), (255, 0, 0)).save(png)
    with open_tensorboard(tmp_path, enabled=True) as tb:
        assert isinstance(tb, TensorBoardLog)
        for step in (1, 2):
            tb.scalars(step, {"loss": 0.5 * step, "px": None, "nan": float("nan"), "flag": True})
            tb.histogram("energy/data", torch.randn(64), step)
        tb.scalars(2, {"accuracy": 0.75}, prefix="val")
        tb.image_file("samples", png, 2)
        tb.text("events", "resumed", 2)
    acc = _accumulator(tmp_path / "tensorboard")
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "val/accuracy"}  # None, NaN, bools skipped
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 0.5), (2, 1.0)]
    assert tags["histograms"] == ["energy/data"]
    assert acc.Histograms("energy/data")[0].histogram_value.num == 64
    image = acc.Images("samples")[0]
    assert (image.step, image.width, image.height) == (2, 20, 10)


def test_purge_step_drops_what_a_resume_logs_again(tmp_path):
    pytest.importorskip("tensorboard")
    with open_tensorboard(tmp_path, enabled=True) as tb:
        for step in range(1, 6):
            tb.scalars(step, {"loss": 1.0})
    with open_tensorboard(tmp_path, enabled=True, purge_step=4) as tb:  # resumed at iteration 3
        for step in range(4, 6):
            tb.scalars(step, {"loss": 2.0})
    events = _accumulator(tmp_path / "tensorboard").Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)]


def test_disabled_writes_nothing(tmp_path):
    with open_tensorboard(tmp_path, enabled=False) as tb:
        assert isinstance(tb, NullTensorBoard) and not tb.enabled
        tb.scalars(1, {"loss": 1.0})
        tb.histogram("h", torch.ones(3), 1)
        tb.image_file("samples", tmp_path / "missing.png", 1)
    assert list(tmp_path.iterdir()) == []
