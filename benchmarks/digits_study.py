"""Digits default study: named trainer configurations x seeds, scored on calibration and OOD.

Each run is one ``python -m jem_ext.train --dataset digits ...`` call (in a subprocess, one at a
time) into ``RUNS/<config>-s<seed>``; its final checkpoint (``checkpoints/last.pt``) is then
scored on the test split (``--checkpoint best``: the checkpoint of the best validation
accuracy instead):

- ``accuracy``: test accuracy;
- ``ece``: expected calibration error, 20 equal-width bins of max p(y|x) (the JEM paper's);
- ``confidence``: mean max p(y|x) (below the accuracy means under-confident);
- ``auroc_uniform`` / ``auroc_gaussian``: AUROC of log p(x) = logsumexp_y f(x)[y] separating
  the test images from as many U(-1, 1) images / N(0, 1) images clamped to [-1, 1];
- ``seconds``: the run's training wall time (from its summary.json);
- ``energy_data`` / ``energy_sample``: the last logged mean energies of the data batch and of
  the SGLD samples (JEM runs). Far apart (e.g. -50 / +50 with ``--l2-energy 0.01``) means the
  samples no longer reach the data and the p(x) term has stopped shaping the classifier.

``OUT/results.json`` holds every run and the per-configuration means and standard deviations;
``OUT/results.md`` the same as a table. Runs whose folder already holds a summary are scored
again but not retrained, so an interrupted study continues where it stopped.

Examples::

    python benchmarks/digits_study.py --list
    python benchmarks/digits_study.py --configs default,no_augment --seeds 1
    nice python benchmarks/digits_study.py --configs chosen,chosen_ce --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from jem_ext.bench import evaluate, last_energies, mean_confidence

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "out" / "digits_study"
EVAL_TASKS = "accuracy,calibration,ood"
# The evaluation's seed: its built-in uniform and Gaussian OOD images are drawn from seed + 1 =
# 1234, the images this study has always scored against.
EVAL_SEED = 1233

# The trainer's defaults, spelled out so that every configuration keeps its meaning if they change:
# the schedule,
SCHEDULE = ["--w-px", "1", "--sgld-steps", "20", "--epochs", "60", "--decay-epochs", "40,50"]
# with Adam's usual second-moment decay (most configurations build on it),
BASE = [*SCHEDULE, "--adam-beta2", "0.999"]


def px_cut(epoch: int, rate: str = "0.1") -> list[str]:
    """Flags that multiply the p(x) weight by ``rate`` at ``epoch``."""
    return ["--w-px-decay-epochs", str(epoch), "--w-px-decay-rate", rate]


# with a constant p(x) weight (the default until 2026-11-26),
CONSTANT = [*BASE, "--w-px-decay-epochs", ""]
# and today's: the p(x) weight cut to a tenth at epoch 30, Adam's beta2 0.99 (FINDINGS.md).
DEFAULTS = [*SCHEDULE, "--adam-beta2", "0.99", *px_cut(30)]
# Longer schedules: half-length chains over 90 epochs (the calibrated schedule), or 70 epochs.
K10_E90 = ["--sgld-steps", "10", "--epochs", "90", "--decay-epochs", "60,75"]
E70 = ["--epochs", "70", "--decay-epochs", "50,60"]
# The best-calibrated configuration with a constant p(x) weight (FINDINGS.md); it splits its
# energies and does not generate.
CALIBRATED = ["--w-px", "0.3", *K10_E90, "--w-px-decay-epochs", "", "--adam-beta2", "0.999"]

# Trainer flags of each configuration (python -m jem_ext.train --help).
CONFIGS: dict[str, list[str]] = {
    "default": DEFAULTS,
    "constant_px": CONSTANT,
    # Adam's beta2 0.99 with a constant p(x) weight: its share of the default's gain
    "constant_px_beta2_0.99": [*CONSTANT, "--adam-beta2", "0.99"],
    "ce": [*DEFAULTS, "--objective", "ce"],
    "ce_beta2_0.999": [*CONSTANT, "--objective", "ce"],
    "no_l2": [*CONSTANT, "--l2-energy", "0"],
    "no_augment": [*CONSTANT, "--no-augment"],
    "no_augment_no_l2": [*CONSTANT, "--no-augment", "--l2-energy", "0"],
    "lr1e-3": [*CONSTANT, "--lr", "1e-3"],
    "no_augment_lr1e-3": [*CONSTANT, "--no-augment", "--lr", "1e-3"],
    "no_augment_dropout": [*CONSTANT, "--no-augment", "--dropout", "0.2"],
    "no_augment_k10": [*CONSTANT, "--no-augment", "--sgld-steps", "10"],
    "no_augment_wd": [*CONSTANT, "--no-augment", "--weight-decay", "5e-4"],
    "ce_no_augment": [*CONSTANT, "--objective", "ce", "--no-augment"],
    "w_px0.3": [*CONSTANT, "--w-px", "0.3"],
    # the p(x) term on the batch before augmentation (SADA-JEM), cross-entropy augmented
    "no_px_augment": [*CONSTANT, "--no-px-augment"],
    "no_px_augment_w_px0.3": [*CONSTANT, "--no-px-augment", "--w-px", "0.3"],
    "no_px_augment_lr1e-3": [*CONSTANT, "--no-px-augment", "--lr", "1e-3"],
    "w_px0.3_noise0.01": [*CONSTANT, "--w-px", "0.3", "--input-noise", "0.01"],
    "w_px0.3_k10": [*CONSTANT, "--w-px", "0.3", "--sgld-steps", "10"],
    # the reference's schedule (Adam 1e-4 for 150 epochs, warm-up 1,000, no decay) with half its
    # chain length, to fit 2 minutes: slow enough for the chains to follow the model
    "reference_k10": [
        *CONSTANT,
        *("--lr", "1e-4", "--epochs", "150", "--warmup-iters", "1000"),
        *("--decay-epochs", "150", "--sgld-steps", "10"),
    ],
    "calibrated": CALIBRATED,
    "calibrated_ce": [*CALIBRATED, "--objective", "ce"],
    # attempts to keep the calibrated configuration's chains on the data:
    # longer chains,
    "calibrated_k20": [*CALIBRATED, "--sgld-steps", "20"],
    # chains from per-class Gaussians (JEM++'s informative init), which start near the data,
    "calibrated_gaussian_init": [*CALIBRATED, "--init", "gaussian"],
    # a buffer near the training set's size (each chain drawn about every 16 iterations, so
    # the buffer holds mature samples instead of young, noise-like ones),
    "calibrated_buffer1000": [*CALIBRATED, "--buffer-size", "1000"],
    # proximal SGLD (JEM++): clipped gradient steps cannot throw the chains off the data,
    "calibrated_proximal": [*CALIBRATED, "--proximal"],
    # a third of the peak learning rate: the model moves slower than the chains follow.
    "calibrated_lr1e-3": [*CALIBRATED, "--lr", "1e-3"],
    # The p(x) weight cut to a tenth once the classifier is trained (balanced chains all along):
    # at the first learning-rate decay,
    "px_decay40": [*BASE, *px_cut(40)],
    # ten epochs earlier (the default's cut, there with Adam's beta2 0.99),
    "px_decay30": [*BASE, *px_cut(30)],
    # ten epochs earlier still,
    "px_decay20": [*BASE, *px_cut(20)],
    # halfway between, or at 20 to 0.3 (a stronger hold on the chains than 0.1),
    "px_decay25": [*BASE, *px_cut(25)],
    "px_decay20_rate0.3": [*BASE, *px_cut(20, "0.3")],
    # with half-length chains and 90 epochs (the calibrated schedule), cut at 60 or at 20,
    "px_decay60_k10_e90": [*BASE, *K10_E90, *px_cut(60)],
    "px_decay20_k10_e90": [*BASE, *K10_E90, *px_cut(20)],
    # at 30 or 40 still at the peak learning rate, decays at 50 and 60 of 70 epochs.
    "px_decay30_e70": [*BASE, *E70, *px_cut(30)],
    "px_decay40_e70": [*BASE, *E70, *px_cut(40)],
}

METRICS = ("accuracy", "ece", "confidence", "auroc_uniform", "auroc_gaussian", "seconds")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs", default="default,ce", help="comma-separated configuration names (see --list)"
    )
    p.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder of results.json/.md")
    p.add_argument(
        "--runs",
        default="runs/digits_study",
        help="folder of the run folders (checkpoints; kept out of version control)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training run")
    p.add_argument(
        "--checkpoint",
        choices=("last", "best"),
        default="last",
        help="checkpoint scored: the final one, or the best validation accuracy's",
    )
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    return p


def train_run(name: str, seed: int, run_dir: Path, threads: int) -> None:
    """Train one configuration and seed into ``run_dir`` (skipped when already complete)."""
    if (run_dir / "summary.json").is_file():
        return
    cmd = [
        sys.executable,
        "-m",
        "jem_ext.train",
        "--dataset",
        "digits",
        "--seed",
        str(seed),
        "--threads",
        str(threads),
        "--no-progress",
        "--out",
        str(run_dir),
        *CONFIGS[name],
    ]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def score_run(run_dir: Path, checkpoint: str = "last") -> dict[str, float | None]:
    """Accuracy, ECE, mean confidence and log p(x) AUROCs of a run's checkpoint, as
    ``python -m jem_ext.eval`` reports them (into ``RUN/eval-<checkpoint>``)."""
    report = evaluate(
        run_dir / "checkpoints" / f"{checkpoint}.pt",
        run_dir / f"eval-{checkpoint}",
        EVAL_TASKS,
        ["--seed", str(EVAL_SEED)],
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        **last_energies(run_dir / "metrics.jsonl"),
        "accuracy": report["accuracy"],
        "ece": report["ece"],
        "confidence": mean_confidence(report),
        "auroc_uniform": report["ood"]["uniform"]["logpx"],
        "auroc_gaussian": report["ood"]["gaussian"]["logpx"],
        "seconds": float(summary["seconds"]),
    }


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-configuration mean and standard deviation of every metric."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        stats: dict[str, Any] = {"runs": len(mine)}
        for m in METRICS:
            values = [r[m] for r in mine]
            stats[m] = statistics.fmean(values)
            stats[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        stats["energies"] = ", ".join(_energy_pair(r) for r in mine)
        out[name] = stats
    return out


def _energy_pair(row: dict[str, Any]) -> str:
    if row.get("energy_data") is None or row.get("energy_sample") is None:
        return "-"
    return f"{row['energy_data']:.1f} / {row['energy_sample']:.1f}"


def markdown(agg: dict[str, dict[str, Any]]) -> str:
    def pct(stats: dict[str, Any], m: str) -> str:
        return f"{100 * stats[m]:.1f} ± {100 * stats[m + '_std']:.1f}"

    lines = [
        "| config | flags | runs | test acc % | ECE % | mean conf % | AUROC uniform "
        "| AUROC gaussian | train s | E data / E samples per seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in agg.items():
        flags = shlex.join(CONFIGS.get(name, [])) or "(trainer defaults)"
        lines.append(
            f"| {name} | `{flags}` | {s['runs']} | {pct(s, 'accuracy')} | {pct(s, 'ece')} "
            f"| {pct(s, 'confidence')} | {s['auroc_uniform']:.3f} | {s['auroc_gaussian']:.3f} "
            f"| {s['seconds']:.0f} ± {s['seconds_std']:.0f} | {s['energies']} |"
        )
    return "\n".join(lines) + "\n"


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("runs", []))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, flags in CONFIGS.items():
            print(f"{name:24s} {shlex.join(flags) or '(trainer defaults)'}")
        return 0
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: unknown configurations {unknown}; see --list", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        print(
            f"error: --seeds: expected integers separated by commas, got {args.seeds!r}",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        r
        for r in load_rows(out / "results.json")
        if (r["config"], r["seed"]) not in {(n, s) for n in names for s in seeds}
    ]
    for name in names:
        for seed in seeds:
            run_dir = Path(args.runs) / f"{name}-s{seed}"
            train_run(name, seed, run_dir, args.threads)
            row = {
                "config": name,
                "seed": seed,
                "flags": CONFIGS[name],
                "checkpoint": args.checkpoint,
                **score_run(run_dir, args.checkpoint),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_results(out, rows)
    print(markdown(aggregate(rows)))
    return 0


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    agg = aggregate(rows)
    (out / "results.json").write_text(
        json.dumps({"runs": rows, "configs": agg}, indent=2, default=_finite) + "\n"
    )
    (out / "results.md").write_text(markdown(agg))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
