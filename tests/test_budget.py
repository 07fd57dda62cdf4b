"""Budgets: --max-iters / --max-minutes stop a run cleanly, and --resume with a larger budget
continues it exactly (SAM's optimiser state included)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_runs import TOY as TOY_BASE

from jem_ext import train as jtrain
from jem_ext.checkpoint import load_checkpoint
from jem_ext.training.loop import budget_reason
from jem_ext.training.options import BudgetOptions

TOY = [*TOY_BASE, "--ckpt-every", "0"]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _params(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_budget_reason():
    assert budget_reason(BudgetOptions(), 10**6, 1e9) is None
    assert budget_reason(BudgetOptions(max_iters=5), 4, 0.0) is None
    assert "--max-iters 5" in budget_reason(BudgetOptions(max_iters=5), 5, 0.0)
    assert budget_reason(BudgetOptions(max_minutes=0.5), 3, 29.9) is None
    assert "--max-minutes 0.5" in budget_reason(BudgetOptions(max_minutes=0.5), 3, 30.0)


def test_max_iters_stops_with_a_complete_run_folder(tmp_path, capsys):
    run = tmp_path / "r"
    assert jtrain.main(TOY + ["--epochs", "3", "--max-iters", "40", "--out", str(run)]) == 0
    summary = _summary(run)
    assert summary["status"] == "budget" and summary["error"] is None
    assert "--max-iters 40" in summary["stop_reason"]
    assert summary["iterations"] == 40 and summary["epochs"] == 1
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["iteration"], state["epoch"], state["progress"]["pos"]) == (40, 1, 8)
    assert (run / "samples" / "samples_final.png").is_file()
    assert "stopped early, reached --max-iters 40" in capsys.readouterr().out


@pytest.mark.parametrize("sam", [[], ["--optimizer", "sgd", "--sam-rho", "0.5", "--sam-adaptive"]])
def test_resume_with_a_larger_budget_equals_the_uninterrupted_run(tmp_path, sam):
    args = TOY + ["--epochs", "2", "--seed", "7"] + sam
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert jtrain.main(args + ["--out", str(full)]) == 0
    assert jtrain.main(args + ["--max-iters", "21", "--out", str(cut)]) == 0
    assert _summary(cut)["status"] == "budget"
    # the same budget again: nothing more to train, the folder stays complete
    assert jtrain.main(["--resume", str(cut)]) == 0
    assert _summary(cut)["iterations"] == 21
    assert jtrain.main(["--resume", str(cut), "--max-iters", "64"]) == 0
    assert _summary(cut)["status"] == "completed" and _summary(cut)["iterations"] == 64
    pf, pc = _params(full), _params(cut)
    for k in pf:
        torch.testing.assert_close(pc[k], pf[k], rtol=0, atol=1e-6)
    assert _summary(cut)["test_accuracy"] == _summary(full)["test_accuracy"]


def test_max_minutes_stops_with_a_complete_run_folder(tmp_path):
    run = tmp_path / "r"
    assert jtrain.main(TOY + ["--epochs", "50", "--max-minutes", "0.001", "--out", str(run)]) == 0
    summary = _summary(run)
    assert summary["status"] == "budget" and "--max-minutes 0.001" in summary["stop_reason"]
    assert summary["iterations"] < 50 * 32
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == summary["iterations"]
    assert (run / "samples" / "samples_final.png").is_file()


@pytest.mark.parametrize(
    "flag,value",
    [("--max-iters", "0"), ("--max-minutes", "0"), ("--max-minutes", "-1"), ("--max-iters", "x")],
)
def test_bad_budget_is_a_one_line_error(tmp_path, capsys, flag, value):
    assert jtrain.main(TOY + [flag, value, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and flag in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def _cifar_budget():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar_budget.py"
    spec = importlib.util.spec_from_file_location("cifar_budget", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cifar_budget_smoke_writes_one_results_folder(tmp_path):
    bench = _cifar_budget()
    out = tmp_path / "out"
    assert bench.main(["--smoke", "--configs", "sadajem,ce", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in results["rows"]}
    assert set(rows) == {"sadajem", "ce"}
    for name, row in rows.items():
        assert row["status"] == "budget" and row["iterations"] == 2
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["ece"] <= 1.0
        assert set(row["auroc"]) == {"uniform", "gaussian", "constant", "interp"}
        assert set(row["auroc"]["uniform"]) == {"logpx", "maxprob", "approx_mass"}
        assert f"{name}/logpx_hist.png" in row["files"]
        assert (out / name / "report.json").is_file()
    assert rows["sadajem"]["energy_sample"] is not None and rows["ce"]["energy_sample"] is None
    # the CE twin judges the JEM configuration, not itself
    judged = rows["sadajem"]
    assert 0.0 <= judged["judge_conditional_accuracy"] <= 1.0
    assert 0.0 <= judged["judge_start_accuracy"] <= 1.0
    assert judged["fid_fresh"] is not None and judged["fid_buffer"] is not None
    assert judged["gen_init"] == "per-class Gaussians of the run"  # sadajem: --init gaussian
    assert rows["ce"]["judge_conditional_accuracy"] is None and rows["ce"]["fid_fresh"] is None
    report = json.loads((out / "sadajem" / "report.json").read_text())
    assert report["generation"]["judge"].endswith("ce/checkpoints/last.pt")
    assert any(f.startswith("sadajem/samples_") for f in rows["sadajem"]["files"])
    table = (out / "results.md").read_text()
    assert "| sadajem | budget | 2 |" in table and "| ce | budget | 2 |" in table
    assert "| sadajem | per-class Gaussians of the run | - |" in table  # the judged rows


def test_cifar_budget_refuses_a_missing_judge(tmp_path, capsys):
    argv = ["--smoke", "--judge", str(tmp_path / "no.pt"), "--out", str(tmp_path / "o")]
    assert _cifar_budget().main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --judge") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cifar_budget_refuses_a_run_trained_past_the_budget(tmp_path, capsys):
    # an hour-long run must not be reported as a 15-minute one
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
    run = tmp_path / "runs" / "ce"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "budget", "seconds": 3600.0}))
    argv = ["--data-root", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]
    argv += ["--configs", "ce", "--minutes", "15", "--out", str(tmp_path / "o")]
    assert _cifar_budget().main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --minutes 15") and "60.0 minutes" in err
    assert not (tmp_path / "o").exists()


def test_cifar_budget_side_by_side_jobs_write_the_same_results(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar_budget.py"
    out = tmp_path / "out"
    argv = ["--smoke", "--jobs", "2", "--configs", "sadajem,ce", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["jobs"] == 2
    assert [r["config"] for r in results["rows"]] == ["sadajem", "ce"]  # the order asked for
    assert all(r["iterations"] == 2 for r in results["rows"])


@pytest.mark.parametrize(
    "status,seconds,minutes,extend",
    [
        ("budget", 900.4, 15, False),  # had its 15 minutes
        ("budget", 900.4, 60, True),  # a 15-minute run asked for an hour continues
        ("budget", 3590.0, 60, False),  # within 1 % of the hour
        ("completed", 100.0, 60, False),  # every epoch trained: nothing to continue
        ("diverged", 100.0, 60, False),
    ],
)
def test_cifar_budget_extends_only_runs_its_budget_stopped_short(status, seconds, minutes, extend):
    summary = {"status": status, "seconds": seconds}
    assert _cifar_budget().stopped_short(summary, minutes) is extend


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--smoke", "--configs", "nope"], "--configs"),
        ([], "--data-root"),
        (["--data-root", "x", "--minutes", "0"], "--minutes"),
        (["--smoke", "--jobs", "0"], "--jobs"),
    ],
)
def test_cifar_budget_bad_input_is_one_line(tmp_path, capsys, argv, flag):
    assert _cifar_budget().main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_two_process_job_stops_together_at_its_time_budget(tmp_path):
    from test_distributed import TINY, launch  # the torchrun-like launcher of the DDP tests

    run = tmp_path / "ddp"
    results = launch(TINY + ["--epochs", "50", "--max-minutes", "0.003", "--out", str(run)])
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    summary = _summary(run)
    assert summary["status"] == "budget" and "--max-minutes 0.003" in summary["stop_reason"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == summary["iterations"]
