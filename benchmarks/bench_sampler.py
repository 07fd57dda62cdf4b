"""End-to-end SGLD sampler benchmark: jem_ext.sampler vs. an eager copy of the JEM reference.

For each configuration (model, input shape, batch) both samplers draw a batch of chain starts
from a replay buffer and run the same number of SGLD steps on the same model instance:

* ``jem_ext``: :class:`jem_ext.sampler.SGLDSampler` with a :class:`ReplayBuffer` on the model's
  device (``ops.energy`` + ``torch.autograd.grad`` + fused ``ops.sgld_step_``, write-back).
* ``reference``: :class:`jem_ext.bench.ReferenceSampler`, the loop of wgrathwohl/JEM
  ``train_wrn_ebm.py``: the buffer is a CPU tensor
  (random indices, uniform re-init of 5% of rows, ``.to(device)``), then per step
  ``torch.autograd.grad(model(x).logsumexp(1).sum(), [x], retain_graph=True)[0]`` and
  ``x.data += step * g + std * torch.randn_like(x)``, and the result copied back to the CPU buffer.

The two are timed alternately in the same process; the figure is images x steps per second
(batch * steps / seconds per chain), median over repeats, and the table shows the ratio
jem_ext / reference of the medians, and of the best repeats ("ratio(best)", which suffers less from
other processes sharing the machine). Example::

    python benchmarks/bench_sampler.py --threads 2 --repeats 5 --json bench.json
    python benchmarks/bench_sampler.py --wrn --wrn-batch 16 --wrn-steps 20 --wrn-repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone

import torch
from tqdm import tqdm

from jem_ext._cli import check_threads
from jem_ext._io import atomic_write_text
from jem_ext.bench import ReferenceSampler, time_call
from jem_ext.models import build_model
from jem_ext.sampler import ReplayBuffer, SGLDSampler


def bench_config(
    name,
    model_name,
    in_shape,
    batch,
    steps,
    repeats,
    warmup,
    buffer_size,
    device,
    seed,
    model_kwargs=None,
):
    """Time both samplers on one configuration; returns a result dict."""
    torch.manual_seed(seed)
    model = build_model(model_name, 10, in_shape, **(model_kwargs or {})).to(device).train()
    gen = torch.Generator(device=device).manual_seed(seed)
    ours = SGLDSampler(
        n_steps=steps,
        step_size=1.0,
        noise_std=0.01,
        buffer=ReplayBuffer(buffer_size, in_shape, device=device, reinit_prob=0.05, generator=gen),
    )
    ref = ReferenceSampler(buffer_size, in_shape, device, steps)
    runs = {
        "jem_ext": lambda: ours.sample(model, batch, generator=gen),
        "reference": lambda: ref.sample(model, batch),
    }
    times = {k: [] for k in runs}
    for _ in range(warmup):
        for fn in runs.values():
            time_call(fn, device, 1, warmup=0)
    for _ in tqdm(range(repeats), desc=name, leave=False, file=sys.stderr):
        for k, fn in runs.items():  # alternate so drifts in machine load hit both alike
            times[k].append(time_call(fn, device, 1, warmup=0)["best_s"])
    res = {
        "name": name,
        "model": model_name,
        "in_shape": list(in_shape),
        "batch": batch,
        "steps": steps,
        "repeats": repeats,
        "seconds": times,
    }
    for k, ts in times.items():
        res[f"{k}_median_s"] = statistics.median(ts)
        res[f"{k}_img_steps_per_s"] = batch * steps / statistics.median(ts)
        res[f"{k}_min_s"] = min(ts)
    res["ratio"] = res["jem_ext_img_steps_per_s"] / res["reference_img_steps_per_s"]
    # best-of-repeats ratio: less sensitive to other processes sharing the machine
    res["ratio_min"] = res["reference_min_s"] / res["jem_ext_min_s"]
    return res


def print_table(results):
    head = (
        f"{'config':<22}{'batch':>6}{'steps':>6}{'reps':>5}"
        f"{'jem_ext img*step/s':>20}{'reference img*step/s':>22}{'ratio':>8}{'ratio(best)':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['name']:<22}{r['batch']:>6}{r['steps']:>6}{r['repeats']:>5}"
            f"{r['jem_ext_img_steps_per_s']:>20.1f}{r['reference_img_steps_per_s']:>22.1f}"
            f"{r['ratio']:>8.2f}{r['ratio_min']:>12.2f}"
        )


def int_at_least(low):
    """argparse type: an integer >= low."""

    def parse(s):
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {s!r}")
        return v

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Images x SGLD steps per second of jem_ext's sampler vs. an eager copy of the "
        "JEM reference sampler (CPU replay buffer), same model, batch and run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device for the models and jem_ext's buffer (cpu or cuda[:N])",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch.set_num_threads value (default: torch's own choice)",
    )
    p.add_argument("--steps", type=positive_int, default=20, help="SGLD steps per chain (SmallCNN)")
    p.add_argument("--batch", type=positive_int, default=64, help="chains per batch (SmallCNN)")
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="timed chains per sampler and configuration (SmallCNN); median reported",
    )
    p.add_argument(
        "--warmup", type=nonneg_int, default=1, help="untimed chains per sampler before timing"
    )
    p.add_argument(
        "--buffer-size", type=positive_int, default=10000, help="replay buffer size (both samplers)"
    )
    p.add_argument(
        "--wrn", action="store_true", help="also benchmark WRN-28-10 on 32x32x3 (slow on CPU)"
    )
    p.add_argument("--wrn-batch", type=positive_int, default=16, help="chains per batch (WRN)")
    p.add_argument("--wrn-steps", type=positive_int, default=20, help="SGLD steps per chain (WRN)")
    p.add_argument(
        "--wrn-repeats", type=positive_int, default=2, help="timed chains per sampler (WRN)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for models, buffers and noise")
    p.add_argument(
        "--json",
        metavar="OUT",
        default=None,
        help="also write the results (settings, per-repeat times, medians) to OUT",
    )
    args = p.parse_args(argv)
    if args.threads is not None and check_threads(args.threads) is not None:
        p.error(check_threads(args.threads))
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: not a device: {args.device!r}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch build / machine")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device: expected cpu or cuda, got {args.device}")
    if args.json is not None:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            p.error(f"--json: folder {folder} does not exist")
        if os.path.isdir(args.json):
            p.error(f"--json: {args.json} is a directory")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configs = [
        ("small_cnn 1x8x8", "small_cnn", (1, 8, 8), args.batch, args.steps, args.repeats, {}),
        ("small_cnn 3x32x32", "small_cnn", (3, 32, 32), args.batch, args.steps, args.repeats, {}),
    ]
    if args.wrn:
        configs.append(
            (
                "wrn-28-10 3x32x32",
                "wrn",
                (3, 32, 32),
                args.wrn_batch,
                args.wrn_steps,
                args.wrn_repeats,
                {"depth": 28, "widen_factor": 10},
            )
        )
    results = []
    for name, model_name, shape, batch, steps, repeats, kw in tqdm(
        configs, desc="configs", file=sys.stderr
    ):
        results.append(
            bench_config(
                name,
                model_name,
                shape,
                batch,
                steps,
                repeats,
                args.warmup,
                args.buffer_size,
                args.device,
                args.seed,
                kw,
            )
        )
    device_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"device: {args.device} ({device_name}), threads: {torch.get_num_threads()}, "
        f"torch {torch.__version__}"
    )
    print_table(results)
    if args.json is not None:
        atomic_write_text(
            args.json,
            json.dumps(
                {
                    "benchmark": "bench_sampler",
                    "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "device": str(args.device),
                    "device_name": device_name,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "settings": {
                        k: (str(v) if isinstance(v, torch.device) else v)
                        for k, v in vars(args).items()
                    },
                    "results": results,
                },
                indent=2,
            ),
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
