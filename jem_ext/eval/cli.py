"""The command line of ``python -m jem_ext.eval``: flags, their checks, the entry point.

Every flag is checked before anything is loaded or written: a bad value is reported as one
line on stderr (``jem_ext.eval: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import factory as factories
from .._cli import (
    SIGTERM_STATUS,
    DefaultsHelpFormatter,
    RaisingParser,
    finite_float,
    interrupt_status,
    terminate_as_interrupt,
)
from .._io import remove_temporaries, write_failure
from ..accel import SpeedOptions
from ..settings import add_flags
from .registry import TASKS
from .report import run
from .settings import BUILTIN_OOD, DEFAULT_EPS, GEN_INITS, NORMS, EvalError, EvalSettings
from .writers import render_markdown

__all__ = ["build_parser", "main", "parse_settings"]


class _Parser(RaisingParser):
    """An argument parser whose errors become :class:`EvalError` (one line, exit status 2)."""

    error_type = EvalError
    error_suffix = " (see --help)"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m jem_ext.eval`` (every flag has help text)."""
    p = _Parser(
        prog="python -m jem_ext.eval",
        description="Evaluate a JEM checkpoint (accuracy, calibration, OOD detection, "
        "generation, IS/FID, adversarial robustness) and write report.json, report.md and "
        "PNG figures to --out. With --compare, a second checkpoint (e.g. the cross-entropy "
        "twin) is evaluated on the same data and shown beside the first.",
        formatter_class=DefaultsHelpFormatter,
    )
    _add_input_flags(p)
    _add_sgld_flags(p)
    _add_fid_flags(p)
    _add_robustness_flags(p)
    add_flags(p, SpeedOptions, suppress_defaults=False)
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    return p


def _add_input_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint file (.pt) or run folder (uses checkpoints/best.pt, else "
        "checkpoints/last.pt)",
    )
    p.add_argument(
        "--compare",
        default=None,
        help="second checkpoint or run folder evaluated on the same data; its "
        "figures go under 'compare' in report.json and beside the first everywhere",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="PACKAGE.MODULE:FACTORY",
        help="the model factory of a --checkpoint run trained with --model "
        "PACKAGE.MODULE:FACTORY (needed for such a run: a checkpoint never imports code by "
        "itself; the name must be the one the run recorded)",
    )
    p.add_argument(
        "--compare-model",
        default=None,
        metavar="PACKAGE.MODULE:FACTORY",
        help="the model factory of the --compare run, when it was trained with one",
    )
    p.add_argument(
        "--out", required=True, help="output folder (created; existing report files are replaced)"
    )
    p.add_argument(
        "--tasks", default=",".join(TASKS), help="comma-separated tasks among " + ", ".join(TASKS)
    )
    p.add_argument(
        "--label",
        default=None,
        help="name of the first model in tables and plots (default: its objective "
        "from the run config, e.g. 'jem')",
    )
    p.add_argument(
        "--compare-label",
        default=None,
        help="name of the --compare model (default: its objective, e.g. 'ce')",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="evaluate on this data set (default: the checkpoint's config['dataset'])",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="folder of the data set files (default: the checkpoint's config['data_root'])",
    )
    p.add_argument("--batch-size", type=int, default=100, help="batch size of every pass")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    p.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="use a random subset (fixed by --seed) of at most this many test "
        "images (and of each --ood set) (default: all of them)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument(
        "--ood",
        action="append",
        default=[],
        metavar="NAME[:FOLDER]",
        help="extra OOD data set (any name load_dataset knows, e.g. svhn:/data/svhn "
        "or folder:/path/to/images); its test split is used; repeatable",
    )


def _add_sgld_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sgld-step-size",
        type=finite_float,
        default=None,
        help="SGLD step size on d log p(x)/dx for refinement, generation and the "
        "robust classifier, used for both models (default: the --checkpoint's "
        "sampler setting, else JEM's 1.0)",
    )
    p.add_argument(
        "--sgld-noise",
        type=finite_float,
        default=None,
        help="SGLD noise standard deviation, >= 0 (default: the --checkpoint's "
        "sampler setting, else JEM's 0.01)",
    )
    p.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        help="accuracy task: also report the accuracy after K SGLD refinement steps (0: skip)",
    )
    p.add_argument(
        "--gen-steps",
        type=int,
        default=100,
        help="SGLD steps of the fresh generation chains (from --gen-init)",
    )
    p.add_argument(
        "--gen-init",
        choices=GEN_INITS,
        default="uniform",
        help="where the fresh generation chains start: U(-1,1) noise, or the per-class "
        "Gaussians the run fitted to its training data (runs trained with --init gaussian)",
    )
    p.add_argument(
        "--judge",
        default=None,
        metavar="RUN",
        help="generation task: a second classifier (a run folder or checkpoint, e.g. the "
        "cross-entropy twin) that also classifies the class-conditional samples; its rate is "
        "reported beside the model's own, which the chains climb and so easily satisfy",
    )
    p.add_argument(
        "--gen-n",
        type=int,
        default=100,
        help="number of fresh unconditional samples (grid, IS and FID); the "
        "conditional grid has max(1, gen_n // classes) samples per class",
    )


def _add_fid_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--inception-weights",
        default=None,
        help="FID Inception-v3 state_dict (pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth) for the fid task",
    )
    p.add_argument(
        "--fid-classifier",
        default=None,
        help="checkpoint whose classifier replaces Inception for IS/FID when "
        "--inception-weights is not given (figures not comparable with papers)",
    )


def _add_robustness_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pgd-norms", default="linf,l2", help="comma-separated PGD norms (linf, l2)")
    p.add_argument(
        "--pgd-eps",
        action="append",
        default=[],
        metavar="[NORM=]E1,E2,...",
        help="PGD radii in the model's [-1, 1] input units, e.g. 'linf=0,0.1,0.2' "
        "or 'l2=0,0.5,1'; without 'NORM=' the list applies to every norm; "
        "repeatable (default: "
        + "; ".join(f"{k}={','.join(map(str, v))}" for k, v in DEFAULT_EPS.items())
        + ")",
    )
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps per attack")
    p.add_argument(
        "--pgd-step-size",
        type=finite_float,
        default=None,
        help="PGD step length (default: 2.5 * eps / steps, as Madry et al.)",
    )
    p.add_argument(
        "--robust-refine-steps",
        type=int,
        default=5,
        help="K: SGLD refinement steps of the attacked classifier (0: plain)",
    )
    p.add_argument(
        "--robust-chains",
        type=int,
        default=2,
        help="noisy SGLD chains averaged by the attacked classifier",
    )
    p.add_argument(
        "--robust-sigma",
        type=finite_float,
        default=0.0,
        help="std of the Gaussian noise added to the input to start each chain",
    )
    p.add_argument("--robust-n", type=int, default=100, help="number of test points attacked")


def _check_tasks(text: str) -> list[str]:
    tasks = _csv(text)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalError(
            f"--tasks: unknown task(s) {', '.join(unknown) or '(none given)'}; "
            f"expected a comma list of {', '.join(TASKS)}"
        )
    return [t for t in TASKS if t in tasks]


def _check_ranges(args: argparse.Namespace) -> None:
    for name in ("batch_size", "gen_n", "robust_chains", "robust_n"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    for name in ("refine_steps", "gen_steps", "pgd_steps", "robust_refine_steps"):
        if getattr(args, name) < 0:
            raise EvalError(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(args, name)}")
    if args.max_samples is not None and args.max_samples < 2:
        raise EvalError(f"--max-samples: expected >= 2, got {args.max_samples}")
    if args.pgd_step_size is not None and args.pgd_step_size <= 0:
        raise EvalError(f"--pgd-step-size: expected > 0, got {args.pgd_step_size}")
    for name in ("sgld_step_size", "sgld_noise", "robust_sigma"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise EvalError(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(args, name)}")


def _check_norms(text: str) -> list[str]:
    norms = _csv(text)
    if not norms or any(n not in NORMS for n in norms):
        raise EvalError(f"--pgd-norms: expected a comma list of {', '.join(NORMS)}, got {text!r}")
    return norms


def _check_eps(specs: list[str], norms: list[str]) -> dict[str, list[float]]:
    eps = {n: list(DEFAULT_EPS[n]) for n in norms}
    for spec in specs:
        target, _, values = spec.rpartition("=")
        if target and target not in NORMS:
            raise EvalError(
                f"--pgd-eps {spec!r}: unknown norm {target!r} (expected {', '.join(NORMS)})"
            )
        try:
            parsed = [float(v) for v in _csv(values)]
        except ValueError:
            raise EvalError(f"--pgd-eps {spec!r}: expected comma-separated numbers") from None
        if not parsed or any(not math.isfinite(v) or v < 0 for v in parsed):
            raise EvalError(f"--pgd-eps {spec!r}: expected non-negative finite numbers")
        for n in [target] if target else norms:
            if n in eps:
                eps[n] = sorted(set(parsed))
    return eps


def _check_ood(specs: list[str]) -> list[tuple[str, str | None]]:
    oods = []
    for spec in specs:
        name, _, folder = spec.partition(":")
        if not name:
            raise EvalError(f"--ood {spec!r}: expected NAME[:FOLDER]")
        if name in BUILTIN_OOD:
            raise EvalError(f"--ood {name}: a built-in OOD set, always evaluated")
        oods.append((name, os.path.abspath(folder) if folder else None))
    return oods


def _check_device(device: str) -> None:
    try:
        torch.device(device)
    except RuntimeError:
        raise EvalError(f"--device: unknown device {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available")


def parse_settings(argv: Sequence[str] | None = None) -> EvalSettings:
    """Parse and check the flags (raises :class:`EvalError` on bad input)."""
    args = build_parser().parse_args(argv)
    _check_ranges(args)
    _check_device(args.device)
    for flag, value in (("--model", args.model), ("--compare-model", args.compare_model)):
        if value is not None:
            try:
                factories.parse(value)
            except factories.FactoryError as err:
                raise EvalError(f"{flag} {err}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out}: exists and is not a folder")
    values = vars(args)
    paths = ("checkpoint", "compare", "out", "data_root", "inception_weights", "fid_classifier")
    for key in (*paths, "judge"):
        if values.get(key) is not None:  # report.json records absolute paths
            values[key] = os.path.abspath(values[key])
    norms = _check_norms(args.pgd_norms)
    values.update(
        tasks=_check_tasks(args.tasks),
        pgd_norms=norms,
        pgd_eps=_check_eps(args.pgd_eps, norms),
        ood=_check_ood(args.ood),
    )
    return EvalSettings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jem_ext.eval``; returns the exit status: 0, 1 when the report
    cannot be written (no space, a read-only file system: the output folder is left as it
    was), 2 on bad input, 130 after Ctrl-C and 143 after SIGTERM (nothing written either)."""
    settings, existed = None, False
    try:
        with terminate_as_interrupt():
            settings = parse_settings(argv)
            existed = Path(settings.out).exists()
            if Path(settings.out).is_dir():  # what an evaluation killed outright left behind
                remove_temporaries(settings.out)
            report = run(settings)
    except EvalError as err:
        print(f"jem_ext.eval: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        out = settings.out if settings is not None else None
        state = "is as it was" if existed else "was not created"
        print(
            f"jem_ext.eval: error: {write_failure(err, out)}; no report was written "
            f"(--out {out} {state})",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as err:
        status = interrupt_status(err)
        what = "terminated (SIGTERM)" if status == SIGTERM_STATUS else "interrupted"
        where = f" to --out {settings.out}" if settings is not None else ""
        print(f"\njem_ext.eval: {what}; no report was written{where}", file=sys.stderr)
        return status
    print(render_markdown(report, images=False))
    print(
        f"\nwrote {Path(settings.out) / 'report.json'}, report.md and "
        f"{len(report['files']) - 2} PNGs in {report['seconds']} s"
    )
    return 0
