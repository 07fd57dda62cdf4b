"""Micro-benchmarks of jem_ext's fused ops against eager PyTorch.

* sgld_step_: the fused op against the JEM reference's eager update
  (``x.data += -step * grad + std * torch.randn_like(x)`` then a clamp) and
  against torch.compile of that eager code; 1e4 to 1.6e7 elements. Beside
  the ratios, the fraction of the memory limit the op reaches: the op moves
  1.5 times the bytes of a copy of x (reads x and grad, writes x), so
  ``fraction = 1.5 * t_copy / t_fused``, with the copy (a clone's reads and
  writes, into a tensor allocated once, so that fresh pages do not count)
  and the op interleaved in repeats of their own (the eager update's
  temporaries would otherwise evict the copy's data from the caches).
  Unlike a ratio to eager torch, which depends on torch's kernels and the
  CPU, that fraction travels between machines. The limit is that of
  whichever level holds the data: beyond the caches, memory bandwidth
  (at 4M elements x and grad, 32 MB, sit in L3 only on CPUs with a large one).
* energy forward + backward: ``ops.energy`` against ``-logits.logsumexp(1)``
  with autograd (and its torch.compile), logits 64x10, 65536x10, 4096x1000;
  and ``ops.energy_ce`` against the eager pair a JEM loss needs
  (``-logsumexp`` and ``cross_entropy``, two logsumexps).

CPU with one thread and with all threads; CUDA when present (with GB/s of
the bytes each op must move). Medians over many repeats; prints a table and
writes JSON (--json). Ratios are "eager time / fused time" from one run.
The CPU kernels of both ops run at the best instruction-set level the CPU
supports, or at the one --cpu-level (or JEM_EXT_CPU_LEVEL) names; the JSON
records it. Eager torch runs at its own default level, as users run it.
To emulate an older CPU for eager PyTorch too, set ATEN_CPU_CAPABILITY
(avx2, default) in the environment; the JSON records torch's level as well.

    python benchmarks/bench_ops.py --json benchmarks/out/ops.json
    python benchmarks/bench_ops.py --quick --threads 1 --cpu-level avx2 --json out.json
    python benchmarks/bench_ops.py --threads 1 --no-compile --no-energy --rounds 3 \
        --sgld-sizes 4000000 --cpu-level avx512   # the SGLD row alone, three rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

import jem_ext
from jem_ext import ops
from jem_ext._cli import check_threads
from jem_ext.bench import cpu_name, time_interleaved

CPU_LEVELS = ["avx512", "avx2", "baseline"]
CPU_LEVEL_ENV = "JEM_EXT_CPU_LEVEL"
SGLD_SIZES = [10_000, 100_000, 1_000_000, 4_000_000, 16_000_000]
LOGIT_SHAPES = [(64, 10), (65536, 10), (4096, 1000)]
STEP, STD = 1.0, 0.01


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def timeit(
    fns, device: str, min_time: float, min_reps: int = 5, max_reps: int = 500, clock: str = "wall"
) -> list[float]:
    """Median seconds per call of each of `fns` (None: skipped, None back).

    The functions run in turn within each repeat, so a change in the
    machine's load slows all of them alike and their ratios stay fair.
    Repeats fill about `min_time` for the slowest function. The "cpu" clock
    counts the calling thread's CPU time only (one-thread CPU runs on a
    shared machine: time spent descheduled is left out).
    """
    live = {i: fn for i, fn in enumerate(fns) if fn is not None}
    dev = torch.device(device)
    # two warm-up rounds (and compilation), then one timed round sizes the repeats
    probe = time_interleaved(live, 1, dev, CLOCKS[clock], warmup=2)
    one = max(max(probe.values()), 1e-7)
    reps = int(min(max_reps, max(min_reps, min_time / one)))
    med = time_interleaved(live, reps, dev, CLOCKS[clock], warmup=0)
    return [med.get(i) for i in range(len(fns))]


def eager_sgld(x, grad):
    # The JEM reference's update (sign flipped: grad here is dE/dx).
    x.data += -STEP * grad + STD * torch.randn_like(x)
    x.data.clamp_(-1.0, 1.0)


def eager_sgld_inplace(x, grad):
    # The same update without `.data` (which torch.compile cannot trace):
    # the form compiled as the "torch.compile of the eager code" baseline.
    with torch.no_grad():
        x.add_(-STEP * grad + STD * torch.randn_like(x)).clamp_(-1.0, 1.0)


def fused_sgld(x, grad):
    ops.sgld_step_(x, grad, STEP, STD, clamp_min=-1.0, clamp_max=1.0)


def eager_energy_fb(logits):
    e = -logits.logsumexp(1)
    (g,) = torch.autograd.grad(e.sum(), [logits])
    return g


def fused_energy_fb(logits):
    e = ops.energy(logits)
    (g,) = torch.autograd.grad(e.sum(), [logits])
    return g


def eager_energy_ce_fb(logits, y):
    # What a JEM loss needs, written eagerly: logsumexp twice.
    e = -logits.logsumexp(1)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    (g,) = torch.autograd.grad(e.sum() + ce.sum(), [logits])
    return g


def fused_energy_ce_fb(logits, y):
    e, ce = ops.energy_ce(logits, y)
    (g,) = torch.autograd.grad(e.sum() + ce.sum(), [logits])
    return g


def timing_row(op: str, label: str, size, times, bytes_moved: int) -> dict:
    """One result row from the (eager, fused, compiled or None) seconds of an op."""
    t_eager, t_fused, t_comp = times
    return dict(
        op=op,
        device=label,
        size=size,
        eager_s=t_eager,
        fused_s=t_fused,
        compiled_s=t_comp,
        speedup_vs_eager=t_eager / t_fused,
        speedup_vs_compiled=(t_comp / t_fused) if t_comp else None,
        fused_GBps=bytes_moved / t_fused / 1e9,
    )


def sgld_row(label: str, n: int, rounds: list[dict]) -> dict:
    """The sgld_step_ row from its rounds: timing_row (each time the median over the
    rounds), plus the copy and the fraction of the memory limit."""

    def med(key):
        vals = [r[key] for r in rounds]
        return None if vals[0] is None else statistics.median(vals)

    times = (med("eager_s"), med("fused_s"), med("compiled_s"))
    row = timing_row("sgld_step_", label, n, times, 3 * n * 4)
    t_copy, t_fused_copy = med("copy_s"), med("fused_with_copy_s")
    row.update(
        copy_s=t_copy,
        fused_with_copy_s=t_fused_copy,
        # The op moves 1.5 copies' bytes: at the memory limit it takes 1.5 copies' time.
        fraction_of_memory_limit=1.5 * t_copy / t_fused_copy,
        rounds=rounds,
    )
    return row


def bench_device(
    device: str,
    threads: int | None,
    min_time: float,
    compile_: bool,
    sizes,
    shapes,
    clock: str = "wall",
    n_rounds: int = 1,
) -> list[dict]:
    rows = []
    label = device if threads is None else f"{device}/{threads}t"
    compiled_sgld = torch.compile(eager_sgld_inplace) if compile_ else None
    compiled_energy = torch.compile(eager_energy_fb) if compile_ else None
    compiled_energy_ce = torch.compile(eager_energy_ce_fb) if compile_ else None
    for n in sizes:
        x = torch.rand(n, device=device) * 2 - 1
        grad = torch.randn(n, device=device)
        copy = torch.empty_like(x)
        # Rounds of interleaved repeats: the op against eager (and compiled), then the op
        # against the copy on its own (the eager update's temporaries would evict the
        # copy's data from the caches and slow it, which is no limit of the op's).
        rounds = []
        for _ in range(n_rounds):
            t_eager, t_fused, t_comp = timeit(
                [
                    lambda: eager_sgld(x, grad),
                    lambda: fused_sgld(x, grad),
                    (lambda: compiled_sgld(x, grad)) if compile_ else None,
                ],
                device,
                min_time,
                clock=clock,
            )
            t_fused_copy, t_copy = timeit(
                [lambda: fused_sgld(x, grad), lambda: copy.copy_(x)],
                device,
                min_time,
                clock=clock,
            )
            rounds.append(
                dict(
                    eager_s=t_eager,
                    fused_s=t_fused,
                    compiled_s=t_comp,
                    fused_with_copy_s=t_fused_copy,
                    copy_s=t_copy,
                )
            )
        rows.append(sgld_row(label, n, rounds))
        print(fmt(rows[-1]), flush=True)
    for b, c in shapes:
        logits = torch.randn(b, c, device=device, requires_grad=True)
        t_eager, t_fused, t_comp = timeit(
            [
                lambda: eager_energy_fb(logits),
                lambda: fused_energy_fb(logits),
                (lambda: compiled_energy(logits)) if compile_ else None,
            ],
            device,
            min_time,
            clock=clock,
        )
        bytes_moved = 3 * b * c * logits.element_size()  # fwd read, bwd read + write
        rows.append(
            timing_row("energy fwd+bwd", label, f"{b}x{c}", (t_eager, t_fused, t_comp), bytes_moved)
        )
        print(fmt(rows[-1]), flush=True)
    for b, c in shapes:  # the JEM loss's pair: energy and cross-entropy
        logits = torch.randn(b, c, device=device, requires_grad=True)
        y = torch.randint(0, c, (b,), device=device)
        t_eager, t_fused, t_comp = timeit(
            [
                lambda: eager_energy_ce_fb(logits, y),
                lambda: fused_energy_ce_fb(logits, y),
                (lambda: compiled_energy_ce(logits, y)) if compile_ else None,
            ],
            device,
            min_time,
            clock=clock,
        )
        bytes_moved = 3 * b * c * logits.element_size()
        rows.append(
            timing_row("energy_ce f+b", label, f"{b}x{c}", (t_eager, t_fused, t_comp), bytes_moved)
        )
        print(fmt(rows[-1]), flush=True)
    return rows


HEADER = (
    f"{'op':<15} {'device':<8} {'size':>11} {'eager ms':>9} {'compiled ms':>11} "
    f"{'fused ms':>9} {'x eager':>8} {'x compiled':>10} {'fused GB/s':>10} {'of mem limit':>12}"
)


def fmt(r: dict) -> str:
    comp = f"{r['compiled_s'] * 1e3:11.3f}" if r["compiled_s"] else f"{'-':>11}"
    xcomp = f"{r['speedup_vs_compiled']:10.2f}" if r["speedup_vs_compiled"] else f"{'-':>10}"
    mem = f"{r['fraction_of_memory_limit']:.0%}" if "fraction_of_memory_limit" in r else "-"
    return (
        f"{r['op']:<15} {r['device']:<8} {str(r['size']):>11} {r['eager_s'] * 1e3:9.3f} "
        f"{comp} {r['fused_s'] * 1e3:9.3f} {r['speedup_vs_eager']:8.2f} {xcomp} "
        f"{r['fused_GBps']:10.2f} {mem:>12}"
    )


def select_cpu_level(level: str | None) -> str:
    """Force the CPU kernels' level (before their first call); the level in use."""
    if level is not None:
        os.environ[CPU_LEVEL_ENV] = level
    return torch.ops.jem_ext._cpu_level()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", help="write all measurements to this JSON file")
    p.add_argument(
        "--min-time",
        type=float,
        default=0.5,
        help="seconds of repeats per measurement (the median is reported)",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile baselines (they compile for ~10 s per shape)",
    )
    p.add_argument(
        "--threads",
        type=int,
        nargs="*",
        default=None,
        help="CPU thread counts to run (default: 1 and all cores)",
    )
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU runs")
    p.add_argument("--no-energy", action="store_true", help="only sgld_step_ (skip the energy ops)")
    p.add_argument(
        "--sgld-sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help=f"sgld_step_ sizes in elements (default: {SGLD_SIZES}; --quick: 4000000)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="sgld_step_: rounds of interleaved repeats (times: the median over rounds)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="only the target sizes (4M elements; 65536x10, 4096x1000)",
    )
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="CPU runs: wall time, or the calling thread's CPU time (for --threads 1 "
        "on a shared machine)",
    )
    p.add_argument(
        "--cpu-level",
        choices=CPU_LEVELS,
        default=None,
        help=f"instruction-set level of the CPU kernels (sets {CPU_LEVEL_ENV}; "
        "default: the best this CPU supports)",
    )
    args = p.parse_args(argv)
    refused = next(filter(None, map(check_threads, args.threads or [])), None)
    if refused is not None:
        print(f"bench_ops.py: {refused}", file=sys.stderr)
        return 2
    if args.clock == "cpu" and args.threads != [1]:
        print(
            "bench_ops.py: --clock cpu counts one thread's time: use it with --threads 1",
            file=sys.stderr,
        )
        return 2
    bad = [n for n in args.sgld_sizes or [] if n < 1]
    if bad or args.rounds < 1:
        what = f"--sgld-sizes {bad[0]}" if bad else f"--rounds {args.rounds}"
        print(f"bench_ops.py: {what}: expected a positive integer", file=sys.stderr)
        return 2
    try:
        cpu_level = select_cpu_level(args.cpu_level)
    except RuntimeError as e:
        print(f"bench_ops.py: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2

    sizes = args.sgld_sizes or ([4_000_000] if args.quick else SGLD_SIZES)
    shapes = [] if args.no_energy else LOGIT_SHAPES[1:] if args.quick else LOGIT_SHAPES
    all_threads = torch.get_num_threads()
    threads = args.threads or sorted({1, all_threads})
    print(
        f"jem_ext {jem_ext.__version__}, torch {torch.__version__}, "
        f"{cpu_name()}, CPU level {cpu_level} (torch: "
        f"{torch.backends.cpu.get_cpu_capability()}), {all_threads} threads"
    )
    print(HEADER)
    rows = []
    if not args.no_cpu:
        for t in threads:
            torch.set_num_threads(t)
            rows += bench_device(
                "cpu", t, args.min_time, not args.no_compile, sizes, shapes, args.clock, args.rounds
            )
        torch.set_num_threads(all_threads)
    if torch.cuda.is_available():
        rows += bench_device(
            "cuda", None, args.min_time, not args.no_compile, sizes, shapes, n_rounds=args.rounds
        )
        # The copy bandwidth a memory-bound elementwise op can hope for.
        n = 16_000_000
        a = torch.empty(n, device="cuda")
        (t_copy,) = timeit([lambda: a.clone()], "cuda", args.min_time)
        copy_gbps = 2 * n * 4 / t_copy / 1e9
        print(f"cuda copy bandwidth (clone of 16M float32): {copy_gbps:.1f} GB/s")
        rows.append(dict(op="copy", device="cuda", size=n, fused_GBps=copy_gbps))
    if args.json:
        meta = dict(
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            torch=torch.__version__,
            jem_ext=jem_ext.__version__,
            cpu=cpu_name(),
            cpu_level=cpu_level,
            threads=all_threads,
            cpu_clock=args.clock,
            torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
            gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            build=jem_ext.build_info,
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
