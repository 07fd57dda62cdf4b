"""Watching a run: curves.png in every finished, budget-stopped, diverged or interrupted run
folder, and --tensorboard's event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
from toy_runs import TOY

from jem_ext import train as jtrain
from jem_ext.training import cli, loop, trainer
from jem_ext.training.curves import write_curves

# 32 iterations an epoch; metrics every iteration
FAST = [*TOY, "--threads", "1"]
# digits (8x8 images, so sample grids are pictures): 20 iterations an epoch of 64
DIGITS = [
    "--model", "small_cnn", "--width", "4", "--batch-size", "64", "--sgld-steps", "2",
    "--buffer-size", "200", "--warmup-iters", "2", "--no-progress", "--log-every", "2",
    "--threads", "1", "--seed", "3",
]  # fmt: skip


@pytest.fixture
def curves_calls(monkeypatch) -> list[tuple[str, str]]:
    """Spy on the curves writer: each call's (run folder, status); the files are written."""
    calls = []

    def spy(run_dir, status=None, out=None):
        calls.append((str(run_dir), status))
        return write_curves(run_dir, status, out)

    monkeypatch.setattr(trainer, "write_curves", spy)
    monkeypatch.setattr(cli, "write_curves", spy)
    return calls


def test_finished_and_budget_stopped_runs_get_curves(tmp_path, curves_calls):
    done, budget = tmp_path / "done", tmp_path / "budget"
    assert jtrain.main([*FAST, "--epochs", "1", "--out", str(done)]) == 0
    assert jtrain.main([*FAST, "--epochs", "2", "--max-iters", "20", "--out", str(budget)]) == 0
    assert curves_calls == [(str(done), "completed"), (str(budget), "budget")]
    for run in (done, budget):
        assert (run / "curves.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (budget / "metrics.jsonl").read_text().splitlines()]
    assert all("w_px" in r and "lr" in r for r in rows if "loss" in r)  # drawn against iterations


def test_a_diverged_run_gets_curves(tmp_path, curves_calls, monkeypatch):
    run = tmp_path / "nan"
    real = loop.train_step

    def nan_step(ctx, batch, weights):
        terms, x_q = real(ctx, batch, weights)
        return {**terms, "loss": float("nan")}, x_q

    monkeypatch.setattr(loop, "train_step", nan_step)
    assert jtrain.main([*FAST, "--epochs", "1", "--max-recoveries", "0", "--out", str(run)]) == 1
    assert curves_calls == [(str(run), "diverged")]
    assert (run / "curves.png").is_file()


def test_an_interrupted_run_gets_curves(tmp_path, curves_calls, monkeypatch):
    real = loop.learning_rate

    def interrupted(cfg, iteration, epoch, scale=1.0):
        if iteration == 20:  # after the checkpoint at iteration 16
            raise KeyboardInterrupt
        return real(cfg, iteration, epoch, scale)

    monkeypatch.setattr(loop, "learning_rate", interrupted)
    run = tmp_path / "cut"
    assert jtrain.main([*FAST, "--epochs", "2", "--ckpt-every", "8", "--out", str(run)]) == 130
    assert curves_calls == [(str(run), "interrupted")]
    assert (run / "curves.png").is_file() and not (run / "summary.json").exists()

    # the resumed run's curves mark the resume
    monkeypatch.setattr(loop, "learning_rate", real)
    assert jtrain.main(["--resume", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r.get("event") == "resume"] == [16]
    assert curves_calls[-1] == (str(run), "completed")


def test_sigterm_mid_run_gets_curves(tmp_path, curves_calls, monkeypatch):
    real = loop.learning_rate

    def terminated(cfg, iteration, epoch, scale=1.0):
        if iteration == 20:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises at the next bytecode
        return real(cfg, iteration, epoch, scale)

    monkeypatch.setattr(loop, "learning_rate", terminated)
    run = tmp_path / "term"
    assert jtrain.main([*FAST, "--epochs", "2", "--ckpt-every", "8", "--out", str(run)]) == 143
    assert curves_calls == [(str(run), "terminated")]
    assert (run / "curves.png").is_file()


def test_an_interruption_before_the_first_checkpoint_leaves_no_folder(
    tmp_path, curves_calls, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_run", interrupted)
    run = tmp_path / "r"
    assert jtrain.main([*FAST, "--out", str(run)]) == 130
    assert curves_calls == [] and not run.exists()


def _accumulator(folder):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(
        str(folder), size_guidance={"scalars": 0, "images": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


TRAIN_SCALARS = {
    "train/loss", "train/ce", "train/px", "train/energy_data", "train/energy_sample",
    "train/accuracy", "train/lr", "train/w_px",
}  # fmt: skip


def test_tensorboard_event_files_hold_scalars_images_and_histograms(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    run = tmp_path / "tb"
    real = loop.learning_rate

    def interrupted(cfg, iteration, epoch, scale=1.0):
        if iteration == 30:  # after the checkpoint at iteration 20 (end of epoch 1)
            raise KeyboardInterrupt
        return real(cfg, iteration, epoch, scale)

    monkeypatch.setattr(loop, "learning_rate", interrupted)
    argv = [*DIGITS, "--epochs", "2", "--sample-every", "10", "--ckpt-every", "0"]
    assert jtrain.main([*argv, "--tensorboard", "--out", str(run)]) == 130
    monkeypatch.setattr(loop, "learning_rate", real)
    assert jtrain.main(["--resume", str(run)]) == 0
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2

    acc = _accumulator(run / "tensorboard")
    tags = acc.Tags()
    assert TRAIN_SCALARS | {"val/accuracy"} <= set(tags["scalars"])
    # every logged row once, at its iteration: what the interrupted run logged after its
    # checkpoint (iterations 22..28) is dropped, as metrics.jsonl is cut back
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["iteration"] for r in rows if "loss" in r]
    assert logged == list(range(2, 41, 2))
    assert [e.step for e in acc.Scalars("train/loss")] == logged
    by_step = {e.step: e.value for e in acc.Scalars("train/w_px")}
    assert by_step == {r["iteration"]: r["w_px"] for r in rows if "loss" in r}
    assert [e.step for e in acc.Scalars("val/accuracy")] == [20, 40]
    assert set(tags["histograms"]) == {"energy/data", "energy/samples"}
    assert [h.step for h in acc.Histograms("energy/samples")] == logged
    assert acc.Histograms("energy/data")[0].histogram_value.num == 64
    images = acc.Images("samples")
    assert [i.step for i in images] == [10, 20, 30, 40, 40]  # every 10 iterations, and final
    assert images[0].width > 8 and images[0].height > 8
    assert "resume at iteration 20" in str(acc.Tensors("events/text_summary")[0].tensor_proto)


def test_missing_tensorboard_is_refused_before_a_run_folder_exists(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    run = tmp_path / "tb"
    assert jtrain.main([*FAST, "--tensorboard", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'jem_ext[tensorboard]'" in err
    assert err.startswith("error: --tensorboard: ")
    assert not run.exists()


def test_without_the_flag_nothing_is_written_for_tensorboard(tmp_path):
    run = tmp_path / "plain"
    assert jtrain.main([*FAST, "--epochs", "1", "--out", str(run)]) == 0
    assert not (run / "tensorboard").exists()
