"""Data-parallel scaling of JEM training: iterations per second with 1, 2, ... processes.

Each configuration starts ``N`` processes on this machine (gloo on the CPU, NCCL with one GPU
each on CUDA), joined exactly as torchrun joins them (``MASTER_ADDR``/``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``). Every process builds the trainer's run
(:func:`jem_ext.training.setup.build_run`: DistributedDataParallel for the loss, the chains on
the module, its replay-buffer shard) and times ``--iters`` iterations of
:func:`jem_ext.training.step.train_step` on its share of the global batch, after
``--warmup`` untimed ones. The figure is global iterations per second (the slowest process
sets the pace) and global samples per second; ``speed-up`` is relative to one process. The
process counts are measured in turn, ``--repeats`` times; the table shows the median and the
best repeat (which suffers less from other work sharing the machine).

The global batch (``--batch-size``) is the same for every N, as in training (strong scaling):
per iteration each process runs ``K`` SGLD steps on ``batch / N`` chains and one forward and
backward pass, then one all-reduce of the gradients (the chains need no communication).

    python benchmarks/bench_ddp.py --procs 1 2 --json benchmarks/out/ddp_cpu.json
    python benchmarks/bench_ddp.py --device cuda --procs 1 2 4 8 --model wrn --dataset cifar10 \\
        --data-root DATA --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jem_ext._cli import check_threads
from jem_ext._io import atomic_write_text
from jem_ext.bench import cpu_name, sync
from jem_ext.training import distributed
from jem_ext.training.config import config_from_mapping, default_config
from jem_ext.training.setup import build_run
from jem_ext.training.step import Batch, train_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, cfg: dict, args: argparse.Namespace, result_path: str
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    run_cfg = config_from_mapping(cfg)
    distributed.init_from_env(run_cfg)
    try:
        run = build_run(run_cfg)
        d = run.dist
        data = run.data.train_on_device
        batch = cfg["batch_size"] // world
        gen = torch.Generator().manual_seed(rank)

        def one_iteration() -> None:
            idx = torch.randint(len(data), (batch,), generator=gen).to(data.x.device)
            train_step(run.ctx, Batch(data.x[idx], data.y[idx]), run.objective)

        for _ in range(args.warmup):
            one_iteration()
        sync(run.device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.iters):
            one_iteration()
        sync(run.device)
        seconds = torch.tensor(
            [time.perf_counter() - start],
            dtype=torch.float64,
            device=run.device if d.backend == "nccl" else None,
        )
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest process sets the pace
        if d.is_main:
            with open(result_path, "w", encoding="utf-8") as f:
                json.dump({"seconds": float(seconds.item())}, f)
    finally:
        distributed.shutdown()


def measure(world: int, cfg: dict, args: argparse.Namespace) -> float:
    """Seconds of ``args.iters`` iterations with ``world`` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world, _free_port(), cfg, args, path), nprocs=world)
        with open(path, encoding="utf-8") as f:
            return json.load(f)["seconds"]


def summarise(world: int, seconds: list[float], cfg: dict, args: argparse.Namespace) -> dict:
    """Iterations and samples per second of one process count (median and best repeat)."""
    its = sorted(args.iters / s for s in seconds)
    median = statistics.median(its)
    return {
        "processes": world,
        "seconds": seconds,
        "iterations": args.iters,
        "iterations_per_s": median,
        "iterations_per_s_best": its[-1],
        "samples_per_s": median * cfg["batch_size"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--sgld-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--iters", type=int, default=30, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each count")
    p.add_argument("--json", metavar="OUT", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--repeats and --iters must be >= 1, --warmup >= 0")
    if any(n < 1 or args.batch_size % n for n in args.procs):
        p.error("--procs: every count must be >= 1 and divide --batch-size")
    refused = check_threads(args.threads)
    if refused is not None:
        p.error(refused)
    if args.device == "cuda" and max(args.procs) > torch.cuda.device_count():
        p.error(f"--procs: only {torch.cuda.device_count()} CUDA devices are visible")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = {
        **default_config(),
        "dataset": args.dataset,
        "data_root": args.data_root,
        "model": args.model,
        "batch_size": args.batch_size,
        "sgld_steps": args.sgld_steps,
        "threads": args.threads,
        "device": args.device,
        "out": "unused",
    }
    load_before = os.getloadavg()  # other work on the machine skews the figures
    seconds: dict[int, list[float]] = {n: [] for n in args.procs}
    for _ in range(args.repeats):
        for n in args.procs:
            seconds[n].append(measure(n, cfg, args))
    rows = [summarise(n, seconds[n], cfg, args) for n in args.procs]
    base = next((r for r in rows if r["processes"] == 1), rows[0])
    print(
        f"{'processes':>9} {'it/s':>8} {'best it/s':>10} {'samples/s':>10} {'speed-up':>9} "
        f"{'(best)':>7}"
    )
    for r in rows:
        r["speedup"] = r["iterations_per_s"] / base["iterations_per_s"]
        r["speedup_best"] = r["iterations_per_s_best"] / base["iterations_per_s_best"]
        print(
            f"{r['processes']:>9} {r['iterations_per_s']:>8.2f} "
            f"{r['iterations_per_s_best']:>10.2f} {r['samples_per_s']:>10.1f} "
            f"{r['speedup']:>8.2f}x {r['speedup_best']:>6.2f}x"
        )
    if args.json is not None:
        atomic_write_text(
            args.json,
            json.dumps(
                {
                    "benchmark": "bench_ddp",
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": {
                        "platform": platform.platform(),
                        "processor": cpu_name(),
                        "cpus": os.cpu_count(),
                        "load_average_before": load_before,
                        "load_average_after": os.getloadavg(),
                        "cuda": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                    },
                    "torch": torch.__version__,
                    "config": {
                        k: cfg[k]
                        for k in (
                            "dataset",
                            "model",
                            "batch_size",
                            "sgld_steps",
                            "threads",
                            "device",
                        )
                    },
                    "iters": args.iters,
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                    "results": rows,
                },
                indent=2,
            )
            + "\n",
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
