"""The report.md section of each evaluation task, rendered from the report dict.

A section is a function ``(report, results, images) -> lines``: ``report`` is the report dict
(the first model's figures at the top level), ``results`` the models' dicts (the first, then the
``--compare`` one), ``images`` whether to link the PNGs. The task registry
(:mod:`jem_ext.eval.registry`) names each task's section; tasks that share a section (accuracy
and calibration) name the same function and it is written once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .settings import ECE_BINS, SCORES

__all__ = [
    "accuracy_section",
    "fid_section",
    "generation_section",
    "ood_section",
    "robustness_section",
    "table",
]


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, fmt)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def accuracy_section(report, results, images: bool) -> list[str]:
    """Accuracy (plain and refined) and ECE of each model, side by side."""
    tasks = report["tasks"]
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
        table(header, [[name, *vals] for name, vals in cols]),
        "",
    ]
    if images and "calibration" in tasks:
        parts += ["![reliability diagram](reliability.png)", ""]
    return parts


def ood_section(report, results, images: bool) -> list[str]:
    """AUROC of every OOD set and score, and the log p(x) histograms."""
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
        table(header, rows),
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


def generation_section(report, results, images: bool) -> list[str]:
    """The fresh chains' figures (with the --judge's verdict) and the sample grids."""
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
        table(
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


def fid_section(report, results, images: bool) -> list[str]:
    """IS and FID of each model (or why they were skipped)."""
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
        table(["model", "IS", "FID fresh chains", "FID replay buffer", "samples"], rows),
        "",
    ]
    if "warning" in f0:
        parts += [f"Warning: {f0['warning']}.", ""]
    return parts


def robustness_section(report, results, images: bool) -> list[str]:
    """PGD accuracy per norm and radius, and the curves."""
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
        parts += [f"### {norm} (accuracy %)", "", table(["eps"] + labels, rows), ""]
        if images:
            parts += [f"![{norm}](robustness_{norm}.png)", ""]
    return parts
