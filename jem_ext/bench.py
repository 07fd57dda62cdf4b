"""``python -m jem_ext.bench``: one-call speed validation of jem_ext on a device.

Stages (each guarded: a failing stage records its error in the JSON and the others still run):

* ``env`` -- torch, jem_ext build facts, device name.
* ``ops`` -- effective bandwidth of ``sgld_step_`` (16M elements) and of the energy's
  forward + backward (65536 x 10 logits), each against a device-to-device copy of the same size.
* ``chain`` -- images x steps per second of the SGLD chain (WRN-28-10, batch 64, K=20) for each
  speed option (precision, channels-last, CUDA graph, compile), against an eager copy of the
  JEM reference sampler (per step ``autograd.grad`` of ``logsumexp``, then
  ``x.data += -step * g + std * randn_like(x)``, buffer on the CPU) on the same device.
* ``train`` -- seconds per full training iteration (chain + loss + update) for fp32 eager and
  the fastest option set, and the projected hours of the full CIFAR-10 recipe (150 epochs of
  50,000 images, batch 64).

Results go to ``<out>/bench.json`` and ``<out>/bench.md``. ``--smoke`` runs every stage on the
CPU with tiny sizes (a tiny WRN, K=2, few repeats) so the script is exercised by the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import jem_ext

from . import ops
from ._io import atomic_write_text
from .models import build_model
from .sampler import ReplayBuffer, SGLDSampler
from .training import accel
from .training.step import Batch, LossWeights, StepContext, train_step

RECIPE = {"epochs": 150, "images": 50_000, "batch": 64}  # the CIFAR-10 JEM recipe


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of a bench run."""

    sgld_elements: int = 16 * 2**20
    energy_rows: int = 65536
    energy_classes: int = 10
    depth: int = 28
    width: int = 10
    image: tuple[int, int, int] = (3, 32, 32)
    batch: int = 64
    steps: int = 20
    buffer: int = 10000
    reps: int = 5
    op_reps: int = 50


SMOKE = Sizes(
    sgld_elements=4096,
    energy_rows=256,
    depth=10,
    width=1,
    image=(3, 8, 8),
    batch=4,
    steps=2,
    buffer=32,
    reps=2,
    op_reps=3,
)


@dataclass(frozen=True)
class Option:
    """One set of speed options for the chain and training stages."""

    name: str
    precision: str = "fp32"
    channels_last: bool = False
    cuda_graph: bool = False
    compile: bool = False


GPU_OPTIONS = (  # most telling first: a spent --budget-s skips from the end
    Option("fp32 eager"),
    Option("bf16", "bf16"),
    Option("bf16 + cuda-graph", "bf16", cuda_graph=True),
    Option("bf16 + channels-last", "bf16", channels_last=True),
    Option("bf16 + channels-last + cuda-graph", "bf16", channels_last=True, cuda_graph=True),
    Option("bf16 + cuda-graph + compile", "bf16", cuda_graph=True, compile=True),
)
CPU_OPTIONS = (
    Option("fp32 eager"),
    Option("bf16", "bf16"),
    Option("fp32 + channels-last", channels_last=True),
    Option("fp32 + compile", compile=True),
)


# ------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1
) -> dict[str, float]:
    """Median and best wall seconds of ``fn()`` over ``reps`` runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "best_s": min(times)}


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# ------------------------------------------------------------------------- stages


def stage_env(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Versions, build facts and the device's name."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "jem_ext": jem_ext.__version__,
        "build": dict(jem_ext.build_info),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "sizes": asdict(sizes),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def stage_ops(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Bandwidth of sgld_step_ and of the energy's forward + backward against a copy."""
    n, gen = sizes.sgld_elements, torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device)
    g = torch.randn(n, device=device)
    dst = torch.empty_like(x)
    copy = time_call(lambda: dst.copy_(x), device, sizes.op_reps)
    sgld = time_call(lambda: ops.sgld_step_(x, g, 1.0, 0.01, generator=gen), device, sizes.op_reps)
    copy_gbps = _gbps(2 * 4 * n, copy["median_s"])
    sgld_gbps = _gbps(3 * 4 * n, sgld["median_s"])  # read x and g, write x

    rows, classes = sizes.energy_rows, sizes.energy_classes
    logits = torch.randn(rows, classes, device=device, requires_grad=True)
    small = torch.empty(rows * classes, device=device)
    src = torch.randn(rows * classes, device=device)
    e_copy = time_call(lambda: small.copy_(src), device, sizes.op_reps)

    def energy_fb() -> None:
        (grad,) = torch.autograd.grad(ops.energy(logits).sum(), [logits])

    energy = time_call(energy_fb, device, sizes.op_reps)
    # forward reads the logits; backward reads them again and writes their gradient
    energy_bytes = 3 * 4 * rows * classes + 3 * 4 * rows
    e_copy_gbps = _gbps(2 * 4 * rows * classes, e_copy["median_s"])
    energy_gbps = _gbps(energy_bytes, energy["median_s"])
    return {
        "copy": {**copy, "gbps": copy_gbps, "elements": n},
        "sgld_step_": {**sgld, "gbps": sgld_gbps, "fraction_of_copy": sgld_gbps / copy_gbps},
        "energy_copy": {**e_copy, "gbps": e_copy_gbps},
        "energy_fwd_bwd": {
            **energy,
            "gbps": energy_gbps,
            "rows": rows,
            "classes": classes,
            "fraction_of_copy": energy_gbps / e_copy_gbps,
        },
    }


def _wrn(sizes: Sizes, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("wrn", 10, sizes.image, depth=sizes.depth, widen_factor=sizes.width)
    return model.to(device)


class ReferenceSampler:
    """Eager copy of the JEM reference sampler: CPU buffer, ``autograd.grad`` of logsumexp and
    ``x.data += -step * g + std * randn_like(x)`` per step (``g = dE/dx``)."""

    def __init__(
        self,
        sizes: Sizes,
        device: torch.device,
        step: float = 1.0,
        std: float = 0.01,
        reinit: float = 0.05,
    ) -> None:
        self.buffer = torch.empty(sizes.buffer, *sizes.image).uniform_(-1, 1)
        self.device, self.steps, self.step, self.std, self.reinit = (
            device,
            sizes.steps,
            step,
            std,
            reinit,
        )

    def sample(self, model: nn.Module, batch: int) -> Tensor:
        idx = torch.randint(0, len(self.buffer), (batch,))
        fresh = torch.empty(batch, *self.buffer.shape[1:]).uniform_(-1, 1)
        pick = (torch.rand(batch) < self.reinit).float().view(batch, 1, 1, 1)
        x = (pick * fresh + (1 - pick) * self.buffer[idx]).to(self.device).requires_grad_(True)
        model.eval()
        for _ in range(self.steps):
            (g,) = torch.autograd.grad(-model(x).logsumexp(1).sum(), [x], retain_graph=True)
            x.data += -self.step * g + self.std * torch.randn_like(x)
        model.train()
        self.buffer[idx] = x.detach().cpu()
        return x.detach()


def _sampler(sizes: Sizes, device: torch.device) -> SGLDSampler:
    gen = torch.Generator(device=device).manual_seed(1)
    buffer = ReplayBuffer(sizes.buffer, sizes.image, device=device, generator=gen)
    return SGLDSampler(n_steps=sizes.steps, buffer=buffer)


def _context(option: Option, sizes: Sizes, device: torch.device) -> StepContext:
    model = _wrn(sizes, device)
    ctx = StepContext(
        model_for_chain=model,
        model_for_loss=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-4),
        sampler=_sampler(sizes, device),
        generator=torch.Generator(device=device).manual_seed(2),
    )
    accel.apply_speed_options(
        ctx,
        {
            "precision": option.precision,
            "channels_last": option.channels_last,
            "compile": option.compile,
            "cuda_graph": option.cuda_graph,
        },
        device,
    )
    return ctx


def _rate(sizes: Sizes, timing: dict[str, float]) -> dict[str, float]:
    work = sizes.batch * sizes.steps
    return {
        **timing,
        "images_steps_per_s": work / timing["median_s"],
        "best_images_steps_per_s": work / timing["best_s"],
    }


def stage_chain(
    device: torch.device, sizes: Sizes, options: tuple[Option, ...], deadline: float = math.inf
) -> dict[str, Any]:
    """Chain throughput of each option set and of the reference sampler (options not started
    by ``deadline``, a ``time.perf_counter()`` value, are recorded as skipped)."""
    model = _wrn(sizes, device)
    ref = ReferenceSampler(sizes, device)

    def reference() -> Tensor:
        return ref.sample(model, sizes.batch)

    out: dict[str, Any] = {"reference": _rate(sizes, time_call(reference, device, sizes.reps))}
    for option in options:
        out[option.name] = _within(
            deadline, lambda: _chain_option(option, sizes, device, reference)
        )
    return out


def _chain_option(
    option: Option, sizes: Sizes, device: torch.device, reference: Callable[[], Any]
) -> dict[str, Any]:
    """The option's chain timed alternately with the reference chain (so that other load on
    the machine hits both alike); the speed-up is the ratio of their medians."""
    ctx = _context(option, sizes, device)
    start = time.perf_counter()
    ctx.sampler.sample(ctx.model_for_chain, sizes.batch, generator=ctx.generator)
    _sync(device)
    first = time.perf_counter() - start  # capture / compilation included
    ours, ref = [], []
    for _ in range(sizes.reps):
        ref.append(time_call(reference, device, 1, warmup=0)["median_s"])
        ours.append(
            time_call(
                lambda: ctx.sampler.sample(
                    ctx.model_for_chain, sizes.batch, generator=ctx.generator
                ),
                device,
                1,
                warmup=0,
            )["median_s"]
        )
    res = _rate(sizes, {"median_s": statistics.median(ours), "best_s": min(ours)})
    return {
        **res,
        "first_call_s": first,
        "reference_median_s": statistics.median(ref),
        "speedup_vs_reference": statistics.median(ref) / res["median_s"],
    }


def stage_train(
    device: torch.device, sizes: Sizes, options: tuple[Option, ...], deadline: float = math.inf
) -> dict[str, Any]:
    """Seconds per training iteration and the projected hours of the full recipe."""
    iters = math.ceil(RECIPE["images"] / RECIPE["batch"]) * RECIPE["epochs"]
    out: dict[str, Any] = {"recipe": {**RECIPE, "iterations": iters}}
    for option in options:
        out[option.name] = _within(deadline, lambda: _train_option(option, sizes, device, iters))
    return out


def _train_option(option: Option, sizes: Sizes, device: torch.device, iters: int) -> dict[str, Any]:
    ctx = _context(option, sizes, device)
    x = torch.rand(sizes.batch, *sizes.image, device=device) * 2 - 1
    batch = Batch(x, torch.randint(0, 10, (sizes.batch,), device=device))
    weights = LossWeights(l2_energy=0.1)
    timing = time_call(lambda: train_step(ctx, batch, weights), device, sizes.reps, warmup=2)
    return {**timing, "projected_hours": timing["median_s"] * iters / 3600}


def _within(deadline: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``_guarded(fn)`` when there is time left before ``deadline``, else a skip record."""
    if time.perf_counter() > deadline:
        return {"skipped": "time budget (--budget-s) spent"}
    return _guarded(fn)


def _guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or ``{"error": ...}`` when it raises (the other stages still run)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 -- a bench stage must not lose the others
        tb = traceback.format_exc(limit=3).strip().splitlines()
        return {"error": f"{type(err).__name__}: {err}".strip(), "where": tb[-3:]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------- report


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
    if "ops" in results:
        lines += _ops_table(results["ops"])
    if "chain" in results:
        lines += _chain_table(results["chain"])
    if "train" in results:
        lines += _train_table(results["train"])
    return "\n".join(lines) + "\n"


def _ops_table(ops_r: dict[str, Any]) -> list[str]:
    lines = ["| op | median ms | GB/s | fraction of copy |", "|---|---:|---:|---:|"]
    for name in ("copy", "sgld_step_", "energy_copy", "energy_fwd_bwd"):
        r = ops_r.get(name, {})
        ms = None if "median_s" not in r else r["median_s"] * 1e3
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


STAGES = ("env", "ops", "chain", "train")


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
    p.add_argument("--reps", type=int, default=None, help="timed repeats per chain/train figure")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=math.inf,
        help="skip the chain/training options not started within this many seconds "
        "(results so far are written after every stage; default: no limit)",
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
    return replace(sizes, **given)


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
    options = GPU_OPTIONS if device.type == "cuda" else CPU_OPTIONS
    if args.no_compile or args.smoke:
        options = tuple(o for o in options if not o.compile)
    best = "bf16 + cuda-graph" if device.type == "cuda" else "bf16"
    train_options = tuple(o for o in options if o.name in ("fp32 eager", best))
    return device, sizes, options, train_options


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device, sizes, options, train_options = _choose(args)
    except ValueError as err:
        print(f"python -m jem_ext.bench: {err}", file=sys.stderr)
        return 2
    if args.threads > 0 or args.smoke:
        torch.set_num_threads(args.threads if args.threads > 0 else 1)
    stages = tuple(s for s in args.stages.split(",") if s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    print(markdown(results))
    print(f"bench: wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``bench.json`` and ``bench.md`` of ``results`` in ``out`` (atomically)."""
    atomic_write_text(out / "bench.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(out / "bench.md", markdown(results))


if __name__ == "__main__":
    sys.exit(main())
