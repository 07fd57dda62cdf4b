"""The report writers: report.json (standard JSON only), report.md and the PNG figures.

Both read the report dict that :func:`jem_ext.eval.report.run` assembles: the first model's
figures at the top level, the ``--compare`` model's under ``"compare"`` with the same layout.
report.md has a header, then each task's section (:mod:`jem_ext.eval.sections`) in the order of
the task registry (:mod:`jem_ext.eval.registry`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write_text
from .registry import REGISTRY, Figure
from .sections import table

__all__ = ["Figure", "render_markdown", "to_json_text", "write_report"]

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
        table(["model", "checkpoint", "objective", "iteration"], rows),
        "",
        f"Data: `{report['dataset']}` test split, {report['n_test']} images "
        f"(seed {report['settings']['seed']}).",
        "",
    ] + [f"> **Warning:** {w}\n" for w in report.get("warnings", [])]


def render_markdown(report: dict[str, Any], images: bool = True) -> str:
    """The report as markdown tables (both models side by side); ``images`` adds the PNGs.

    Each task's section comes once, in task order (tasks that share a section: at the first).
    A skipped task is explained once, in its own section when it has one.
    """
    results = [report] + ([report["compare"]] if "compare" in report else [])
    tasks = report["tasks"]
    parts = _header(report, results)
    written = []
    for name in tasks:
        section = REGISTRY[name].section if name in REGISTRY else None
        if section is not None and section not in written:
            parts += section(report, results, images)
            written.append(section)
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
