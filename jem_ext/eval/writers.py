"""The report writers: report.json (standard JSON only), report.md and the PNG figures.

Both read the report dict that :func:`jem_ext.eval.report.run` assembles: the first model's
figures at the top level, the ``--compare`` model's under ``"compare"`` with the same layout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write_text
from .settings import ECE_BINS, SCORES

__all__ = ["render_markdown", "to_json_text", "write_report"]

Figure = tuple[str, Callable[[Path], None]]


# ---------------------------------------------------------------------------------- JSON


def _standard(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, dict):
        return {k: _standard(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_standard(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    return obj


def to_json_text(report: dict[str, Any]) -> str:
    """The report as standard JSON (non-finite numbers written as null)."""
    return json.dumps(_standard(report), indent=2, allow_nan=False) + "\n"


# ------------------------------------------------------------------------------ Markdown


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _header(report: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    title = f"# Evaluation of {report['label']}" + (
        f" vs {report['compare']['label']}" if "compare" in report else ""
    )
    rows = [
        [r["label"], f"`{r['checkpoint']}`", r.get("objective", "-"), r.get("iteration", "-")]
        for r in results
    ]
    return [
        title,
        "",
        _table(["model", "checkpoint", "objective", "iteration"], rows),
        "",
        f"Data: `{report['dataset']}` test split, {report['n_test']} images "
        f"(seed {report['settings']['seed']}).",
        "",
    ] + [f"> **Warning:** {w}\n" for w in report.get("warnings", [])]


def _accuracy_section(report, results, tasks, images: bool) -> list[str]:
    cols = []
    if "accuracy" in tasks:
        cols.append(("accuracy (%)", [_pct(r.get("accuracy")) for r in results]))
        if "accuracy_refined" in report:
            k = report["accuracy_refined"]["steps"]
            cols.append(
                (
                    f"accuracy after {k} SGLD steps (%)",
                    [_pct(r.get("accuracy_refined", {}).get("accuracy")) for r in results],
                )
            )
    if "calibration" in tasks:
        cols.append((f"ECE, {ECE_BINS} bins (%)", [_pct(r.get("ece")) for r in results]))
    header = ["metric"] + [r["label"] for r in results]
    parts = [
        "## Accuracy and calibration",
        "",
        _table(header, [[name, *vals] for name, vals in cols]),
        "",
    ]
    if images and "calibration" in tasks:
        parts += ["![reliability diagram](reliability.png)", ""]
    return parts


def _ood_section(report, results, images: bool) -> list[str]:
    header = ["OOD set"] + [f"{s} ({r['label']})" for s in SCORES for r in results]
    rows = [
        [name] + [_num(r["ood"][name][s]) for s in SCORES for r in results]
        for name in report["ood"]
    ]
    parts = [
        "## OOD detection (AUROC, in-distribution test set vs each set)",
        "",
        "Scores: logpx = logsumexp_y f(x)[y]; maxprob = max_y p(y|x); "
        "approx_mass = -||d logpx/dx||_2. Built-in sets: uniform U(-1,1), "
        "gaussian N(0,1) clamped to [-1,1], constant (one random value per image), "
        "interp (mean of two test images).",
        "",
        _table(header, rows),
        "",
    ]
    if images:
        parts += [
            f"![log p(x) {r['label']}]({f})"
            for r, f in zip(results, ["logpx_hist.png", "logpx_hist_compare.png"])
        ] + [""]
    return parts


def _judged(g: dict[str, Any]) -> str:
    """The --judge's rate of the conditional samples (of their starts in brackets), or -."""
    if "judge_conditional_accuracy" not in g:
        return "-"
    return f"{_pct(g['judge_conditional_accuracy'])} ({_pct(g['judge_start_accuracy'])})"


def _generation_section(results, images: bool) -> list[str]:
    rows = [
        [
            r["label"],
            g["init"],
            g["steps"],
            _pct(g["conditional_accuracy"]),
            _judged(g),
            _num(g["logpx_mean_samples"], ".2f"),
            _num(g["logpx_mean_test"], ".2f"),
            g.get("buffer_size", "none"),
        ]
        for r in results
        for g in [r["generation"]]
    ]
    parts = [
        "## Generation (fresh SGLD chains)",
        "",
        _table(
            [
                "model",
                "chains start from",
                "SGLD steps",
                "conditional samples classified as their class (%)",
                "same by the judge (%) (their starts)",
                "mean logpx samples",
                "mean logpx test",
                "replay buffer size",
            ],
            rows,
        ),
        "",
    ]
    judges = {g["judge"] for r in results for g in [r["generation"]] if "judge" in g}
    parts += [f"Judge: {j}." for j in sorted(judges)] + ([""] if judges else [])
    if images:
        for r in results:
            for kind, f in r["generation"]["files"].items():
                parts.append(f"{r['label']} {kind}: ![{r['label']} {kind}]({f})")
        parts.append("")
    return parts


def _fid_section(report, results) -> list[str]:
    f0 = report["fid"]
    if "skipped" in f0:
        return ["## IS and FID", "", f"Skipped: {f0['skipped']}", ""]
    rows = [
        [
            r["label"],
            f"{_num(f['is_mean'])} ± {_num(f['is_std'])}",
            _num(f["fid"]),
            _num(f.get("fid_buffer")),
            f["n_generated"],
        ]
        for r in results
        for f in [r["fid"]]
    ]
    parts = [
        "## IS and FID",
        "",
        f"Network: {f0['note']}.",
        "",
        _table(["model", "IS", "FID fresh chains", "FID replay buffer", "samples"], rows),
        "",
    ]
    if "warning" in f0:
        parts += [f"Warning: {f0['warning']}.", ""]
    return parts


def _robustness_section(report, results, images: bool) -> list[str]:
    rb = report["robustness"]
    parts = [
        "## Robustness (PGD through the SGLD-refined classifier)",
        "",
        f"{rb['n']} test points, K = {rb['refine_steps']} SGLD steps, "
        f"{rb['chains']} chains, PGD {rb['pgd_steps']} steps, step "
        f"{rb['pgd_step_size']}; eps in the model's [-1, 1] input units "
        "(eps 0 = clean accuracy of the refined classifier).",
        "",
    ]
    labels = [r["label"] for r in results]
    for norm, curve in rb["curves"].items():
        rows = [
            [f"{e:g}"]
            + [_pct(dict(map(tuple, r["robustness"]["curves"][norm])).get(e)) for r in results]
            for e, _ in curve
        ]
        parts += [f"### {norm} (accuracy %)", "", _table(["eps"] + labels, rows), ""]
        if images:
            parts += [f"![{norm}](robustness_{norm}.png)", ""]
    return parts


def render_markdown(report: dict[str, Any], images: bool = True) -> str:
    """The report as markdown tables (both models side by side); ``images`` adds the PNGs.

    A skipped task is explained once, in its own section when it has one.
    """
    results = [report] + ([report["compare"]] if "compare" in report else [])
    tasks = report["tasks"]
    parts = _header(report, results)
    if "accuracy" in tasks or "calibration" in tasks:
        parts += _accuracy_section(report, results, tasks, images)
    if "ood" in tasks:
        parts += _ood_section(report, results, images)
    if "generation" in tasks:
        parts += _generation_section(results, images)
    if "fid" in tasks:
        parts += _fid_section(report, results)
    if "robustness" in tasks:
        parts += _robustness_section(report, results, images)
    unexplained = {k: v for k, v in report.get("skipped", {}).items() if k not in tasks}
    if unexplained:
        parts += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in unexplained.items()] + [""]
    return "\n".join(parts)


# -------------------------------------------------------------------------------- output


def write_report(out: Path, report: dict[str, Any], figures: list[Figure]) -> None:
    """Draw the figures and write report.md and report.json into ``out``, all or nothing.

    Both texts are rendered before anything is written, so a rendering error leaves no files.
    Every file is first written into a temporary folder inside ``out`` and moved into place
    only once all of them are written: a write that fails (no space, a read-only file system)
    or an interruption leaves ``out`` as it was, with no part of the new report.

    Raises:
        OSError: a file could not be written (``out`` is unchanged).
    """
    markdown = render_markdown(report) + "\n"
    as_json = to_json_text(report)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".report.{uuid.uuid4().hex}.tmp"
    try:
        staging.mkdir()
        for name, draw in figures:
            draw(staging / name)
        atomic_write_text(staging / "report.md", markdown)
        atomic_write_text(staging / "report.json", as_json)
        names = [name for name, _ in figures] + ["report.md", "report.json"]
        for name in names:  # renames within one folder: they take no space
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
