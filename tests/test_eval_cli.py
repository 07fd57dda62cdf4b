"""End-to-end tests of ``python -m jem_ext.eval`` (jem_ext.eval.cli and .report) on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trained_runs import train_on_digits

from jem_ext._cli import finite_float
from jem_ext.checkpoint import save_checkpoint
from jem_ext.eval import cli
from jem_ext.eval.settings import BUILTIN_OOD, SCORES, EvalError
from jem_ext.eval.tasks import builtin_ood_sets, ood_scores
from jem_ext.models import build_model, model_spec
from jem_ext.sampler import ReplayBuffer, SGLDSampler

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Small settings: the whole end-to-end run takes a few seconds on a CPU.
FAST = [
    "--max-samples",
    "60",
    "--batch-size",
    "60",
    "--gen-n",
    "20",
    "--gen-steps",
    "2",
    "--robust-n",
    "8",
    "--pgd-steps",
    "1",
    "--robust-refine-steps",
    "1",
    "--robust-chains",
    "1",
    "--pgd-eps",
    "linf=0,0.2",
    "--pgd-eps",
    "l2=0,1",
    "--no-progress",
    "--seed",
    "3",
]


def _save(
    path: Path,
    objective: str,
    in_shape=(1, 8, 8),
    buffer: bool = True,
    train_steps: int = 0,
    seed: int = 0,
    config: dict | None = None,
) -> Path:
    """Save a tiny small_cnn checkpoint (optionally a few CE steps on digits)."""
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, in_shape, width=8)
    if train_steps:
        train_on_digits(model, train_steps)
    sampler = SGLDSampler(n_steps=2, buffer=ReplayBuffer(30, in_shape)) if buffer else None
    save_checkpoint(
        path,
        {
            "model_spec": model_spec(model),
            "model": model.state_dict(),
            "sampler": None if sampler is None else sampler.state_dict(),
            "config": config or {"dataset": "digits", "data_root": None, "objective": objective},
            "iteration": train_steps,
            "best_val_accuracy": None,
        },
    )
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    jem_run = root / "jem_run"
    _save(jem_run / "checkpoints" / "last.pt", "jem", train_steps=30, seed=0)
    ce = _save(root / "ce.pt", "ce", buffer=False, train_steps=30, seed=1)
    big = _save(root / "big.pt", "jem", in_shape=(3, 32, 32), buffer=False)
    foreign = root / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    garbage = root / "garbage.pth"
    garbage.write_bytes(b"not a torch file\n" * 50)
    bad_sampler = _save(root / "bad_sampler.pt", "jem", buffer=False)
    state = torch.load(bad_sampler, weights_only=True)
    state["sampler"] = {"step_size": 1.0, "noise_std": -0.5}
    save_checkpoint(bad_sampler, state)
    return {
        "jem_run": jem_run,
        "ce": ce,
        "big": big,
        "foreign": foreign,
        "garbage": garbage,
        "bad_sampler": bad_sampler,
    }


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_end_to_end_with_compare(ckpts, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = _run(
        [
            "--checkpoint",
            ckpts["jem_run"],
            "--compare",
            ckpts["ce"],
            "--out",
            out_dir,
            "--refine-steps",
            "1",
            "--fid-classifier",
            ckpts["ce"],
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    main_keys = {
        "accuracy",
        "accuracy_refined",
        "ece",
        "calibration",
        "ood",
        "generation",
        "fid",
        "robustness",
    }
    assert main_keys <= report.keys()
    assert main_keys <= report["compare"].keys()
    assert report["label"] == "jem" and report["compare"]["label"] == "ce"
    assert report["checkpoint"].endswith(os.path.join("checkpoints", "last.pt"))
    assert report["dataset"] == "digits" and report["n_test"] == 60
    for r in (report, report["compare"]):
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["ece"] <= 1.0
        assert r["accuracy"] > 0.2  # 30 Adam steps already beat chance (0.1) on digits
        assert r["accuracy_refined"]["steps"] == 1
        assert set(r["ood"]) == set(BUILTIN_OOD)
        for scores in r["ood"].values():
            assert set(scores) == set(SCORES)
            assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert r["fid"]["network"] == "classifier"
        assert r["fid"]["comparable_with_published"] is False
        assert r["fid"]["fid"] >= 0 and r["fid"]["is_mean"] >= 1.0 - 1e-9
        curves = r["robustness"]["curves"]
        assert [e for e, _ in curves["linf"]] == [0.0, 0.2]
        assert [e for e, _ in curves["l2"]] == [0.0, 1.0]
        assert sum(r["calibration"]["counts"]) == 60
    assert report["generation"]["buffer_size"] == 30
    assert "buffer" in report["compare"]["generation"]  # the CE twin has no replay buffer

    expected_png = {
        "reliability.png",
        "logpx_hist.png",
        "logpx_hist_compare.png",
        "robustness_linf.png",
        "robustness_l2.png",
        "samples_uncond.png",
        "samples_cond.png",
        "samples_buffer.png",
        "samples_uncond_compare.png",
        "samples_cond_compare.png",
    }
    files = {p.name for p in out_dir.iterdir()}
    assert files == expected_png | {"report.json", "report.md"}  # no temporary files left
    for name in expected_png:
        assert (out_dir / name).read_bytes()[:8] == PNG_MAGIC, name
    assert set(report["files"]) == files

    md = (out_dir / "report.md").read_text()
    for heading in (
        "## Accuracy and calibration",
        "## OOD detection",
        "## Generation",
        "## IS and FID",
        "## Robustness",
        "### linf",
        "### l2",
    ):
        assert heading in md
    assert "| metric | jem | ce |" in md
    assert "| uniform |" in md and "| interp |" in md
    assert "NOT comparable" in md
    assert "![reliability diagram](reliability.png)" in md
    # The printed summary holds the same tables (without images).
    assert "| metric | jem | ce |" in out and "![" not in out


def test_fid_skipped_without_weights(ckpts, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = _run(
        ["--checkpoint", ckpts["jem_run"], "--tasks", "fid,accuracy", "--out", out_dir, *FAST],
        capsys,
    )
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["tasks"] == ["accuracy", "fid"]
    assert "--inception-weights" in report["fid"]["skipped"]
    assert report["skipped"]["fid"] == report["fid"]["skipped"]
    assert "compare" not in report
    assert "Skipped:" in (out_dir / "report.md").read_text()
    assert "ood" not in report and not list(out_dir.glob("*.png"))


def test_foreign_checkpoint_subprocess(ckpts, tmp_path):
    out_dir = tmp_path / "never"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jem_ext.eval",
            "--checkpoint",
            str(ckpts["foreign"]),
            "--out",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0  # one line
    assert "not a jem_ext checkpoint" in proc.stderr
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "case",
    [
        "model_shape",
        "ood_shape",
        "compare_shape",
        "missing",
        "unknown_task",
        "bad_eps",
        "bad_inception",
        "garbage_inception",
        "negative_noise",
        "nan_step",
        "inf_sigma",
        "nan_pgd_step",
        "bad_sampler",
    ],
)
def test_bad_input_exit_2(ckpts, tmp_path, capsys, case):
    out_dir = tmp_path / "never"
    jem = ckpts["jem_run"]
    argv, needle = {
        "model_shape": (["--checkpoint", ckpts["big"]], "expects (3, 32, 32)"),
        "ood_shape": (["--checkpoint", jem, "--ood", "rings"], "--ood rings"),
        "compare_shape": (["--checkpoint", jem, "--compare", ckpts["big"]], "--compare"),
        "missing": (["--checkpoint", tmp_path / "nope.pt"], "no such"),
        "unknown_task": (
            ["--checkpoint", jem, "--tasks", "accuracy,bogus"],
            "unknown task(s) bogus",
        ),
        "bad_eps": (["--checkpoint", jem, "--pgd-eps", "linf=a"], "--pgd-eps"),
        "bad_inception": (
            ["--checkpoint", jem, "--inception-weights", ckpts["foreign"]],
            "--inception-weights",
        ),
        "garbage_inception": (
            ["--checkpoint", jem, "--inception-weights", ckpts["garbage"]],
            "is not a state_dict file",
        ),
        "negative_noise": (["--checkpoint", jem, "--sgld-noise", "-1"], "--sgld-noise"),
        "nan_step": (["--checkpoint", jem, "--sgld-step-size", "nan"], "finite"),
        "inf_sigma": (["--checkpoint", jem, "--robust-sigma", "inf"], "finite"),
        "nan_pgd_step": (["--checkpoint", jem, "--pgd-step-size", "nan"], "finite"),
        "bad_sampler": (["--checkpoint", ckpts["bad_sampler"]], "SGLD noise must be >= 0"),
    }[case]
    code, out, err = _run([*argv, "--out", out_dir, "--no-progress"], capsys)
    assert code == 2
    assert needle in err and err.startswith("jem_ext.eval: error:")
    assert err.strip().count("\n") == 0 and out == ""
    assert not out_dir.exists()


def test_help_documents_every_flag():
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, action.dest
    text = parser.format_help()
    for flag in (
        "--compare",
        "--tasks",
        "--max-samples",
        "--refine-steps",
        "--ood",
        "--gen-steps",
        "--gen-n",
        "--inception-weights",
        "--fid-classifier",
        "--pgd-norms",
        "--pgd-eps",
        "--pgd-steps",
        "--pgd-step-size",
        "--robust-refine-steps",
        "--robust-chains",
        "--robust-n",
        "--seed",
        "--no-progress",
        "--batch-size",
        "--device",
    ):
        assert flag in text


def test_every_float_flag_refuses_non_finite_values():
    parser = cli.build_parser()
    float_flags = [a for a in parser._actions if a.type in (float, finite_float)]
    assert {a.dest for a in float_flags} >= {
        "sgld_step_size",
        "sgld_noise",
        "pgd_step_size",
        "robust_sigma",
    }
    for action in float_flags:
        assert action.type is finite_float, action.dest
        for text in ("nan", "inf", "-inf", "NaN"):
            with pytest.raises(EvalError):
                cli.parse_settings(
                    ["--checkpoint", "c", "--out", "o", action.option_strings[0], text]
                )


def test_help_states_each_default_once():
    parser = cli.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert text.count("default") <= 1, (action.dest, text)
        assert "(default: None)" not in text and "(default: [])" not in text, action.dest
    help_text = parser.format_help()
    assert "(default: 100)" in help_text and "(default: 0.0)" in help_text  # still shown


def test_fid_skip_listed_once_in_markdown(ckpts, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, _, err = _run(
        ["--checkpoint", ckpts["jem_run"], "--tasks", "fid", "--out", out_dir, *FAST], capsys
    )
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    reason = report["fid"]["skipped"]
    assert (out_dir / "report.md").read_text().count(reason) == 1


def _refuse_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def test_report_json_is_standard_when_figures_are_not_finite(ckpts, tmp_path, capsys, monkeypatch):
    from jem_ext.eval import generation

    monkeypatch.setattr(generation, "_mean_logpx", lambda logits: float("-inf"))
    out_dir = tmp_path / "out"
    code, _, err = _run(
        ["--checkpoint", ckpts["jem_run"], "--tasks", "generation", "--out", out_dir, *FAST], capsys
    )
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text(), parse_constant=_refuse_constant)
    assert report["generation"]["logpx_mean_samples"] is None
    assert "| jem | uniform(-1, 1) | 2 |" in (out_dir / "report.md").read_text()


def test_to_json_text_writes_null_for_non_finite_numbers():
    import numpy as np

    from jem_ext.eval.writers import to_json_text

    text = to_json_text({"a": float("nan"), "b": [np.float64("-inf"), 1.5], "c": {"d": np.inf}})
    assert json.loads(text, parse_constant=_refuse_constant) == {
        "a": None,
        "b": [None, 1.5],
        "c": {"d": None},
    }


def test_builtin_ood_sets_shapes_and_ranges():
    x = torch.rand(12, 1, 8, 8) * 2 - 1
    sets = builtin_ood_sets(x, seed=0)
    assert set(sets) == set(BUILTIN_OOD)
    for name, s in sets.items():
        assert s.shape == x.shape, name
        assert s.min() >= -1 and s.max() <= 1, name
    const = sets["constant"].flatten(1)
    assert torch.all(const == const[:, :1])
    # Each interp image is the mean of two different test images.
    mixed = sets["interp"]
    assert not any(torch.allclose(mixed[i], x[i]) for i in range(len(x)))
    assert builtin_ood_sets(x, seed=0)["uniform"].equal(sets["uniform"])


def test_ood_scores_match_definitions():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, (1, 8, 8), width=8).eval()
    x = torch.rand(7, 1, 8, 8) * 2 - 1
    scores = ood_scores(model, x, batch_size=3)
    logits = model(x).double()
    torch.testing.assert_close(
        torch.from_numpy(scores["logpx"]), torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        torch.from_numpy(scores["maxprob"]),
        torch.softmax(logits, 1).max(1).values,
        rtol=1e-5,
        atol=1e-6,
    )
    xi = x[2:3].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.logsumexp(model(xi), 1).sum(), xi)
    assert scores["approx_mass"][2] == pytest.approx(-g.norm().item(), rel=1e-4)


def _digits_fingerprint(**test_split) -> dict:
    from jem_ext.data import data_fingerprint, load_dataset

    fp = data_fingerprint({s: load_dataset("digits", split=s) for s in ("train", "val", "test")})
    fp["splits"]["test"].update(test_split)
    return fp


def test_report_records_training_data_and_warns_when_it_differs(ckpts, tmp_path, capsys):
    same = _save(
        tmp_path / "same.pt",
        "jem",
        buffer=False,
        config={"dataset": "digits", "objective": "jem", "data_fingerprint": _digits_fingerprint()},
    )
    changed = _save(
        tmp_path / "changed.pt",
        "ce",
        buffer=False,
        config={
            "dataset": "digits",
            "objective": "ce",
            "data_fingerprint": _digits_fingerprint(n=400),
        },
    )
    out_dir = tmp_path / "out"
    argv = ["--checkpoint", same, "--compare", changed, "--tasks", "accuracy", *FAST]
    code, _, err = _run(argv + ["--out", out_dir], capsys)
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["data_fingerprint"]["splits"]["test"]["n"] == 359
    assert report["training_data"]["matches"] is True
    assert report["training_data"]["fingerprint"]["dataset"] == "digits"
    info = report["compare"]["training_data"]
    assert info["matches"] is False
    assert info["differences"] == ["the test split now has 359 samples, was 400"]
    assert len(report["warnings"]) == 2 and err.count("jem_ext.eval: warning: ") == 2
    assert str(changed) in report["warnings"][0] and "differ from its training data" in err
    assert "--compare" in report["warnings"][1] and "trained on other data" in err
    markdown = (out_dir / "report.md").read_text()
    assert all(f"> **Warning:** {w}" in markdown for w in report["warnings"])
    # a checkpoint that recorded no fingerprint: unknown, no warning
    code, _, err = _run(
        ["--checkpoint", ckpts["jem_run"], "--tasks", "accuracy", "--out", tmp_path / "o", *FAST],
        capsys,
    )
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert code == 0 and report["training_data"]["matches"] is None and report["warnings"] == []


def test_compare_trained_on_another_data_set_is_reported(ckpts, tmp_path, capsys):
    other = _save(
        tmp_path / "other.pt",
        "ce",
        buffer=False,
        config={"dataset": "cifar10", "data_root": "/data/c", "objective": "ce"},
    )
    out_dir = tmp_path / "out"
    argv = ["--checkpoint", ckpts["jem_run"], "--compare", other, "--tasks", "accuracy"]
    code, _, err = _run(argv + ["--out", out_dir, *FAST], capsys)
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    info = report["compare"]["training_data"]
    assert info["dataset"] == "cifar10" and info["data_root"] == "/data/c"
    assert info["matches"] is False and info["differences"] == ["trained on data set 'cifar10'"]
    assert report["training_data"]["dataset"] == "digits"
    assert any("('cifar10', not 'digits')" in w for w in report["warnings"])
    assert "trained on other data than --checkpoint" in err


@pytest.mark.parametrize("dataset", ["moons", "rings", "gmm"])
def test_a_toy_run_is_evaluated_on_its_own_test_split(dataset, tmp_path, capsys):
    """Toy sets are drawn from the run's seed: evaluation draws the same points, so the
    figures match the trainer's and nothing is flagged as other data."""
    from jem_ext import train as jtrain

    run = tmp_path / "run"
    argv = ["--dataset", dataset, "--model", "mlp", "--width", "16", "--depth", "2"]
    assert (
        jtrain.main(argv + ["--epochs", "1", "--seed", "7", "--no-progress", "--out", str(run)])
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "eval"
    ckpt = str(run / "checkpoints" / "last.pt")
    assert (
        cli.main(["--checkpoint", ckpt, "--out", str(out), "--tasks", "accuracy", "--no-progress"])
        == 0
    )
    assert "warning" not in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"] == []
    assert report["accuracy"] == pytest.approx(summary["test_accuracy"])
