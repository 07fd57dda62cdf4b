"""The helpers the scripts under benchmarks/ take from jem_ext.bench, and the rule that they
take them from there (no script keeps its own copy, and the studies score through
``python -m jem_ext.eval``)."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from jem_ext import bench
from jem_ext import train as jtrain
from jem_ext.bench import studies
from jem_ext.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
HELPERS = {
    "ReferenceSampler",
    "time_call",
    "time_interleaved",
    "sync",
    "cpu_name",
    "cpu_model",  # an earlier name of cpu_name in a script
    "last_energies",
    "mean_confidence",
}


def _defined(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    kinds = (ast.FunctionDef, ast.ClassDef)
    return {n.name.lstrip("_") for n in tree.body if isinstance(n, kinds)}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_scripts_keep_no_copy_of_a_package_helper(script):
    assert HELPERS - {"cpu_model"} <= set(bench.__all__)
    assert _defined(script) & HELPERS == set()


@pytest.mark.parametrize("name", ["digits_study.py", "cifar_budget.py"])
def test_studies_score_through_the_evaluation(name):
    """No study computes its own metrics: it neither imports the metric functions nor the
    model's logits, and it takes the evaluation from jem_ext.bench."""
    found = _imports(ROOT / "benchmarks" / name)
    assert not found & {"jem_ext.eval.metrics", "jem_ext.models", "jem_ext.metrics"}
    assert "jem_ext.bench" in found


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_last_energies_is_the_last_row_that_logged_both(tmp_path):
    rows = [
        {"iteration": 1, "energy_data": -1.0, "energy_sample": 2.0},
        {"iteration": 2, "energy_data": -3.0, "energy_sample": 4.0},
        {"iteration": 2, "epoch": 1, "val_accuracy": 0.5},  # an eval row: no energies
        {"iteration": 3, "energy_data": None, "energy_sample": 7.0},  # a non-finite mean
        {"event": "recovery", "iteration": 3},
    ]
    got = studies.last_energies(_rows(tmp_path / "metrics.jsonl", rows))
    assert got == {"energy_data": -3.0, "energy_sample": 4.0}  # a pair from one row
    ce = [{"iteration": 1, "loss": 0.3}, {"iteration": 1, "val_accuracy": 0.9}]
    none = studies.last_energies(_rows(tmp_path / "ce.jsonl", ce))
    assert none == {"energy_data": None, "energy_sample": None}


def test_mean_confidence_weighs_the_bins_by_their_counts():
    report = {"calibration": {"counts": [0, 3, 1], "confidence": [None, 0.5, 0.9]}}
    assert studies.mean_confidence(report) == pytest.approx((3 * 0.5 + 0.9) / 4)


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)])
def test_reference_sampler_runs_chains_of_any_shape_and_writes_them_back(shape):
    torch.manual_seed(0)
    model = build_model("mlp" if len(shape) == 1 else "small_cnn", 3, shape)
    ref = bench.ReferenceSampler(20, shape, torch.device("cpu"), n_steps=3, reinit_prob=0.0)
    before = ref.buffer.clone()
    x = ref.sample(model, 5)
    assert x.shape == (5, *shape) and not x.requires_grad and model.training
    changed = (ref.buffer != before).flatten(1).any(1)
    assert 0 < int(changed.sum()) <= 5  # the chains' rows, and only those
    rows = ref.buffer[changed]
    assert all(any(torch.equal(r, c) for c in x) for r in rows)


def test_reference_sampler_steps_down_the_energy():
    """One noiseless step moves x by -step_size * dE/dx (E = -logsumexp f)."""
    model = nn.Linear(2, 3)
    ref = bench.ReferenceSampler(1, (2,), torch.device("cpu"), 1, step_size=0.5, noise_std=0.0)
    start = ref.buffer[0].clone()
    x = ref.sample(model, 1)
    xs = start.unsqueeze(0).requires_grad_(True)
    (g,) = torch.autograd.grad(-model(xs).logsumexp(1).sum(), [xs])
    assert torch.allclose(x, start - 0.5 * g)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_study_scores_a_run_as_the_evaluation_reports_it(tmp_path):
    run = tmp_path / "tiny-s0"
    argv = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--depth", "2"]
    argv += ["--sgld-steps", "2", "--max-iters", "3", "--no-progress", "--log-every", "1"]
    assert jtrain.main(argv + ["--out", str(run)]) == 0
    row = _script("digits_study").score_run(run, "last")
    report = json.loads((run / "eval-last" / "report.json").read_text())
    assert row["accuracy"] == report["accuracy"] and row["ece"] == report["ece"]
    assert row["auroc_uniform"] == report["ood"]["uniform"]["logpx"]
    assert row["auroc_gaussian"] == report["ood"]["gaussian"]["logpx"]
    assert 0 < row["confidence"] <= 1 and row["seconds"] > 0
    assert row["energy_data"] is not None and row["energy_sample"] is not None


def test_digits_study_keeps_scoring_against_its_noise_images():
    """The evaluation's seed the study passes draws the uniform and Gaussian images the study
    drew itself from seed 1234 before it scored through the evaluation."""
    from jem_ext.eval.tasks import builtin_ood_sets

    x = torch.zeros(7, 1, 8, 8)
    sets = builtin_ood_sets(x, _script("digits_study").EVAL_SEED)
    g = torch.Generator().manual_seed(1234)
    assert torch.equal(sets["uniform"], torch.rand(x.shape, generator=g) * 2 - 1)
    assert torch.equal(sets["gaussian"], torch.randn(x.shape, generator=g).clamp(-1, 1))


def _pattern(ref: str) -> str:
    """A cited path as a regular expression: ``<level>`` and the like stand for any name part."""
    parts = re.split(r"(<[^>]+>)", ref)
    return "".join("[^/]+" if p.startswith("<") else re.escape(p) for p in parts)


def _is_cited(rel: str, doc_refs: dict[str, set[str]]) -> bool:
    """Whether the file ``rel`` (relative to benchmarks/out) is cited: by a path ending in it
    or in one of its folders, or by its bare name from a document that cites its folder."""
    folder = rel.rpartition("/")[0]
    for doc_folder, refs in doc_refs.items():
        paths = [r.removeprefix("benchmarks/").removeprefix("out/") for r in refs]
        folders = {doc_folder, ""} | {p.rpartition("/")[0] for p in paths if "/" in p}
        for ref in paths:
            if "/" in ref:
                tail = "" if ref.endswith("/") else "$"
                if re.search(r"(^|/)" + _pattern(ref) + tail, rel):
                    return True
            elif folder in folders and re.fullmatch(_pattern(ref), rel.rpartition("/")[2]):
                return True
    return False


def _cited_refs() -> dict[str, set[str]]:
    """The paths that RESULTS.md, README.md and the FINDINGS.md files cite, by the folder
    (under benchmarks/out) their bare names are relative to."""
    out = ROOT / "benchmarks" / "out"
    docs = {"": [ROOT / "benchmarks" / "RESULTS.md", ROOT / "README.md"]}
    for f in out.rglob("FINDINGS.md"):
        docs.setdefault(f.parent.relative_to(out).as_posix(), []).append(f)
    token = r"`([^`\s]+)`|\]\(([^)\s]+)\)|(?<![\w/])((?:benchmarks/)?out/[\w./<>|-]+)"
    refs: dict[str, set[str]] = {}
    for folder, files in docs.items():
        found = {
            t.rstrip(".,;:") for d in files for m in re.findall(token, d.read_text()) for t in m
        }
        refs[folder] = {r for r in found if re.search(r"\.(json|md|png)$|/$", r)}
    return refs


def test_benchmarks_out_keeps_only_cited_results():
    """Every result kept under benchmarks/out/ is cited (by its path, its folder or its name
    pattern)."""
    out = ROOT / "benchmarks" / "out"
    refs = _cited_refs()
    files = [f.relative_to(out).as_posix() for f in sorted(out.rglob("*")) if f.is_file()]
    assert [rel for rel in files if not _is_cited(rel, refs)] == []


def test_the_citation_check_sees_an_uncited_copy():
    refs = {"": {"`benchmarks/out/study/results.md`"}, "study": {"results.json", "60min/"}}
    refs = {k: {r.strip("`") for r in v} for k, v in refs.items()}
    assert _is_cited("study/results.md", refs) and _is_cited("study/results.json", refs)
    assert _is_cited("study/60min/a/report.json", refs)
    assert not _is_cited("study/old_copy/results.md", refs)
    assert not _is_cited("other/results.json", refs)


def test_time_interleaved_takes_turns_and_gives_medians():
    from jem_ext.bench import timing

    now = [0.0]
    calls = []

    def work(name, seconds):
        def fn():
            calls.append(name)
            now[0] += seconds.pop(0) if isinstance(seconds, list) else seconds

        return fn

    fns = {"a": work("a", [9.0, 1.0, 2.0, 30.0]), "b": work("b", 0.5)}
    med = timing.time_interleaved(fns, reps=3, clock=lambda: now[0], warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds in turn
    assert med == {"a": 2.0, "b": 0.5}  # a's warm-up (9 s) is not counted


def test_cpu_name_falls_back_to_platform(monkeypatch):
    from jem_ext.bench import timing

    assert isinstance(timing.cpu_name(), str) and timing.cpu_name()

    def unreadable(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(timing, "open", unreadable, raising=False)
    monkeypatch.setattr(timing.platform, "processor", lambda: "")
    monkeypatch.setattr(timing.platform, "machine", lambda: "riscv64")
    assert timing.cpu_name() == "riscv64"
