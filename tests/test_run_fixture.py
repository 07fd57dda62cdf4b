"""A run folder written by an earlier version of the trainer keeps resuming, repeating and
evaluating.

``tests/fixtures/digits_run_v1`` was written before the run configuration became typed, by
``python -m jem_ext.train --max-iters 2 --buffer-size 50 --sgld-steps 1 --ckpt-every 1
--width 8 --no-progress`` (digits, a 2-iteration JEM with a small network). Its config.json is
the flat dict of flag names every version writes, and its checkpoint carries that config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from jem_ext import train as jtrain
from jem_ext.checkpoint import load_checkpoint
from jem_ext.eval import cli as eval_cli
from jem_ext.training.config import ADDED_KEYS

FIXTURE = Path(__file__).parent / "fixtures" / "digits_run_v1"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """A copy of the fixture run folder (a resume writes into it)."""
    run = tmp_path / "old"
    shutil.copytree(FIXTURE, run)
    return run


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_fixture_is_what_its_docstring_says() -> None:
    cfg = json.loads((FIXTURE / "config.json").read_text())
    assert (cfg["max_iters"], cfg["buffer_size"], cfg["sgld_steps"], cfg["width"]) == (2, 50, 1, 8)
    state = load_checkpoint(FIXTURE / "checkpoints" / "last.pt")
    assert state["iteration"] == 2 and state["config"]["run_id"] == cfg["run_id"]


def test_an_old_run_resumes_exactly(old_run: Path, tmp_path: Path) -> None:
    """--resume continues the old run; its third iteration is the one an uninterrupted run of
    the same config trains (the run keeps its id and its config)."""
    assert jtrain.main(["--resume", str(old_run), "--max-iters", "3"]) == 0
    summary = json.loads((old_run / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["status"] == "budget"
    recorded = json.loads((old_run / "config.json").read_text())
    assert recorded["run_id"] == json.loads((FIXTURE / "config.json").read_text())["run_id"]
    assert recorded["max_iters"] == 3 and recorded["width"] == 8
    fresh = tmp_path / "fresh"
    argv = ["--config", str(FIXTURE / "config.json"), "--max-iters", "3", "--out", str(fresh)]
    assert jtrain.main(argv) == 0
    assert _same_weights(_weights(old_run), _weights(fresh))
    rows = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "resume" and rows[0]["iteration"] == 2


def test_an_old_config_repeats_the_run_bit_for_bit(tmp_path: Path) -> None:
    """--config of the old config.json trains the same two iterations to the same weights and
    replay buffer as the version that wrote it."""
    again = tmp_path / "again"
    assert jtrain.main(["--config", str(FIXTURE / "config.json"), "--out", str(again)]) == 0
    assert _same_weights(_weights(again), _weights(FIXTURE))
    old = load_checkpoint(FIXTURE / "checkpoints" / "last.pt")
    new = load_checkpoint(again / "checkpoints" / "last.pt")
    assert torch.equal(old["sampler"]["buffer"]["data"], new["sampler"]["buffer"]["data"])
    mine = json.loads((again / "config.json").read_text())
    theirs = json.loads((FIXTURE / "config.json").read_text())
    # settings added since keep the value that repeats what the old file meant
    added = {k: v for k, v in ADDED_KEYS.items() if k not in theirs}
    assert mine.keys() == theirs.keys() | added.keys()
    assert all(mine[k] == v for k, v in added.items())
    changed = {k for k in theirs if mine[k] != theirs[k]}
    # a repeat is a new run in a new folder; the progress bar is the invocation's
    assert changed == {"out", "config", "run_id", "no_progress"}


def test_an_old_checkpoint_evaluates(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    argv = [
        "--checkpoint",
        str(FIXTURE / "checkpoints" / "last.pt"),
        "--tasks",
        "accuracy,calibration",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert eval_cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert "accuracy" in json.dumps(report)
