"""What the training studies under ``benchmarks/`` (``digits_study.py``, ``cifar_budget.py``)
share: a checkpoint scored by ``python -m jem_ext.eval`` (so a study's figures are the
evaluation's own), and the figures read back from a run folder and an evaluation report.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..eval.cli import main as eval_main

ENERGIES = ("energy_data", "energy_sample")


def evaluate(checkpoint: Path, out: Path, tasks: str, flags: Sequence[str] = ()) -> dict[str, Any]:
    """Score ``checkpoint`` with ``python -m jem_ext.eval --tasks TASKS`` (in this process,
    the command line echoed) into the folder ``out``; returns its ``report.json``.

    Raises:
        RuntimeError: the evaluation failed (its error is on stderr).
    """
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--tasks", tasks]
    argv += ["--no-progress", *flags]
    print("+ python -m jem_ext.eval", shlex.join(argv), flush=True)
    if eval_main(argv) != 0:
        raise RuntimeError(f"evaluation of {checkpoint} failed")
    return read_report(out)


def read_report(out: Path) -> dict[str, Any]:
    """The ``report.json`` of the evaluation folder ``out``."""
    return json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))


def mean_confidence(report: dict[str, Any]) -> float:
    """Mean max p(y|x) over the test set, from a report's calibration bins (below the
    accuracy: under-confident)."""
    bins = report["calibration"]
    pairs = [(n, c) for n, c in zip(bins["counts"], bins["confidence"]) if n]
    return sum(n * c for n, c in pairs) / sum(n for n, _ in pairs)


def last_energies(metrics_path: Path) -> dict[str, float | None]:
    """``energy_data`` and ``energy_sample`` of the last row of a run's ``metrics.jsonl``
    that logged both (JEM runs log them together each ``--log-every`` iterations); None for
    both when no row did (a cross-entropy run)."""
    found: dict[str, float | None] = dict.fromkeys(ENERGIES)
    with Path(metrics_path).open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if all(row.get(k) is not None for k in ENERGIES):
                found = {k: float(row[k]) for k in ENERGIES}
    return found
