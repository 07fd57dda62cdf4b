"""The scoring itself: one row per input (predicted class, ``max p(y|x)``, ``log p(x)``, the
OOD flag), written as CSV or JSON Lines beside ``OUT.threshold.json``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._io import atomic_path
from ..checkpoint import CheckpointError
from ..trained import Trained, load
from .inputs import ScoreError, list_inputs, read_inputs
from .threshold import choose_threshold

__all__ = ["COLUMNS", "FORMATS", "run", "score_rows", "side_file"]

FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
COLUMNS = ("path", "class", "class_name", "max_prob", "log_px", "ood")


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "jsonl":  # standard JSON: a non-finite score is null
        return "".join(
            json.dumps({k: _finite_or_none(v) for k, v in r.items()}) + "\n" for r in rows
        )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "class_name": r["class_name"] or "", "ood": int(r["ood"])})
    return buf.getvalue()


def side_file(out: str | os.PathLike) -> Path:
    """Where the threshold of ``out`` is recorded: ``OUT.threshold.json``."""
    return Path(f"{out}.threshold.json")


def _gather(read: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], list[torch.Tensor]]:
    """The name of every input row (``PATH[i]`` for an array's rows) and the batches read."""
    names_in, batches = [], []
    for name, x in read:
        many = Path(name).suffix.lower() == ".npy"
        names_in += [f"{name}[{i}]" for i in range(len(x))] if many else [name]
        batches.append(x)
    return names_in, batches


def score_rows(
    trained: Trained,
    names_in: list[str],
    x: torch.Tensor,
    names: list[str] | None,
    threshold: float,
    batch_size: int,
    progress: bool,
) -> list[dict[str, Any]]:
    """One row per input of ``x`` (named by ``names_in``; classes named by ``names``)."""
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(x), desc="scoring", unit="input", disable=not progress) as bar:
        for start in range(0, len(x), batch_size):
            s = trained.scores(x[start : start + batch_size], batch_size)
            pred, max_prob, log_px = (t.cpu().tolist() for t in (s.pred, s.max_prob, s.log_px))
            for name, k, p, lp in zip(names_in[start:], pred, max_prob, log_px):
                rows.append(
                    {
                        "path": name,
                        "class": k,
                        "class_name": names[k] if names is not None and k < len(names) else None,
                        "max_prob": p,
                        "log_px": lp,
                        "ood": not (math.isfinite(lp) and lp >= threshold),
                    }
                )
            bar.update(len(pred))
    return rows


def _write(out: str, fmt: str, rows: list[dict[str, Any]], record: dict[str, Any]) -> Path:
    """Write the rows and the threshold's record, each atomically; returns the record's path."""
    side = side_file(out)
    with atomic_path(out) as tmp_out, atomic_path(side) as tmp_side:
        tmp_out.write_text(_render(rows, fmt), encoding="utf-8")
        tmp_side.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return side


def run(args: argparse.Namespace, fmt: str) -> str:
    """Score the inputs of the checked flags ``args`` and write the files; returns the
    summary line."""
    progress = not args.no_progress and sys.stderr.isatty()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        trained = load(args.checkpoint, args.device, model=args.model)
    except CheckpointError as err:
        raise ScoreError(f"--checkpoint: {err}") from None
    files = list_inputs(args.inputs)
    threshold, record, names = choose_threshold(
        trained, args.threshold, args.ood_quantile, args.batch_size, progress
    )
    names_in, batches = _gather(read_inputs(trained, files, progress))
    x = torch.cat(batches) if batches else torch.empty(0, *trained.in_shape)
    rows = score_rows(trained, names_in, x, names, threshold, args.batch_size, progress)
    if not rows:
        raise ScoreError(f"none of the {len(files)} input file(s) could be scored")
    record["n_scored"] = len(rows)
    record["n_flagged"] = sum(r["ood"] for r in rows)
    side = _write(args.out, fmt, rows, record)
    skipped = len(files) - len(batches)
    return (
        f"scored {len(rows)} input(s) from {len(batches)} file(s)"
        + (f", skipped {skipped} file(s)" if skipped else "")
        + f"; {record['n_flagged']} flagged out-of-distribution (log p(x) < {threshold:.4g}); "
        f"wrote {args.out} and {side}"
    )
