"""The evaluation's task registry: a task registered in one entry runs end to end through
``python -m jem_ext.eval`` and lands in report.json, report.md and the figures."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from test_eval_cli import FAST, _save

from jem_ext.eval import cli, registry, sections
from jem_ext.eval.registry import REGISTRY, TASKS, TaskEntry


@dataclass
class _MeanEnergy:
    value: float
    prepared: str

    def to_json(self):
        return {"mean_energy": {"value": self.value, "prepared": self.prepared}}


def _run_mean_energy(res, inp):
    """A tiny task: the mean energy -logsumexp f(x) of the test images."""
    logits = res.test_logits(inp)
    return _MeanEnergy(float(-torch.logsumexp(logits.double(), 1).mean()), inp.prepared["toy"])


def _section(report, results, images):
    rows = [[r["label"], f"{r['mean_energy']['value']:.4f}"] for r in results]
    lines = ["## Mean energy", "", sections.table(["model", "mean E(x)"], rows), ""]
    return lines + (["![mean energy](mean_energy.png)", ""] if images else [])


def _figures(results, inp):
    def draw(path):
        path.write_bytes(b"a figure of " + str(len(results)).encode() + b" models")

    return [("mean_energy.png", draw)]


def _prepare(settings, main):
    return f"ready for {main.label}", None


TOY = TaskEntry("toy", _run_mean_energy, section=_section, figures=_figures, prepare=_prepare)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return _save(root / "jem.pt", "jem", seed=0), _save(root / "ce.pt", "ce", buffer=False, seed=1)


def test_a_registered_task_runs_end_to_end(ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", TOY)
    jem, ce = ckpts
    out = tmp_path / "out"
    argv = ["--checkpoint", jem, "--compare", ce, "--out", out, "--tasks", "toy,accuracy"]
    code = cli.main([str(a) for a in argv + FAST])
    printed, err = capsys.readouterr()
    assert code == 0, err

    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == ["accuracy", "toy"]  # in the registry's order
    for r in (report, report["compare"]):
        assert r["mean_energy"]["prepared"] == "ready for jem"  # prepared once, from --checkpoint
        assert set(r["seconds_by_task"]) == {"accuracy", "toy"}
    # The figure of each model is its own (computed from its test logits).
    assert report["mean_energy"]["value"] != report["compare"]["mean_energy"]["value"]
    assert report["settings"]["tasks"] == "accuracy,toy"

    assert (out / "mean_energy.png").read_bytes() == b"a figure of 2 models"
    assert "mean_energy.png" in report["files"]
    assert {p.name for p in out.iterdir()} == set(report["files"])

    md = (out / "report.md").read_text()
    assert md.index("## Accuracy and calibration") < md.index("## Mean energy")
    value = f"{report['compare']['mean_energy']['value']:.4f}"
    assert f"| ce | {value} |" in md and "![mean energy](mean_energy.png)" in md
    assert "## Mean energy" in printed and "![" not in printed  # the printed summary


def test_a_registered_task_is_a_choice_of_tasks(monkeypatch, capsys):
    assert "toy" not in TASKS
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    assert "toy" not in capsys.readouterr().out
    monkeypatch.setitem(REGISTRY, "toy", TOY)
    assert list(TASKS)[-1] == "toy" and "toy" in TASKS and len(TASKS) == len(REGISTRY)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    assert "toy" in capsys.readouterr().out.replace("\n", " ")


def test_an_unregistered_task_is_refused_in_one_line(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["--checkpoint", str(ckpts[0]), "--out", str(out), "--tasks", "toy"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "--tasks: unknown task(s) toy" in err


def test_a_prepared_skip_reason_is_reported(ckpts, tmp_path, capsys, monkeypatch):
    skipping = TaskEntry(
        "toy", lambda res, inp: _MeanEnergy(0.0, "none"), prepare=lambda s, m: (None, "no data")
    )
    monkeypatch.setitem(REGISTRY, "toy", skipping)
    out = tmp_path / "out"
    code = cli.main([str(a) for a in ["--checkpoint", ckpts[0], "--out", out, "--tasks", "toy"]])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == {"toy": "no data"}


def test_the_builtin_table():
    assert tuple(TASKS) == ("accuracy", "calibration", "ood", "generation", "fid", "robustness")
    assert repr(TASKS) == repr(tuple(REGISTRY))
    for name, entry in REGISTRY.items():
        assert entry.name == name and entry.section is not None
    # accuracy and calibration share one section, written once
    assert REGISTRY["accuracy"].section is REGISTRY["calibration"].section
    assert registry.REGISTRY is REGISTRY
