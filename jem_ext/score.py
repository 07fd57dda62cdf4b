"""``python -m jem_ext.score``: score images or arrays with a trained JEM.

One row per input: its path, the predicted class (and its name where the data set has names),
``max p(y|x)``, ``log p(x)`` (up to the model's constant) and an out-of-distribution flag,
``log p(x) < threshold``. The threshold is the ``--ood-quantile`` quantile of ``log p(x)`` over
the validation split of the run's own data set (default 0.05: 95% of validation images pass), or
``--threshold``. Rows go to ``--out`` as CSV (``.csv``) or JSON Lines (``.jsonl``); the threshold
and how it was chosen go beside it, to ``OUT.threshold.json``. Both files are written atomically
and only when at least one input was scored.

Inputs are read exactly as the training data are (:meth:`jem_ext.trained.Trained.read_image`,
the image-folder reader's decoder; :meth:`~jem_ext.trained.Trained.from_array` for ``.npy``).
An input that cannot be read or does not fit the model is skipped with one line on stderr
(``jem_ext.score: skipped PATH: ...``); bad flags are one line and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import factory as factories
from ._cli import (
    SIGTERM_STATUS,
    DefaultsHelpFormatter,
    RaisingParser,
    check_threads,
    finite_float,
    interrupt_status,
    terminate_as_interrupt,
)
from ._io import atomic_path, write_failure
from .checkpoint import CheckpointError
from .data import data_fingerprint, fingerprint_changes, load_dataset
from .data_files import IMAGE_EXTS
from .image_data import DataError
from .trained import InputError, Trained, load

__all__ = ["ScoreError", "build_parser", "main", "ood_threshold", "list_inputs"]

PROG = "jem_ext.score"
FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
COLUMNS = ("path", "class", "class_name", "max_prob", "log_px", "ood")


class ScoreError(Exception):
    """Bad input to the scorer (one line on stderr, exit status 2)."""


class _Parser(RaisingParser):
    error_type = ScoreError
    error_suffix = " (see --help)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m jem_ext.score`` (every flag has help text)."""
    p = _Parser(
        prog="python -m jem_ext.score",
        description="Score images or arrays with a trained JEM: per input the predicted class, "
        "max p(y|x), log p(x) (up to the model's constant) and an out-of-distribution flag "
        "(log p(x) below a threshold set on the run's own validation split). Inputs are "
        "preprocessed as in training; one that cannot be read or does not fit is skipped "
        "with one line on stderr.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint file (.pt) or run folder (uses checkpoints/best.pt, else "
        "checkpoints/last.pt)",
    )
    p.add_argument(
        "--inputs",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image folders (searched recursively for .png/.jpg/.jpeg/.npy files; hidden ones "
        "skipped), image files or .npy arrays. A .npy array holds a batch: float [N, C, H, W] "
        "(the model's input shape, channels first) with values in [-1, 1], or for image "
        "models uint8 [N, H, W, C] ([N, H, W] for grey) with values 0..255",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output file: .csv or .jsonl (JSON Lines), one row per input with columns path, "
        "class, class_name, max_prob, log_px, ood; the threshold and how it was chosen go to "
        "OUT.threshold.json",
    )
    p.add_argument(
        "--ood-quantile",
        type=finite_float,
        default=0.05,
        help="quantile of the validation split's log p(x) used as the OOD threshold: inputs "
        "below it are flagged (0.05: 95%% of validation images pass)",
    )
    p.add_argument(
        "--threshold",
        type=finite_float,
        default=None,
        help="use this log p(x) threshold instead of one set on the validation split (needed "
        "when the run's data set cannot be loaded here); write a negative one as "
        "--threshold=-12.5",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="PACKAGE.MODULE:FACTORY",
        help="the model factory of a run trained with --model PACKAGE.MODULE:FACTORY (needed "
        "for such a run: a checkpoint never imports code by itself; the name must be the one "
        "the run recorded)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="device to run on, e.g. cpu or cuda (default: the run's device when this machine "
        "has it, else cpu)",
    )
    p.add_argument("--batch-size", type=int, default=500, help="inputs per forward pass")
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)"
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars (shown only when stderr is a terminal)",
    )
    return p


def _check_args(args: argparse.Namespace) -> str:
    """Check the flags before anything is loaded; returns the output format."""
    fmt = FORMATS.get(Path(args.out).suffix.lower())
    if fmt is None:
        raise ScoreError(
            f"--out {args.out}: expected a file name ending in .csv or .jsonl "
            f"(got {Path(args.out).suffix or 'no extension'})"
        )
    if Path(args.out).is_dir():
        raise ScoreError(f"--out {args.out}: is a folder; expected a .csv or .jsonl file name")
    if not 0.0 <= args.ood_quantile <= 1.0:
        raise ScoreError(f"--ood-quantile: expected a number in [0, 1], got {args.ood_quantile}")
    if args.batch_size < 1:
        raise ScoreError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    if args.threads < 0:
        raise ScoreError(f"--threads: expected an integer >= 0, got {args.threads}")
    why = check_threads(args.threads)
    if why:
        raise ScoreError(why)
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            raise ScoreError(f"--device: unknown device {args.device!r}") from None
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ScoreError(f"--device {args.device}: CUDA is not available")
    if args.model is not None:
        try:
            factories.parse(args.model)
        except factories.FactoryError as err:
            raise ScoreError(f"--model {err}") from None
    return fmt


# ---------------------------------------------------------------------------------- inputs

_INPUT_EXTS = (*IMAGE_EXTS, ".npy")


def list_inputs(paths: Sequence[str]) -> list[Path]:
    """The input files: each file as given, each folder's .png/.jpg/.jpeg/.npy files found
    recursively (sorted; hidden files and folders skipped, as the training reader does)."""
    out: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(
                f
                for f in path.rglob("*")
                if f.is_file()
                and f.suffix.lower() in _INPUT_EXTS
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                raise ScoreError(f"--inputs {path}: a folder without .png/.jpg/.jpeg/.npy files")
            out += found
        elif path.is_file():
            if path.suffix.lower() not in _INPUT_EXTS:
                raise ScoreError(
                    f"--inputs {path}: expected a .png/.jpg/.jpeg image, a .npy array or a folder"
                )
            out.append(path)
        else:
            raise ScoreError(f"--inputs {path}: no such file or folder")
    return out


def read_inputs(
    trained: Trained, files: list[Path], progress: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, x [n, *in_shape])`` per readable file (``PATH[i]`` names an array's rows);
    an unreadable or unfitting file gets one ``skipped`` line on stderr."""
    with tqdm(total=len(files), desc="reading", unit="file", disable=not progress) as bar:
        for f in files:
            try:
                if f.suffix.lower() == ".npy":
                    try:
                        array = np.load(f, allow_pickle=False)
                    except (OSError, ValueError, EOFError) as err:
                        raise InputError(f"{f}: not a readable .npy array ({err})") from None
                    yield str(f), trained.from_array(array, str(f))
                else:
                    yield str(f), trained.read_image(f)[None]
            except InputError as err:
                tqdm.write(f"{PROG}: skipped {err}", file=sys.stderr)
            bar.update(1)


# ------------------------------------------------------------------------------- threshold


def _validation(trained: Trained, need: bool):
    """The validation split of the run's data set, or None (when not ``need``ed)."""
    cfg = trained.config
    dataset, root = cfg.get("dataset"), cfg.get("data_root")
    try:
        if not dataset:
            raise DataError(f"{trained.path}: its config names no data set")
        data = load_dataset(dataset, root, "val", seed=int(cfg.get("seed") or 0))
        if tuple(data.shape) != trained.in_shape:
            raise DataError(
                f"its samples have shape {tuple(data.shape)}, the model takes {trained.in_shape}"
            )
        if data.num_classes != trained.num_classes:
            raise DataError(
                f"it has {data.num_classes} classes, the model {trained.num_classes} outputs"
            )
        if len(data) == 0:
            raise DataError("the split is empty")
    except DataError as err:
        if not need:
            return None
        where = f" (data root {root})" if root else ""
        raise ScoreError(
            f"cannot load the validation split of data set {dataset!r}{where} to set the OOD "
            f"threshold: {err}; pass --threshold VALUE to score without it"
        ) from None
    return data


def _data_warnings(trained: Trained, val) -> list[str]:
    """One line when the validation split loaded here differs from the one the run recorded."""
    changes = fingerprint_changes(
        trained.config.get("data_fingerprint"), data_fingerprint({"val": val})
    )
    if not changes:
        return []
    return [
        f"the validation data differ from the run's ({'; '.join(changes)}); the threshold "
        "may not mean what it seems"
    ]


def ood_threshold(log_px_val: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the validation ``log p(x)``: a share ``1 - quantile`` of the
    validation inputs lie at or above it (linear interpolation between order statistics)."""
    return float(np.quantile(np.asarray(log_px_val, dtype=np.float64), quantile))


def _log_px(trained: Trained, x: torch.Tensor, batch_size: int, progress: bool) -> np.ndarray:
    out = []
    with tqdm(total=len(x), desc="validation", unit="img", disable=not progress) as bar:
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size]
            out.append(trained.log_px(xb, batch_size).double().cpu().numpy())
            bar.update(len(xb))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------- output


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


def run(args: argparse.Namespace, fmt: str) -> str:
    """Score the inputs and write the files; returns the summary line."""
    progress = not args.no_progress and sys.stderr.isatty()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        trained = load(args.checkpoint, args.device, model=args.model)
    except CheckpointError as err:
        raise ScoreError(f"--checkpoint: {err}") from None
    files = list_inputs(args.inputs)

    val = _validation(trained, need=args.threshold is None)
    names = list(val.classes) if val is not None else None
    if args.threshold is not None:
        threshold = float(args.threshold)
        record: dict[str, Any] = {"threshold": threshold, "chosen": "given with --threshold"}
    else:
        val_log_px = _log_px(trained, val.x, args.batch_size, progress)
        threshold = ood_threshold(val_log_px, args.ood_quantile)
        record = {
            "threshold": threshold,
            "chosen": (
                f"the {args.ood_quantile} quantile of log p(x) on the validation split of "
                f"{trained.config.get('dataset')!r}: {1 - args.ood_quantile:.1%} of its images "
                "pass"
            ),
            "quantile": args.ood_quantile,
            "n_validation": len(val),
            "validation_pass_rate": float(np.mean(val_log_px >= threshold)),
        }
    warnings = [] if val is None else _data_warnings(trained, val)
    for line in warnings:
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    record.update(
        data_warnings=warnings,
        dataset=trained.config.get("dataset"),
        data_root=trained.config.get("data_root"),
        checkpoint=str(trained.path),
        rule="ood = log p(x) < threshold; log p(x) = logsumexp_y f(x)[y]",
    )

    names_in, batches = [], []
    for name, x in read_inputs(trained, files, progress):
        many = Path(name).suffix.lower() == ".npy"
        names_in += [f"{name}[{i}]" for i in range(len(x))] if many else [name]
        batches.append(x)
    n_files = len(batches)
    rows: list[dict[str, Any]] = []
    x = torch.cat(batches) if batches else torch.empty(0, *trained.in_shape)
    with tqdm(total=len(x), desc="scoring", unit="input", disable=not progress) as bar:
        for start in range(0, len(x), args.batch_size):
            s = trained.scores(x[start : start + args.batch_size], args.batch_size)
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
    if not rows:
        raise ScoreError(f"none of the {len(files)} input file(s) could be scored")
    record["n_scored"] = len(rows)
    record["n_flagged"] = sum(r["ood"] for r in rows)

    side = side_file(args.out)
    with atomic_path(args.out) as tmp_out, atomic_path(side) as tmp_side:
        tmp_out.write_text(_render(rows, fmt), encoding="utf-8")
        tmp_side.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    skipped = len(files) - n_files
    return (
        f"scored {len(rows)} input(s) from {n_files} file(s)"
        + (f", skipped {skipped} file(s)" if skipped else "")
        + f"; {record['n_flagged']} flagged out-of-distribution (log p(x) < {threshold:.4g}); "
        f"wrote {args.out} and {side}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jem_ext.score``; returns the exit status: 0, 1 when the
    output cannot be written, 2 on bad input (or when no input could be scored), 130 after
    Ctrl-C and 143 after SIGTERM (nothing written in those cases)."""
    args = None
    try:
        with terminate_as_interrupt():
            args = build_parser().parse_args(argv)
            fmt = _check_args(args)
            summary = run(args, fmt)
    except ScoreError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        out = args.out if args is not None else None
        print(f"{PROG}: error: {write_failure(err, out)}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        status = interrupt_status(err)
        what = "terminated (SIGTERM)" if status == SIGTERM_STATUS else "interrupted"
        print(f"\n{PROG}: {what}; nothing was written", file=sys.stderr)
        return status
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
