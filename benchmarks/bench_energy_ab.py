"""Before / after timing of the CPU energy forward + backward, one build per process.

Times, in one process and interleaved within each repeat (thread CPU time,
one thread, medians), at 65536 x 10, 65536 x 100 and 4096 x 1000 float32:

* eager: ``-logits.logsumexp(1)`` and its backward;
* fused: ``ops.energy`` and its backward (the kept softmax on the CPU);
* fwd_softmax: ``_energy_softmax`` alone (the forward that keeps its softmax).

Each forward + backward is ``autograd.grad(E.sum(), logits)``, as in
bench_ops.py. Two builds cannot share a process (both register the jem_ext
ops), so a comparison runs this script alternately with the build under
test and with an older one, installed or unpacked into a directory (a
``pip wheel`` of another commit, unzipped):

    python benchmarks/bench_energy_ab.py [--repeats 100] [--json out.json]
    python benchmarks/bench_energy_ab.py --jem-ext-from /tmp/old-build --json before.json

JEM_EXT_CPU_LEVEL and ATEN_CPU_CAPABILITY force the two sides' levels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone

SHAPES = [(65536, 10), (65536, 100), (4096, 1000)]


def load_ops(root: str | None):
    if root is not None:
        sys.path.insert(0, root)
        # an editable install's import hook would find the source tree's build first
        sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__]
    from jem_ext import ops

    return ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--repeats",
        type=int,
        default=100,
        help="repeats at 65536x10 (a quarter, at least 20, at the larger shapes)",
    )
    p.add_argument("--json", help="write the medians to this JSON file")
    p.add_argument(
        "--jem-ext-from",
        metavar="DIR",
        help="import jem_ext from DIR instead of this environment's build",
    )
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.jem_ext_from is not None and not os.path.isdir(
        os.path.join(args.jem_ext_from, "jem_ext")
    ):
        p.error(
            f"--jem-ext-from: {args.jem_ext_from} holds no jem_ext package (expected DIR/jem_ext)"
        )
    ops = load_ops(args.jem_ext_from)
    import torch

    torch.set_num_threads(1)
    level = torch.ops.jem_ext._cpu_level()
    label = args.jem_ext_from or "this build"
    print(
        f"jem_ext from {os.path.dirname(ops.__file__)}, cpu level {level}, "
        f"torch {torch.__version__}, 1 thread"
    )
    rows = []
    for b, c in SHAPES:
        torch.manual_seed(0)
        logits = torch.randn(b, c, requires_grad=True)

        def eager():
            (g,) = torch.autograd.grad((-logits.logsumexp(1)).sum(), [logits])
            return g

        def fused():
            (g,) = torch.autograd.grad(ops.energy(logits).sum(), [logits])
            return g

        def fwd_softmax():
            return torch.ops.jem_ext._energy_softmax(logits.detach())

        fns = {"eager": eager, "fused": fused, "fwd_softmax": fwd_softmax}
        for fn in fns.values():  # warm-up
            fn()
        times = {k: [] for k in fns}
        for _ in range(args.repeats if c <= 16 else max(20, args.repeats // 4)):
            for k, fn in fns.items():
                t0 = time.thread_time()
                fn()
                times[k].append(time.thread_time() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {"shape": [b, c], "median_s": med, "eager_over_fused": med["eager"] / med["fused"]}
        )
        print(
            f"{label}: {b}x{c}: "
            + " ".join(f"{k} {v * 1e3:.3f} ms" for k, v in med.items())
            + f"  eager/fused {med['eager'] / med['fused']:.2f}",
            flush=True,
        )
    if args.json:
        meta = {
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "jem_ext_from": label,
            "cpu_level": level,
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
