"""The command line of ``python -m jem_ext.score``: its flags, their checks (before anything is
loaded: a bad flag is one line and exit status 2) and the entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import factory as factories
from .._cli import (
    SIGTERM_STATUS,
    DefaultsHelpFormatter,
    RaisingParser,
    check_device,
    check_threads,
    finite_float,
    interrupt_status,
    terminate_as_interrupt,
)
from .._io import write_failure
from .inputs import PROG, ScoreError
from .scoring import FORMATS, run

__all__ = ["build_parser", "main"]


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
    if args.device is not None and (why := check_device(args.device)):
        raise ScoreError(why)
    if args.model is not None and (why := factories.name_problem(args.model)):
        raise ScoreError(f"--model {why}")
    return fmt


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
