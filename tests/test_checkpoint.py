"""Tests of jem_ext.checkpoint: atomic save, validated load, resolution, RNG capture."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from jem_ext.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    capture_rng,
    load_checkpoint,
    model_from_checkpoint,
    new_state,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
    state_checksum,
)
from jem_ext.models import build_model, model_spec


def _state(model: torch.nn.Module) -> dict:
    return new_state(
        model_spec=model_spec(model),
        model=model.state_dict(),
        iteration=3,
        epoch=1,
        config={"seed": 0},
        best_val_accuracy=0.5,
    )


def test_roundtrip_and_model_rebuild(tmp_path):
    model = build_model("mlp", 3, (2,), hidden=8, depth=2)
    path = tmp_path / "sub" / "a.pt"
    save_checkpoint(path, _state(model))
    assert sorted(os.listdir(path.parent)) == ["a.pt"]  # no temp file left behind
    state = load_checkpoint(path)
    assert state["format"] == FORMAT and state["version"] == VERSION
    assert state["iteration"] == 3
    rebuilt = model_from_checkpoint(state)
    assert not rebuilt.training
    x = torch.randn(5, 2)
    torch.testing.assert_close(rebuilt(x), model(x))
    # The file is loadable with plain torch.load(weights_only=True).
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_save_adds_format_and_overwrites_atomically(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"iteration": 1})
    save_checkpoint(path, {"iteration": 2})
    state = load_checkpoint(path)
    assert state["iteration"] == 2 and state["format"] == FORMAT
    with pytest.raises(CheckpointError):
        save_checkpoint(path, [1, 2])  # type: ignore[arg-type]


def test_missing_corrupt_truncated_foreign(tmp_path):
    model = build_model("mlp", 2, (2,), hidden=4, depth=1)
    good = tmp_path / "good.pt"
    save_checkpoint(good, _state(model))
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="expected a file"):
        load_checkpoint(tmp_path)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(garbage)
    assert "\n" not in str(info.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": model.state_dict()}, foreign)
    with pytest.raises(CheckpointError, match="not a jem_ext checkpoint"):
        load_checkpoint(foreign)
    pickled_module = tmp_path / "module.pt"
    torch.save(model, pickled_module)
    with pytest.raises(CheckpointError, match="not a jem_ext checkpoint") as info:
        load_checkpoint(pickled_module)
    assert "\n" not in str(info.value)
    future = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "version": 999}, future)
    with pytest.raises(CheckpointError, match="unsupported version"):
        load_checkpoint(future)


def test_model_from_checkpoint_mismatch(tmp_path):
    model = build_model("mlp", 2, (2,), hidden=4, depth=1)
    state = _state(model)
    state["model_spec"]["kwargs"]["hidden"] = 16
    with pytest.raises(CheckpointError, match="does not match the saved weights"):
        model_from_checkpoint(state)
    with pytest.raises(CheckpointError, match="model_spec"):
        model_from_checkpoint({"format": FORMAT})


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="no such"):
        resolve_checkpoint(run)
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="without checkpoints"):
        resolve_checkpoint(run)
    save_checkpoint(run / "checkpoints" / "last.pt", {"iteration": 1})
    assert resolve_checkpoint(run) == run / "checkpoints" / "last.pt"
    save_checkpoint(run / "checkpoints" / "best.pt", {"iteration": 1})
    assert resolve_checkpoint(run) == run / "checkpoints" / "best.pt"
    f = run / "checkpoints" / "last.pt"
    assert resolve_checkpoint(f) == f


def test_rng_capture_restore_through_file(tmp_path):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": capture_rng({"data": gen})})
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    # Disturb every RNG, then restore from the file.
    torch.rand(10), np.random.rand(10), random.random(), torch.rand(10, generator=gen)
    restore_rng(load_checkpoint(path)["rng"], {"data": gen})
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    torch.testing.assert_close(got[3], expected[3])


def test_flipped_tensor_bytes_are_detected(tmp_path):
    path = tmp_path / "c.pt"
    weights = torch.arange(4096, dtype=torch.float32)
    save_checkpoint(path, {"model": {"w": weights}, "iteration": 1})
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(weights[1000:1004].numpy().tobytes())
    assert at > 0
    raw[at + 1] ^= 0x10  # one bit inside the tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_checksum_covers_every_value_and_old_checkpoints_load(tmp_path):
    state = {"model": {"w": torch.ones(3)}, "iteration": 1, "config": {"lr": 0.1}}
    base = state_checksum(state)
    assert base.startswith("sha256:") and state_checksum(dict(state)) == base
    assert state_checksum({**state, "iteration": 2}) != base
    assert state_checksum({**state, "config": {"lr": 0.2}}) != base
    assert state_checksum({**state, "model": {"w": torch.ones(3, dtype=torch.float64)}}) != base
    # a checkpoint written before checksums existed has none and still loads
    old = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "version": VERSION, "iteration": 7}, old)
    assert load_checkpoint(old)["iteration"] == 7
    path = tmp_path / "new.pt"
    save_checkpoint(path, state)
    assert load_checkpoint(path)["checksum"] == state_checksum(load_checkpoint(path))


def test_absurd_model_spec_is_refused_before_building():
    model = build_model("mlp", 2, (2,), hidden=4, depth=1)
    state = _state(model)
    state["model_spec"]["kwargs"]["hidden"] = 10**9  # would need petabytes
    with pytest.raises(CheckpointError, match="invalid model spec|does not match"):
        model_from_checkpoint(state)
    state["model_spec"]["kwargs"]["hidden"] = 8  # buildable but not what the weights are
    with pytest.raises(CheckpointError, match="does not match the saved weights"):
        model_from_checkpoint(state)
    state["model_spec"]["kwargs"]["hidden"] = -3
    with pytest.raises(CheckpointError, match="invalid model spec"):
        model_from_checkpoint(state)
