"""Flags, validation and the driver of ``python -m jem_ext.bench``."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import factory as factories
from .._cli import check_threads, interrupt_status, terminate_as_interrupt
from .._io import remove_temporaries, write_failure
from .chain import stage_chain
from .config import CPU_OPTIONS, GPU_OPTIONS, SMOKE, STAGES, Option, Sizes
from .ops import stage_env, stage_ops
from .report import markdown, write_results
from .timing import _guarded
from .train import stage_train


def run_bench(
    device: torch.device,
    sizes: Sizes,
    options: tuple[Option, ...],
    train_options: tuple[Option, ...],
    stages: tuple[str, ...],
    mode: str,
    budget_s: float = math.inf,
    on_stage: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the named stages; returns the results dict.

    Chain and training options not started within ``budget_s`` seconds are skipped (recorded
    as such); ``on_stage(results)`` is called after each stage (to save partial results).
    """
    deadline = time.perf_counter() + budget_s
    results: dict[str, Any] = {
        "mode": mode,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    runners = {
        "env": lambda: stage_env(device, sizes),
        "ops": lambda: stage_ops(device, sizes),
        "chain": lambda: stage_chain(device, sizes, options, deadline),
        "train": lambda: stage_train(device, sizes, train_options, deadline),
    }
    results["stage_seconds"] = {}
    for name in stages:
        start = time.perf_counter()
        results[name] = _guarded(runners[name])
        results["stage_seconds"][name] = seconds = time.perf_counter() - start
        print(
            f"bench: {name} done in {seconds:.1f} s"
            + (f" (error: {results[name]['error']})" if "error" in results[name] else ""),
            file=sys.stderr,
        )
        if on_stage is not None:
            on_stage(results)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jem_ext.bench",
        description="Time jem_ext's ops, SGLD chain and training iteration on one device "
        "against an eager copy of the JEM reference sampler; write bench.json and bench.md.",
    )
    p.add_argument("--out", required=True, help="folder for bench.json and bench.md")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device to measure (auto: cuda when available; --smoke uses cpu)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes on the CPU (a tiny WRN, K=2, few repeats): checks the script",
    )
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated stages to run, from {','.join(STAGES)}",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="leave out the torch.compile option (compilation takes minutes)",
    )
    p.add_argument(
        "--options",
        default=None,
        help="comma-separated names of the chain/training option sets to run (default: all "
        "of the device's, e.g. 'bf16 + cuda-graph + compile' alone)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed repeats per chain/train figure")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=math.inf,
        help="skip the chain/training options not started within this many seconds "
        "(results so far are written after every stage; default: no limit)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="PACKAGE.MODULE:FACTORY",
        help="time the chain and training iteration of this model factory's network (called "
        "with 10 classes and the image shape) instead of the WRN; --depth and --width do not "
        "apply to it",
    )
    sizes = p.add_argument_group("sizes (override the WRN-28-10, batch 64, K=20 defaults)")
    sizes.add_argument("--depth", type=int, default=None, help="WRN depth (6n+4)")
    sizes.add_argument("--width", type=int, default=None, help="WRN widen factor")
    sizes.add_argument("--batch", type=int, default=None, help="chains / images per batch")
    sizes.add_argument("--steps", type=int, default=None, help="SGLD steps per chain")
    sizes.add_argument("--image-size", type=int, default=None, help="image height and width")
    return p


def _override(sizes: Sizes, args: argparse.Namespace) -> Sizes:
    """``sizes`` with the sizes given on the command line."""
    given = {
        key: getattr(args, key)
        for key in ("reps", "depth", "width", "batch", "steps")
        if getattr(args, key) is not None
    }
    if args.image_size is not None:
        given["image"] = (sizes.image[0], args.image_size, args.image_size)
    if args.model is not None:
        given["model"] = args.model
    return replace(sizes, **given)


def _check_model(sizes: Sizes, args: argparse.Namespace) -> None:
    """A factory named by ``--model`` must build a model of 10 classes for the bench's images
    (one forward on a zero batch, on the CPU) and takes no --depth/--width (raises ValueError)."""
    if sizes.model is None:
        return
    given = [f"--{k}" for k in ("depth", "width") if getattr(args, k) is not None]
    if given:
        raise ValueError(f"{' and '.join(given)}: apply to the WRN, not to --model {sizes.model}")
    try:
        factories.build(sizes.model, 10, sizes.image)
    except factories.FactoryError as err:
        raise ValueError(f"--model {err}") from None


def _choose(
    args: argparse.Namespace,
) -> tuple[torch.device, Sizes, tuple[Option, ...], tuple[Option, ...]]:
    """Device, sizes and options from the parsed arguments (raises ValueError)."""
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"--stages: unknown {','.join(unknown)}; expected from {','.join(STAGES)}")
    if not args.budget_s > 0:
        raise ValueError(f"--budget-s: expected > 0, got {args.budget_s}")
    for key in ("reps", "depth", "width", "batch", "steps", "image_size"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')}: expected >= 1, got {value}")
    if args.depth is not None and (args.depth < 10 or (args.depth - 4) % 6):
        raise ValueError(f"--depth: expected 6n + 4 with n >= 1, got {args.depth}")
    name = "cpu" if args.smoke else args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    device = torch.device(name)
    sizes = SMOKE if args.smoke else Sizes()
    sizes = _override(sizes, args)
    _check_model(sizes, args)
    options = GPU_OPTIONS if device.type == "cuda" else CPU_OPTIONS
    if args.no_compile or args.smoke:
        options = tuple(o for o in options if not o.compile)
    if args.options is not None:
        wanted = [w.strip() for w in args.options.split(",") if w.strip()]
        known = {o.name for o in options}
        unknown = [w for w in wanted if w not in known]
        if unknown or not wanted:
            raise ValueError(
                f"--options: unknown {', '.join(unknown) or 'empty list'}; expected names from "
                f"{', '.join(sorted(known))}"
            )
        options = tuple(o for o in options if o.name in wanted)
    best = "bf16 + cuda-graph" if device.type == "cuda" else "bf16"
    train_options = tuple(o for o in options if o.name in ("fp32 eager", best))
    return device, sizes, options, train_options


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status: 0, 1 when the results cannot be written, 2 on bad
    input, 130 after Ctrl-C and 143 after SIGTERM (bench.json then holds the finished stages)."""
    args = build_parser().parse_args(argv)
    try:
        device, sizes, options, train_options = _choose(args)
        refused = check_threads(args.threads)
        if refused is not None:
            raise ValueError(refused)
    except ValueError as err:
        print(f"python -m jem_ext.bench: {err}", file=sys.stderr)
        return 2
    if args.threads > 0 or args.smoke:
        torch.set_num_threads(args.threads if args.threads > 0 else 1)
    stages = tuple(s for s in args.stages.split(",") if s)
    out = Path(args.out)
    try:
        with terminate_as_interrupt():
            out.mkdir(parents=True, exist_ok=True)
            remove_temporaries(out)
            results = run_bench(
                device,
                sizes,
                options,
                train_options,
                stages,
                "smoke" if args.smoke else "full",
                budget_s=args.budget_s,
                on_stage=lambda r: write_results(out, r),
            )
    except OSError as err:
        print(f"python -m jem_ext.bench: error: {write_failure(err, out)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        done = out / "bench.json"
        kept = f"; {done} holds the stages finished before" if done.is_file() else ""
        print(f"\npython -m jem_ext.bench: interrupted{kept}", file=sys.stderr)
        return interrupt_status(err)
    print(markdown(results))
    print(f"bench: wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
