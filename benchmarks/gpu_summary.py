"""summary.md of a benchmarks/gpu_check.sh run: each step's status and time, then the headline
figures beside their targets.

    python benchmarks/gpu_summary.py OUT

Reads ``OUT/steps.tsv`` (name, status, seconds, note per line, written by gpu_check.sh as each
step ends), ``OUT/bench.json`` and, when present, ``OUT/bench_compile/bench.json``; writes
``OUT/summary.md`` and prints it. Works on partial results (a figure that was not measured
reads "not measured"), so it can run after any step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SGLD_TARGET = 0.85
ENERGY_TARGET = 0.70
CHAIN_TARGET = 3.0
HOURS_TARGET = 4.0
BEST = "bf16 + cuda-graph"


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _dig(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def headlines(bench: dict[str, Any], compiled: dict[str, Any]) -> list[tuple[str, Any, str, Any]]:
    """(figure, value, target text, met: True/False/None) for each headline figure."""
    rows: list[tuple[str, Any, str, Any]] = []
    ops_r = bench.get("ops", {}) if isinstance(bench.get("ops"), dict) else {}
    copy = _dig(ops_r, "copy", "gbps")
    elements = _dig(ops_r, "copy", "elements")
    rows.append((f"device-to-device copy GB/s ({elements} floats)", copy, "reference", None))

    def frac(name: str, label: str, target: float) -> None:
        v = _dig(ops_r, name, "fraction_of_copy")
        rows.append((label, v, f">= {target:.2f}", None if v is None else v >= target))

    frac("sgld_step_", "sgld_step_ fraction of copy bandwidth", SGLD_TARGET)
    for name in sorted(k for k in ops_r if k.startswith("energy_fwd_bwd")):
        r = ops_r[name]
        frac(name, f"energy fwd+bwd {r.get('rows')} x {r.get('classes')}, fraction", ENERGY_TARGET)
    chain = bench.get("chain", {}) if isinstance(bench.get("chain"), dict) else {}
    speed = _dig(chain, BEST, "speedup_vs_reference")
    rows.append(
        (
            f"chain {BEST} vs eager reference sampler (x)",
            speed,
            f">= {CHAIN_TARGET:.0f}x",
            None if speed is None else speed >= CHAIN_TARGET,
        )
    )
    for name, r in sorted((compiled.get("chain") or {}).items()):
        if isinstance(r, dict) and "speedup_vs_reference" in r and name != "reference":
            v = r["speedup_vs_reference"]
            rows.append((f"chain {name} vs reference (x)", v, "(compile stage)", None))
    hours = _dig(bench, "train", BEST, "projected_hours")
    rows.append(
        (
            f"projected full CIFAR-10 JEM run, {BEST} (GPU-hours)",
            hours,
            f"<= {HOURS_TARGET:.0f}",
            None if hours is None else hours <= HOURS_TARGET,
        )
    )
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "not measured"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def summary(out: Path) -> str:
    lines = ["# gpu_check summary", ""]
    env = _load(out / "bench.json").get("env", {})
    facts = (out / "env.txt").read_text().strip() if (out / "env.txt").exists() else ""
    if facts:
        lines += ["```", facts, "```", ""]
    elif env:
        lines += [f"device: {env.get('device_name', env.get('device'))}", ""]
    lines += ["| step | status | seconds | note |", "|---|---|---:|---|"]
    steps = out / "steps.tsv"
    for line in steps.read_text().splitlines() if steps.exists() else []:
        name, status, seconds, note = ([*line.split("\t"), "", "", ""])[:4]
        lines.append(f"| {name} | {status} | {seconds} | {note} |")
    lines += ["", "| headline figure | value | target | met |", "|---|---:|---|---|"]
    compiled = _load(out / "bench_compile" / "bench.json")
    for label, value, target, met in headlines(_load(out / "bench.json"), compiled):
        mark = "-" if met is None else ("yes" if met else "**NO**")
        lines.append(f"| {label} | {_fmt(value)} | {target} | {mark} |")
    lines += ["", "Details: bench.md, bench.json, and one log per step (*.log)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("gpu_summary: expected one argument, the gpu_check output folder", file=sys.stderr)
        return 2
    out = Path(args[0])
    text = summary(out)
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
