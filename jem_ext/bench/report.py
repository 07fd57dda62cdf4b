"""``bench.json`` and the Markdown table ``bench.md`` of a results dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._io import atomic_write_text


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _rows(stage: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The per-option rows of a chain/train stage result (its error, if the stage failed)."""
    if "error" in stage and not any(isinstance(v, dict) for v in stage.values()):
        return [("stage", stage)]
    return [(k, v) for k, v in stage.items() if isinstance(v, dict) and k != "recipe"]


def markdown(results: dict[str, Any]) -> str:
    """The Markdown table of a results dict (as written to ``bench.json``)."""
    env = results.get("env", {})
    lines = [
        f"# jem_ext bench ({results['mode']}, {env.get('device_name', env.get('device'))}, "
        f"{results['date']})",
        "",
    ]
    model = env.get("sizes", {}).get("model")
    if model:
        lines += [f"Model: {model} (instead of the WRN)", ""]
    if "ops" in results:
        lines += _ops_table(results["ops"])
    if "chain" in results:
        lines += _chain_table(results["chain"])
    if "train" in results:
        lines += _train_table(results["train"])
    return "\n".join(lines) + "\n"


def _ops_table(ops_r: dict[str, Any]) -> list[str]:
    lines = ["| op | mean ms | GB/s | fraction of copy |", "|---|---:|---:|---:|"]
    names = ["copy", "sgld_step_"] + [k for k in ops_r if k.startswith("energy_fwd_bwd")]
    for name in names:
        r = ops_r.get(name, {})
        ms = None if "mean_s" not in r else r["mean_s"] * 1e3
        lines.append(
            f"| {name} | {_fmt(ms, '.3f')} | {_fmt(r.get('gbps'), '.1f')} | "
            f"{_fmt(r.get('fraction_of_copy'), '.2f')} |"
        )
    if "error" in ops_r:
        lines.append(f"\nops error: {ops_r['error']}")
    return lines + [""]


def _chain_table(chain: dict[str, Any]) -> list[str]:
    lines = ["| chain | images x steps / s | vs reference | first call s |", "|---|---:|---:|---:|"]
    for name, r in _rows(chain):
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | |")
            continue
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | |")
            continue
        lines.append(
            f"| {name} | {r['images_steps_per_s']:.1f} | "
            f"{_fmt(r.get('speedup_vs_reference', 1.0), '.2f')}x | "
            f"{_fmt(r.get('first_call_s'), '.1f')} |"
        )
    return lines + [""]


def _train_table(train: dict[str, Any]) -> list[str]:
    lines = [
        "| training iteration | s / iteration | projected hours (150 epochs) |",
        "|---|---:|---:|",
    ]
    for name, r in _rows(train):
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | |")
            continue
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | |")
            continue
        lines.append(f"| {name} | {r['median_s']:.4f} | {r['projected_hours']:.2f} |")
    return lines


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``bench.json`` and ``bench.md`` of ``results`` in ``out`` (atomically)."""
    atomic_write_text(out / "bench.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(out / "bench.md", markdown(results))
