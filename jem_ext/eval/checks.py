"""The checks of the evaluation's flags that are more than a range (model factories, the
output folder, PGD's norms and radii, extra OOD sets), and the names they accept.

Each check returns the whole error line (flag, value and what was expected: these flags name
the offending part of a list, ``--pgd-eps 'l3=1': unknown norm ...``), or None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import factory as factories

BUILTIN_OOD = ("uniform", "gaussian", "constant", "interp")
NORMS = ("linf", "l2")
DEFAULT_EPS = {"linf": [0.0, 0.05, 0.1, 0.2, 0.3], "l2": [0.0, 0.25, 0.5, 1.0, 2.0]}


def csv_items(text: str) -> list[str]:
    """The non-empty items of a comma-separated list."""
    return [t.strip() for t in text.split(",") if t.strip()]


def factory_problem(flag: str) -> Callable[[str], str | None]:
    def problem(name: str) -> str | None:
        why = factories.name_problem(name)
        return None if why is None else f"{flag} {why}"

    return problem


def out_problem(out: str) -> str | None:
    if Path(out).exists() and not Path(out).is_dir():
        return f"--out {Path(out)}: exists and is not a folder"
    return None


def ood_problem(specs: Sequence[str]) -> str | None:
    for spec in specs:
        name = spec.partition(":")[0]
        if not name:
            return f"--ood {spec!r}: expected NAME[:FOLDER]"
        if name in BUILTIN_OOD:
            return f"--ood {name}: a built-in OOD set, always evaluated"
    return None


def norms_problem(text: str) -> str | None:
    norms = csv_items(text)
    if not norms or any(n not in NORMS for n in norms):
        return f"--pgd-norms: expected a comma list of {', '.join(NORMS)}, got {text!r}"
    return None


def eps_values(spec: str) -> tuple[str, list[float] | str]:
    """``(norm or "", the radii)`` of one ``--pgd-eps`` value, or ``(norm, why it is bad)``."""
    target, _, values = spec.rpartition("=")
    if target and target not in NORMS:
        return target, f"unknown norm {target!r} (expected {', '.join(NORMS)})"
    try:
        parsed = [float(v) for v in csv_items(values)]
    except ValueError:
        return target, "expected comma-separated numbers"
    if not parsed or any(not math.isfinite(v) or v < 0 for v in parsed):
        return target, "expected non-negative finite numbers"
    return target, parsed


def eps_problem(specs: Sequence[str]) -> str | None:
    for spec in specs:
        why = eps_values(spec)[1]
        if isinstance(why, str):
            return f"--pgd-eps {spec!r}: {why}"
    return None
