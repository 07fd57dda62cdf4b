"""Where the CPU energy forward + backward spends its autograd time.

Times, in one process and interleaved within each repeat (thread CPU time,
one thread, medians), at 65536 x 10 and 4096 x 1000 float32:

* eager: ``-logits.logsumexp(1)`` and its backward;
* python: the kept-softmax forward and in-place backward behind a Python
  ``torch.autograd.Function`` (the design before the C++ autograd, with its
  negation of the incoming gradient);
* cpp: ``ops.energy``, the same kernels behind the C++ autograd of
  ``_energy_kept_softmax``;
* recompute: ``torch.ops.jem_ext.energy`` (the Python autograd that forward
  mode and torch.func use: the backward recomputes the exps).

Each call is ``autograd.grad(E.sum(), logits)``, as in bench_ops.py.

    python benchmarks/bench_energy_autograd.py [--repeats 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone

import torch

from jem_ext import ops
from jem_ext.bench import time_interleaved

SHAPES = [(65536, 10), (4096, 1000)]


class _PythonKeptSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        energy, probs = torch.ops.jem_ext._energy_softmax.default(logits)
        ctx.save_for_backward(logits, energy)
        ctx.probs = probs
        return energy

    @staticmethod
    def backward(ctx, grad):
        probs, ctx.probs = ctx.probs, None
        # the sign is the kernel's now; the negation keeps the old cost
        torch.ops.jem_ext._energy_softmax_backward_.default(probs, -grad)
        return probs


def fwd_bwd(energy_fn):
    def run(logits):
        (g,) = torch.autograd.grad(energy_fn(logits).sum(), [logits])
        return g

    return run


VARIANTS = {
    "eager": fwd_bwd(lambda t: -t.logsumexp(1)),
    "python": fwd_bwd(_PythonKeptSoftmax.apply),
    "cpp": fwd_bwd(ops.energy),
    "recompute": fwd_bwd(torch.ops.jem_ext.energy.default),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--json", help="write the medians to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(1)
    rows = []
    print(f"cpu level {torch.ops.jem_ext._cpu_level()}, torch {torch.__version__}, 1 thread")
    print(f"{'shape':>11} " + " ".join(f"{k + ' ms':>12}" for k in VARIANTS) + "  eager/cpp")
    for b, c in SHAPES:
        logits = torch.randn(b, c, requires_grad=True)
        fns = {k: (lambda fn=fn: fn(logits)) for k, fn in VARIANTS.items()}
        med = time_interleaved(fns, args.repeats, clock=time.thread_time)
        ratios = {f"eager_over_{k}": med["eager"] / med[k] for k in VARIANTS if k != "eager"}
        rows.append({"shape": [b, c], "median_s": med, **ratios})
        print(
            f"{f'{b}x{c}':>11} "
            + " ".join(f"{med[k] * 1e3:12.3f}" for k in VARIANTS)
            + f"  {ratios['eager_over_cpp']:9.2f}",
            flush=True,
        )
    if args.json:
        meta = {
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu_level": torch.ops.jem_ext._cpu_level(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
            "repeats": args.repeats,
            "load_average": os.getloadavg(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
