"""Tests of the trainer (python -m jem_ext.train) on tiny runs."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_runs import TOY

from jem_ext import objectives
from jem_ext import train as jtrain
from jem_ext.checkpoint import load_checkpoint, save_checkpoint
from jem_ext.training import loop
from jem_ext.training.guard import (
    SPLIT_FRACTION,
    SPLIT_PATIENCE,
    DivergenceGuard,
    SplitWatch,
    Verdict,
    split_message,
)
from jem_ext.training.options import OptimOptions
from jem_ext.training.runlog import Progress, SampleGrids
from jem_ext.training.saver import CheckpointSaver
from jem_ext.training.state import RunState

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str]) -> int:
    return jtrain.main(argv)


def _final_params(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        jtrain.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--dataset",
        "--data-root",
        "--model",
        "--depth",
        "--width",
        "--norm",
        "--dropout",
        "--objective",
        "--w-px",
        "--w-pyx",
        "--l2-energy",
        "--labels-per-class",
        "--sgld-steps",
        "--sgld-step-size",
        "--sgld-noise",
        "--buffer-size",
        "--reinit-prob",
        "--init",
        "--proximal",
        "--grad-clip",
        "--optimizer",
        "--lr",
        "--warmup-iters",
        "--decay-epochs",
        "--decay-rate",
        "--batch-size",
        "--epochs",
        "--seed",
        "--device",
        "--out",
        "--config",
        "--resume",
        "--log-every",
        "--ckpt-every",
        "--sample-every",
        "--eval-every",
        "--max-recoveries",
        "--divergence-threshold",
        "--recover-lr-factor",
        "--no-progress",
        "--threads",
    ):
        assert flag in text, flag
    assert "debug" not in text.lower()  # test hooks are not flags
    assert "(default: None)" not in text and text.count("(default: all labels)") == 1
    # every action has help text
    for action in jtrain.build_parser()._actions:
        assert action.help, action.dest


def test_digits_end_to_end_writes_every_file(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "--epochs",
        "1",
        "--sgld-steps",
        "2",
        "--buffer-size",
        "100",
        "--out",
        str(run),
        "--ckpt-every",
        "7",
        "--sample-every",
        "10",
        "--log-every",
        "5",
        "--no-progress",
    ]
    assert _run(argv) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "test accuracy" in last_line and str(run) in last_line
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "digits" and config["objective"] == "jem"
    rows = _rows(run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["iteration"] for r in train_rows] == [5, 10, 15, 20]
    for key in (
        "iteration",
        "epoch",
        "loss",
        "ce",
        "px",
        "energy_data",
        "energy_sample",
        "accuracy",
        "lr",
        "seconds",
    ):
        assert all(key in r for r in train_rows), key
    assert any("val_accuracy" in r for r in rows)
    for name in ("last.pt", "best.pt"):
        raw = torch.load(run / "checkpoints" / name, weights_only=True)
        assert raw["format"] == "jem_ext.checkpoint"
        assert {
            "model_spec",
            "model",
            "optimizer",
            "sampler",
            "rng",
            "iteration",
            "epoch",
            "config",
            "best_val_accuracy",
        } <= set(raw)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 20
    pngs = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert "samples_0000010.png" in pngs and "samples_final.png" in pngs
    summary = json.loads((run / "summary.json").read_text())
    for key in ("test_accuracy", "val_accuracy", "iterations", "seconds", "best_checkpoint"):
        assert key in summary, key
    assert summary["iterations"] == 20 and summary["status"] == "completed"
    assert Path(summary["best_checkpoint"]).is_file()
    assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_toy_ce_writes_scatter_png(tmp_path):
    run = tmp_path / "ce"
    assert _run(TOY + ["--objective", "ce", "--epochs", "1", "--out", str(run)]) == 0
    assert list((run / "samples").glob("*.png"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objective"] == "ce" and summary["iterations"] == 32
    rows = [r for r in _rows(run) if "loss" in r]
    assert rows and rows[0]["energy_sample"] is None  # not computed by CE, written as null


def test_config_repeats_run_and_flags_override(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _run(TOY + ["--epochs", "1", "--seed", "3", "--out", str(a)]) == 0
    assert _run(["--config", str(a / "config.json"), "--out", str(b)]) == 0
    pa, pb = _final_params(a), _final_params(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0)
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sa["test_accuracy"] == sb["test_accuracy"]
    assert _run(["--config", str(a / "config.json"), "--out", str(c), "--seed", "4"]) == 0
    cfg_c = json.loads((c / "config.json").read_text())
    assert cfg_c["seed"] == 4 and cfg_c["dataset"] == "moons" and cfg_c["sgld_steps"] == 2


class _Interrupt(BaseException):
    """Stands in for the process being killed."""


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    args = TOY + ["--epochs", "2", "--ckpt-every", "7", "--seed", "5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _run(args + ["--out", str(full)]) == 0

    real_lr = loop.learning_rate

    def dying_lr(cfg, iteration, epoch, scale=1.0):
        if iteration == 45:  # 2nd epoch, mid-way; the last checkpoint is at iteration 42
            raise _Interrupt()
        return real_lr(cfg, iteration, epoch, scale)

    monkeypatch.setattr(loop, "learning_rate", dying_lr)
    with pytest.raises(_Interrupt):
        _run(args + ["--out", str(cut)])
    monkeypatch.setattr(loop, "learning_rate", real_lr)
    state = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert state["iteration"] == 42 and state["epoch"] == 1
    assert not (cut / "summary.json").exists()

    assert _run(["--resume", str(cut)]) == 0
    pf, pc = _final_params(full), _final_params(cut)
    for k in pf:
        torch.testing.assert_close(pc[k], pf[k], rtol=0, atol=1e-6)
    sf = json.loads((full / "summary.json").read_text())
    sc = json.loads((cut / "summary.json").read_text())
    assert sc["iterations"] == sf["iterations"] == 64
    assert sc["test_accuracy"] == sf["test_accuracy"]

    # The metrics of the resumed run match the uninterrupted one row for row (times and the
    # resume's own event row aside).
    def strip(rows):
        return [
            {k: v for k, v in r.items() if k != "seconds"}
            for r in rows
            if r.get("event") != "resume"
        ]

    assert strip(_rows(cut)) == strip(_rows(full))


@pytest.fixture
def bad_loss(monkeypatch):
    """Arm ``bad_loss(iterations, **terms)``: the training loss of those (0-based) iterations
    gets the given term values (default: a NaN loss). Counts the objective's calls, which are
    one per iteration in a fresh run."""

    def arm(iterations, **bad_terms):
        real = objectives.batch_loss
        calls = itertools.count()
        bad_terms = bad_terms or {"loss": float("nan")}

        def corrupted(*args, **kwargs):
            loss, terms = real(*args, **kwargs)
            if next(calls) in iterations:
                if "loss" in bad_terms:
                    loss = loss * 0 + bad_terms["loss"]
                terms = {**terms, **bad_terms}
            return loss, terms

        monkeypatch.setattr(objectives, "batch_loss", corrupted)

    return arm


def test_injected_divergence_is_recovered_and_logged(tmp_path, bad_loss):
    run = tmp_path / "nan"
    bad_loss({10})
    assert (
        _run(
            TOY
            + [
                "--epochs",
                "1",
                "--ckpt-every",
                "4",
                "--recover-lr-factor",
                "0.25",
                "--lr",
                "1e-3",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    events = [r for r in _rows(run) if r.get("event")]
    assert len(events) == 1
    ev = events[0]
    assert ev["event"] == "recovery" and ev["iteration"] == 10 and "non-finite" in ev["reason"]
    assert ev["lr_scale"] == 0.25
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recoveries"] == 1 and summary["status"] == "completed"
    lrs = {r["iteration"]: r["lr"] for r in _rows(run) if "lr" in r}
    # warm-up of 5 iterations is over: lr is the peak lr before and a quarter of it after
    assert lrs[9] == pytest.approx(1e-3) and lrs[12] == pytest.approx(0.25e-3)
    params = _final_params(run)
    assert all(torch.isfinite(v).all() for v in params.values())


def test_max_recoveries_stops_with_clear_message(tmp_path, capsys, bad_loss):
    run = tmp_path / "nan"
    bad_loss({3, 4, 5})
    code = _run(TOY + ["--epochs", "1", "--max-recoveries", "2", "--out", str(run)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged at iteration 5")
    assert "after 2 recoveries" in err
    events = [(r["event"], r["recoveries"]) for r in _rows(run) if r.get("event")]
    assert events == [("recovery", 1), ("recovery", 2), ("stopped", 2)]
    summary = json.loads((run / "summary.json").read_text())
    # one count everywhere: the message, the stopped row and summary.json
    assert summary["status"] == "diverged" and summary["recoveries"] == 2


def test_energy_gap_triggers_recovery(tmp_path, bad_loss):
    run = tmp_path / "gap"
    # A finite, small loss with an energy gap far above the threshold: only the gap branch fires.
    bad_loss({6}, loss=0.5, energy_data=-3.0, energy_sample=2e3)
    assert (
        _run(
            TOY
            + [
                "--epochs",
                "1",
                "--max-recoveries",
                "0",
                "--divergence-threshold",
                "1e3",
                "--out",
                str(run),
            ]
        )
        == 1
    )
    stopped = [r for r in _rows(run) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["iteration"] == 6
    assert stopped[0]["reason"].startswith("energy gap")


@pytest.mark.parametrize(
    "terms, verdict",
    [
        ({"loss": 1.0, "energy_data": 0.0, "energy_sample": 1.0}, None),
        ({"loss": float("nan"), "energy_data": 0.0, "energy_sample": 1.0}, "non-finite loss"),
        ({"loss": float("-inf"), "energy_data": 0.0, "energy_sample": 1.0}, "non-finite loss"),
        ({"loss": -20.0, "energy_data": 0.0, "energy_sample": 1.0}, "|loss|"),
        ({"loss": 1.0, "energy_data": -6.0, "energy_sample": 5.0}, "energy gap"),
        ({"loss": 1.0, "energy_data": float("inf"), "energy_sample": 5.0}, "energy gap"),
    ],
)
def test_guard_verdicts(terms, verdict):
    guard = DivergenceGuard(threshold=10.0, max_recoveries=1, lr_factor=0.5)
    got = guard.check(terms)
    assert (got is None) if verdict is None else got.startswith(verdict)
    # the CE objective has no energy gap to check
    ce = DivergenceGuard(threshold=10.0, max_recoveries=1, lr_factor=0.5, check_gap=False)
    if verdict == "energy gap":
        assert ce.check(terms) is None


def test_guard_verdict_recovers_until_the_limit_then_stops_and_changes_nothing():
    guard = DivergenceGuard(threshold=10.0, max_recoveries=2, lr_factor=0.5)
    state = RunState()
    assert guard.verdict(state, "why") == Verdict("why", stop=False, recoveries=1, lr_scale=0.5)
    assert (state.recoveries, state.lr_scale) == (0, 1.0)  # the loop acts, not the guard
    state.recoveries, state.lr_scale = 1, 0.5
    assert guard.verdict(state, "b") == Verdict("b", stop=False, recoveries=2, lr_scale=0.25)
    state.recoveries, state.lr_scale = 2, 0.25
    assert guard.verdict(state, "c") == Verdict("c", stop=True, recoveries=2, lr_scale=0.25)


def _epoch_hooks(run, tmp_path, log_rows):
    """Hooks of a run trained outside :func:`loop.train`: a saver in ``tmp_path``, the log's
    rows in ``log_rows``, no progress line."""

    class Log:
        def write(self, row):
            log_rows.append(row)

    cfg = run.cfg
    progress = Progress(1, 0, "test", enabled=False)
    saver = CheckpointSaver(tmp_path / "checkpoints")
    grids = SampleGrids(tmp_path / "samples", run.data.train, cfg.chain.spec(), cfg.optim.seed)
    return loop.Hooks(
        DivergenceGuard.from_config(cfg.guard, cfg.generative),
        SplitWatch.from_config(cfg.objective.l2_energy, cfg.generative),
        saver,
        Log(),
        progress,
        grids,
        run.elapsed,
    )


def test_train_one_epoch_takes_its_hooks_and_returns_the_epochs_metrics(tmp_path, monkeypatch):
    cfg = jtrain.config_from_args(TOY + ["--epochs", "1", "--out", str(tmp_path / "run")])
    run = jtrain.build_run(cfg)
    rows, seen = [], []
    hooks = _epoch_hooks(run, tmp_path, rows)
    hooks.saver.save_last(loop.checkpoint_state(run))
    real_step = loop.train_step

    def recording_step(ctx, batch, weights):
        terms, x_q = real_step(ctx, batch, weights)
        seen.append(terms)
        return terms, x_q

    monkeypatch.setattr(loop, "train_step", recording_step)
    metrics = loop.train_one_epoch(
        run.ctx, run.data, run.objective, run.cfg, run.state, run.generators, hooks
    )
    n = run.steps_per_epoch
    assert metrics["iterations"] == n == len(seen) == run.state.iteration
    assert metrics["recoveries"] == 0
    for key in ("loss", "energy_data", "energy_sample"):
        assert metrics[key] == pytest.approx(sum(t[key] for t in seen) / n)
    assert [r["iteration"] for r in rows] == list(range(1, n + 1))  # --log-every 1
    val = loop.validate(run.ctx.model_for_chain, run.data.val, run.dist)
    assert val == {"accuracy": jtrain.accuracy(run.ctx.model_for_chain, run.data.val)}
    assert loop.end_of_epoch(run, hooks) == val
    assert rows[-1]["val_accuracy"] == val["accuracy"] and run.state.epoch == 1
    assert hooks.saver.best_path.is_file() and hooks.saver.last_path.is_file()


def test_train_one_epoch_reads_the_data_and_generators_it_is_given(tmp_path):
    """Two runs built alike train alike; with another seed in the augmentation's generator,
    an epoch trains otherwise: it reads its arguments, not a run of its own."""
    tiny = ["--model", "small_cnn", "--width", "4", "--sgld-steps", "1", "--buffer-size", "100"]
    argv = tiny + ["--no-progress", "--log-every", "1", "--sample-every", "0"]
    argv += ["--out", str(tmp_path / "run")]
    runs = [jtrain.build_run(jtrain.config_from_args(argv)) for _ in range(3)]
    runs[2].generators["augment"].manual_seed(12345)
    results = []
    for k, run in enumerate(runs):
        hooks = _epoch_hooks(run, tmp_path / str(k), [])
        args = (run.ctx, run.data, run.objective, run.cfg, run.state, run.generators, hooks)
        results.append(loop.train_one_epoch(*args))
    assert results[0] == results[1]
    assert results[2] != results[0]


def test_sample_grids_draw_the_latest_samples_or_chains_from_noise(tmp_path):
    cfg = jtrain.config_from_args(TOY + ["--out", str(tmp_path / "run")])
    run = jtrain.build_run(cfg)
    grids = SampleGrids(tmp_path, run.data.train, cfg.chain.spec(), cfg.optim.seed)
    grids.write("noise", run.ctx.model_for_chain, 3)  # nothing sampled yet: chains from noise
    grids.latest = run.data.train.x[:16]
    grids.write("latest", run.ctx.model_for_chain, 4)
    assert (tmp_path / "samples_noise.png").is_file() and (
        tmp_path / "samples_latest.png"
    ).is_file()
    quiet = SampleGrids(tmp_path / "off", run.data.train, cfg.chain.spec(), 1, enabled=False)
    quiet.write("x", run.ctx.model_for_chain, 1)
    assert not (tmp_path / "off").exists()


def test_intact_folder_stops_a_run_whose_folder_was_replaced(tmp_path):
    from jem_ext.training.folder import IntactFolder, RunFolderLost, folder_identity

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    check = IntactFolder(run_dir, folder_identity(run_dir))
    check.check()
    IntactFolder().check()  # a folder not opened yet: nothing to check
    (run_dir / "config.json").unlink()
    run_dir.rmdir()
    run_dir.mkdir()
    with pytest.raises(RunFolderLost, match="was removed"):
        check.check()


def _watch(watch, state, terms, w_px, rows):
    """One iteration of the split watch; the event rows it returns go to ``rows``."""
    row = watch.check(state, terms, w_px)
    if row is not None:
        rows.append(row)


def _split_terms(w_px: float, l2: float, fraction: float) -> dict[str, float]:
    half = fraction * w_px / l2 / 2
    return {"loss": 0.0, "energy_data": -half, "energy_sample": half}


def test_split_watch_reports_a_gap_held_at_the_penalty_bound_once():
    watch = SplitWatch.from_config(0.01, generative=True)
    state, rows = RunState(), []
    near = _split_terms(1.0, 0.01, SPLIT_FRACTION + 0.05)  # gap 85 of the bound 100
    for it in range(SPLIT_PATIENCE - 1):
        state.iteration = it
        _watch(watch, state, near, 1.0, rows)
    _watch(watch, state, _split_terms(1.0, 0.01, 0.5), 1.0, rows)  # back: the count restarts
    for _ in range(SPLIT_PATIENCE - 1):
        _watch(watch, state, near, 1.0, rows)
    assert rows == [] and state.split_at == -1
    state.iteration = 500
    _watch(watch, state, near, 1.0, rows)
    assert state.split_at == 500
    (row,) = rows
    assert row["event"] == "energy_split" and row["bound"] == pytest.approx(100.0)
    assert row["iteration"] == 500 and row["energy_data"] == near["energy_data"]
    note = split_message(row["iteration"], row["energy_data"], row["energy_sample"])
    assert "no longer reach the data" in note and "iteration 500" in note
    for _ in range(3 * SPLIT_PATIENCE):  # reported once
        _watch(watch, state, near, 1.0, rows)
    assert len(rows) == 1


def test_split_watch_bound_follows_the_px_weight_and_is_off_without_a_penalty():
    watch = SplitWatch.from_config(0.01, generative=True)
    state, rows = RunState(), []
    at_small_weight = _split_terms(0.1, 0.01, 0.9)  # gap 9 of the bound 10 after a decay to 0.1
    for _ in range(SPLIT_PATIENCE):
        _watch(watch, state, at_small_weight, 1.0, rows)  # the bound at weight 1 is 100: no split
    assert rows == []
    for _ in range(SPLIT_PATIENCE):
        _watch(watch, state, at_small_weight, 0.1, rows)
    assert len(rows) == 1
    for l2_energy, generative in ((0.0, True), (0.01, False)):  # no penalty; the ce objective
        off = SplitWatch.from_config(l2_energy, generative)
        state, rows = RunState(), []
        for _ in range(2 * SPLIT_PATIENCE):
            _watch(
                watch=off,
                state=state,
                terms={"loss": 0.0, "energy_data": -1e3, "energy_sample": 1e3},
                w_px=1.0,
                rows=rows,
            )
        assert rows == [] and state.split_at == -1


def test_training_reports_a_split_in_the_log_and_the_summary(tmp_path, monkeypatch):
    # A step whose logged energies sit at the bound from the start (w_px 1, l2 0.01: gap 100).
    real_step = loop.train_step

    def split_step(ctx, batch, weights):
        terms, x_q = real_step(ctx, batch, weights)
        return {**terms, "energy_data": -45.0, "energy_sample": 45.0}, x_q

    monkeypatch.setattr(loop, "train_step", split_step)
    run = tmp_path / "run"
    argv = [*TOY, "--l2-energy", "0.01", "--max-iters", str(SPLIT_PATIENCE + 5)]
    assert jtrain.main([*argv, "--out", str(run)]) == 0
    events = [r for r in _rows(run) if r.get("event") == "energy_split"]
    assert len(events) == 1 and events[0]["iteration"] == SPLIT_PATIENCE
    summary = json.loads((run / "summary.json").read_text())
    assert summary["energy_split_at"] == SPLIT_PATIENCE
    # a resumed run keeps the report (and does not repeat it)
    assert jtrain.main(["--resume", str(run), "--max-iters", str(SPLIT_PATIENCE + 10)]) == 0
    assert json.loads((run / "summary.json").read_text())["energy_split_at"] == SPLIT_PATIENCE
    assert len([r for r in _rows(run) if r.get("event") == "energy_split"]) == 1


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jem_ext.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_data_folder_cli_exit_2_no_traceback(tmp_path):
    out = tmp_path / "run"
    proc = _cli(
        "--dataset",
        "folder",
        "--data-root",
        str(tmp_path / "nope"),
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_malformed_data_folder(tmp_path, capsys):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    assert _run(["--dataset", "folder", "--data-root", str(root), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not out.exists()


def test_corrupt_and_foreign_checkpoint_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(TOY + ["--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    last = run / "checkpoints" / "last.pt"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    last.write_bytes(last.read_bytes()[:1000])
    assert _run(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "corrupt or truncated" in err
    torch.save({"weights": torch.zeros(3)}, last)
    assert _run(["--resume", str(run)]) == 2
    assert "not a jem_ext checkpoint" in capsys.readouterr().err
    # a jem_ext checkpoint of another model
    save_checkpoint(
        last,
        {"model": {"w": torch.zeros(1)}, "optimizer": {}, "rng": {}, "iteration": 0, "epoch": 0},
    )
    assert _run(["--resume", str(run)]) == 2
    assert "does not match" in capsys.readouterr().err
    # nothing but last.pt was touched
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p != last} == {
        p: t for p, t in before.items() if p != last
    }


def test_corrupt_checkpoint_cli_no_traceback(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"dataset": "moons", "model": "mlp"}))
    (run / "checkpoints" / "last.pt").write_bytes(b"\x00garbage")
    proc = _cli("--resume", str(run), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"dataset": "moons", "bogus": 1}', "unknown keys"),
        ('{"epochs": "ten"}', "key 'epochs': expected an integer"),
        ('{"dataset": "mnist"}', "key 'dataset': expected one of"),
    ],
)
def test_bad_config_file(tmp_path, capsys, content, message):
    cfg = tmp_path / "config.json"
    if content is not None:
        cfg.write_text(content)
    out = tmp_path / "run"
    assert _run(["--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_out_folder_not_empty_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert _run(TOY + ["--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_learning_rate_schedule():
    cfg = OptimOptions(lr=1.0, warmup_iters=10, decay_epochs=(3, 5), decay_rate=0.1)
    assert jtrain.learning_rate(cfg, 0, 0) == pytest.approx(0.1)
    assert jtrain.learning_rate(cfg, 9, 0) == pytest.approx(1.0)
    assert jtrain.learning_rate(cfg, 100, 3) == pytest.approx(0.1)
    assert jtrain.learning_rate(cfg, 100, 5, scale=0.5) == pytest.approx(0.005)


@pytest.mark.parametrize(
    "extra",
    [
        ["--objective", "factored"],
        ["--init", "gaussian", "--buffer-size", "0"],
        ["--proximal", "--labels-per-class", "5", "--optimizer", "sgd", "--decay-epochs", "1"],
    ],
)
def test_sampler_and_objective_variants_run(tmp_path, extra):
    run = tmp_path / "v"
    assert _run(TOY + ["--epochs", "1", "--out", str(run)] + extra) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["iterations"] == 32
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["config"]["objective"] == (extra[1] if extra[0] == "--objective" else "jem")
    if "--buffer-size" in extra:
        assert state["sampler"]["buffer"] is None
    rows = [r for r in _rows(run) if "loss" in r]
    assert rows and all(r["loss"] is not None for r in rows)


def test_toy_set_with_image_model_is_a_clear_error(tmp_path, capsys):
    assert _run(["--dataset", "moons", "--model", "small_cnn", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model:") and "--model mlp" in err
    assert not (tmp_path / "r").exists()


def test_train_function_in_process(tmp_path):
    cfg = {
        "dataset": "gmm",
        "model": "mlp",
        "width": 16,
        "depth": 2,
        "sgld_steps": 2,
        "buffer_size": 64,
        "epochs": 1,
        "batch_size": 128,
        "no_progress": True,
        "sample_every": 0,
        "out": str(tmp_path / "fn"),
    }
    summary = jtrain.train(cfg)
    assert summary["iterations"] == 16 and summary["status"] == "completed"
    assert json.loads((tmp_path / "fn" / "summary.json").read_text()) == summary
    assert json.loads((tmp_path / "fn" / "config.json").read_text())["sgld_steps"] == 2


def test_resume_with_incompatible_override_is_clear(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(TOY + ["--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    metrics_before = (run / "metrics.jsonl").read_text()
    assert _run(["--resume", str(run), "--buffer-size", "50"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the checkpoint does not fit")
    assert (run / "metrics.jsonl").read_text() == metrics_before
