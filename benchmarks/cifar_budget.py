"""CIFAR-10 on a CPU budget: named JEM recipes and the cross-entropy twin, equal wall time.

Each configuration trains ``python -m jem_ext.train`` on an image folder (one sub-folder per
class under ``train/`` and ``test/``, e.g. the CIFAR-10 JPEG archives extracted) with a
SmallCNN of width 64, stopping at ``--minutes`` of training (``--max-minutes``), so every
configuration gets the same wall time. Its final checkpoint (``checkpoints/last.pt``, the state
at the budget) is then evaluated with ``python -m jem_ext.eval`` (tasks accuracy, calibration,
ood, generation): test accuracy, ECE, OOD AUROC of the three scores (log p(x), max p(y|x),
approximate mass) on the built-in sets (uniform, gaussian, constant, interp), log p(x)
histograms, reliability diagram and sample grids.

With the CE twin (``ce``) among the configurations (or given as ``--judge``), every
configuration trains first and the twin then judges the others: the evaluation's generation
task also reports how often the twin classifies their class-conditional samples as their class
(``--judge``), and the fid task their samples' FID in the twin's features (fresh chains and the
replay buffer, ``--fid-classifier``). Fresh chains start where the run's own chains start
(``--gen-init``: uniform noise, or the per-class Gaussians of ``--init gaussian`` runs).

``OUT/<config>/`` holds each evaluation (report.json, report.md, PNGs); ``OUT/results.json``
every configuration's figures (with its training status, iterations and final data/sample
energies: far apart means the chains no longer reach the data) and ``OUT/results.md`` the same
as a table, with whether the target is met: test accuracy >= 35 % and AUROC log p(x) vs uniform
>= 0.95 without divergence; and for the judged configurations whether the generation claim is:
no energy split for the whole run, the judge classifies >= 50 % of the class-conditional samples
as their class, test accuracy >= 50 % and the same AUROC. The run folders (checkpoints) go to
``--runs``; a configuration whose run folder already holds a summary is not retrained (nor
evaluated again when its report is newer than its checkpoint), unless a larger ``--minutes`` is
asked for: then the run resumes from its last checkpoint and trains until the new budget (e.g.
``--minutes 60`` after a 15-minute study extends the runs to one hour each, with the same data
order and optimiser state).

Each recipe is the published one (``--recipe``, see :mod:`jem_ext.recipes`) scaled to the
budget: SmallCNN width 64 instead of a WRN-28-10, and a warm-up of ``WARMUP_ITERS`` iterations
(the published 1000 are longer than a CPU budget's whole run).

Examples::

    python benchmarks/cifar_budget.py --list
    python benchmarks/cifar_budget.py --archives ../shared/data/cifar10-jpeg \\
        --data-root /tmp/cifar10 --minutes 15 --threads 2
    python benchmarks/cifar_budget.py --smoke --out /tmp/cifar_budget_smoke
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shlex
import sys
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jem_ext.bench import evaluate as evaluate_checkpoint
from jem_ext.bench import last_energies
from jem_ext.training.cli import main as train_main

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "out" / "cifar_budget"
WIDTH = 64
WARMUP_ITERS = 100
TARGET_ACCURACY = 0.35
TARGET_AUROC_UNIFORM = 0.95
BUDGET_MET = 0.99  # a run stopped within 1 % of the budget has had it
EVAL_TASKS = "accuracy,calibration,ood,generation"
# With the CE twin among the configurations, every JEM configuration is also judged by it: its
# class-conditional samples classified by the twin (--judge) and its samples' FID in the twin's
# features (--fid-classifier), on enough chains for the twin's 256 features (FID needs more
# samples than feature dimensions).
JUDGE = "ce"
JUDGED_EVAL = ["--gen-n", "1000"]
TARGET_JUDGED = 0.5  # the generation claim: the twin classifies >= 50 % as their class
TARGET_ACCURACY_GENERATING = 0.5
ARCHIVES = ("train.tar.gz", "test.tar.gz")

# The trainer's defaults of the runs below that name no recipe (later defaults changed these).
EARLIER_DEFAULTS = ["--adam-beta2", "0.999", "--w-px-decay-epochs", ""]

# The chains of the configurations that generate: per-class Gaussian starts, short proximal runs.
GAUSSIAN_CHAINS = [
    *("--width", "48", "--init", "gaussian", "--proximal", "--sgld-steps", "5"),
    *("--l2-energy", "0.01", "--lr", "1e-3"),
]

# Trainer flags of each configuration, on top of the image folder, the model and the budget.
CONFIGS: dict[str, list[str]] = {
    "sadajem": ["--recipe", "sadajem"],
    # SADA-JEM with chains (re)started from uniform noise: the model sees noise as negatives.
    "sadajem_uniform": ["--recipe", "sadajem", "--init", "uniform"],
    # The fast proximal run of the digits-era defaults with chains from uniform noise instead of
    # the per-class Gaussians (which keep the model from ever seeing noise as a negative).
    "proximal_uniform": [
        *EARLIER_DEFAULTS,
        *("--proximal", "--sgld-steps", "5", "--lr", "1e-3"),
        *("--w-px", "1", "--init", "uniform"),
    ],
    # A light p(x) term (gap bound w_px / (2 l2_energy) = 5) beside the full cross-entropy, and
    # short chains from uniform noise: the classifier trains at nearly its own pace and log p(x)
    # still learns that noise is unlikely.
    "light_px_uniform": [
        *EARLIER_DEFAULTS,
        *("--w-px", "0.1", "--l2-energy", "0.01", "--sgld-steps", "5"),
        *("--lr", "1e-3", "--init", "uniform"),
    ],
    # Chains that start near the data (JEM++'s per-class Gaussians fitted to the training
    # images) on a SmallCNN of width 48 (0.87 M parameters) without normalisation, 5 proximal
    # steps, the light p(x) term: the chains keep up with the model, so its energies stay
    # together, and class-conditional chains from the Gaussians move towards their class.
    "gaussian_light": [*EARLIER_DEFAULTS, *GAUSSIAN_CHAINS, "--w-px", "0.1"],
    # The same with one chain in ten started from uniform noise instead, so that the model also
    # sees noise as a negative and log p(x) keeps rating it below the data.
    "generating": [
        *EARLIER_DEFAULTS,
        *GAUSSIAN_CHAINS,
        "--w-px",
        "0.1",
        "--init-noise-frac",
        "0.1",
    ],
    # ... with a p(x) term three times heavier.
    "generating_px03": [
        *EARLIER_DEFAULTS,
        *GAUSSIAN_CHAINS,
        *("--w-px", "0.3", "--init-noise-frac", "0.1"),
    ],
    "jempp": ["--recipe", "jempp"],
    "jem": ["--recipe", "jem"],
    "ce": [*EARLIER_DEFAULTS, "--objective", "ce"],
}
SCORES = ("logpx", "maxprob", "approx_mass")
OOD_SETS = ("uniform", "gaussian", "constant", "interp")

# Smoke mode: a synthetic image folder and a few iterations, for the test suite.
SMOKE_CLASSES, SMOKE_TRAIN, SMOKE_TEST, SMOKE_SIZE, SMOKE_WIDTH = 3, 12, 4, 8, 4
SMOKE_TRAIN_FLAGS = [
    "--width",
    str(SMOKE_WIDTH),
    "--buffer-size",
    "50",
    "--sgld-steps",
    "1",
    "--max-iters",
    "2",
    "--log-every",
    "1",
]
SMOKE_EVAL_FLAGS = ["--gen-n", "8", "--gen-steps", "2"]


class BenchmarkError(Exception):
    """Bad input (one line, exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated configuration names (see --list)",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="image folder with train/ and test/ (one sub-folder per class)",
    )
    p.add_argument(
        "--archives",
        default=None,
        help="folder holding train.tar.gz and test.tar.gz: extracted into "
        "--data-root first, unless it already has train/ and test/",
    )
    p.add_argument(
        "--minutes", type=float, default=15.0, help="training wall time of every configuration"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="configurations trained at once (each with --threads threads): on N cores, "
        "--jobs N --threads 1 gives every configuration one core for the same wall time",
    )
    p.add_argument("--seed", type=int, default=1, help="training seed")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder")
    p.add_argument(
        "--runs",
        default="runs/cifar_budget",
        help="folder of the run folders (checkpoints; kept out of version control)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a synthetic image folder and two iterations per configuration "
        "(seconds; checks the pipeline, figures meaningless)",
    )
    p.add_argument(
        "--judge",
        default=None,
        metavar="CHECKPOINT",
        help="the CE twin's checkpoint that judges the JEM configurations' samples and gives "
        f"the features of their FID (default: the {JUDGE} configuration's last checkpoint when "
        "it is among --configs; none otherwise); one judge for several invocations keeps their "
        "figures comparable",
    )
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    return p


def extract_archives(archives: Path, data_root: Path) -> None:
    """Extract ``train.tar.gz`` and ``test.tar.gz`` into ``data_root`` (when not there yet)."""
    if (data_root / "train").is_dir() and (data_root / "test").is_dir():
        return
    for name in ARCHIVES:
        path = archives / name
        if not path.is_file():
            raise BenchmarkError(f"--archives {archives}: no {name} there")
    data_root.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVES:
        with tarfile.open(archives / name) as tar:
            tar.extractall(data_root, filter="data")


def make_smoke_folder(root: Path) -> None:
    """A tiny image folder: ``SMOKE_CLASSES`` classes of random RGB images, train/ and test/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", SMOKE_TRAIN), ("test", SMOKE_TEST)):
        for c in range(SMOKE_CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (SMOKE_SIZE, SMOKE_SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def train_argv(name: str, args: argparse.Namespace, data_root: Path, run_dir: Path) -> list[str]:
    """The trainer's command line of configuration ``name``."""
    budget = SMOKE_TRAIN_FLAGS if args.smoke else ["--max-minutes", f"{args.minutes:g}"]
    return [
        "--dataset",
        "folder",
        "--data-root",
        str(data_root),
        "--model",
        "small_cnn",
        "--width",
        str(WIDTH),
        "--warmup-iters",
        str(WARMUP_ITERS),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--no-progress",
        "--sample-every",
        "0",
        "--out",
        str(run_dir),
        *CONFIGS[name],
        *budget,
    ]


def train_config(name: str, args: argparse.Namespace, data_root: Path, runs: Path) -> None:
    """Train one configuration (unless done; a longer budget continues it)."""
    run_dir = runs / name
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        argv = train_argv(name, args, data_root, run_dir)
    elif args.smoke:
        argv = None
    else:
        # A longer budget continues the run where its shorter budget stopped it.
        stopped = stopped_short(json.loads(summary_path.read_text()), args.minutes)
        argv = ["--resume", str(run_dir), "--max-minutes", f"{args.minutes:g}"] if stopped else None
    if argv is not None:
        print("+ python -m jem_ext.train", shlex.join(argv), flush=True)
        if train_main(argv) not in (0, 1):  # 1: diverged, still summarised
            raise RuntimeError(f"{name}: training failed")


def evaluate_config(
    name: str, args: argparse.Namespace, runs: Path, out: Path, judge: Path | None
) -> dict[str, Any]:
    """Evaluate one trained configuration (unless done); returns its figures."""
    checkpoint = runs / name / "checkpoints" / "last.pt"
    judge = None if name == JUDGE else judge
    if not evaluated(out / name / "report.json", checkpoint, judge):
        evaluate(name, args, checkpoint, out / name, judge)
    return figures(name, runs / name, out / name)


def evaluated(report: Path, *inputs: Path | None) -> bool:
    """Whether ``report`` was written after every input checkpoint (then it is theirs)."""
    if not report.is_file():
        return False
    return all(p is None or report.stat().st_mtime > p.stat().st_mtime for p in inputs)


def evaluate(
    name: str, args: argparse.Namespace, checkpoint: Path, eval_dir: Path, judge: Path | None
) -> None:
    """``python -m jem_ext.eval`` of one configuration's checkpoint into ``eval_dir``: fresh
    chains start where the run's own chains did (``--gen-init``); with a ``judge`` (the CE
    twin's checkpoint) it also judges the conditional samples and gives the FID in its
    features."""
    config = json.loads((checkpoint.parent.parent / "config.json").read_text())
    flags = ["--label", name, "--gen-init", config.get("init", "uniform")]
    tasks = EVAL_TASKS
    if judge is not None:
        flags += ["--judge", str(judge), "--fid-classifier", str(judge)]
        flags += [] if args.smoke else JUDGED_EVAL
        tasks += ",fid"
    flags += SMOKE_EVAL_FLAGS if args.smoke else []
    evaluate_checkpoint(checkpoint, eval_dir, tasks, flags)


def stopped_short(summary: dict[str, Any], minutes: float) -> bool:
    """Whether a run stopped by its budget trained for less than ``minutes``."""
    return summary["status"] == "budget" and summary["seconds"] < 60.0 * minutes * BUDGET_MET


def trained_past(summary: dict[str, Any], minutes: float) -> bool:
    """Whether a run has trained beyond ``minutes`` (its figures would not be that budget's)."""
    return summary["seconds"] > 60.0 * minutes / BUDGET_MET


def figures(name: str, run_dir: Path, eval_dir: Path) -> dict[str, Any]:
    """One configuration's row: training summary, final energies and evaluation figures."""
    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads((eval_dir / "report.json").read_text())
    row = {
        "config": name,
        "flags": CONFIGS[name],
        "status": summary["status"],
        "stop_reason": summary.get("stop_reason"),
        "iterations": summary["iterations"],
        "seconds": summary["seconds"],
        "seconds_per_iteration": summary["seconds_per_iteration"],
        "recoveries": summary["recoveries"],
        **last_energies(run_dir / "metrics.jsonl"),
        "accuracy": report["accuracy"],
        "ece": report["ece"],
        "auroc": {s: {score: report["ood"][s][score] for score in SCORES} for s in OOD_SETS},
        "logpx_mean": report["logpx_mean"],
        "energy_split_at": summary.get("energy_split_at"),
        **generation_figures(report),
        "files": sorted(str(Path(name) / f) for f in _png_files(eval_dir)),
    }
    row["target_met"] = target_met(row)
    row["generating_met"] = generating_met(row)
    return row


def generation_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Where the fresh chains started, how often the model itself and the judge classify the
    class-conditional samples as their class, and the FIDs (None where not measured)."""
    gen, fid = report["generation"], report.get("fid") or {}
    return {
        "gen_init": gen["init"],
        "conditional_accuracy": gen["conditional_accuracy"],
        "judge_conditional_accuracy": gen.get("judge_conditional_accuracy"),
        "judge_start_accuracy": gen.get("judge_start_accuracy"),
        "fid_fresh": fid.get("fid"),
        "fid_buffer": fid.get("fid_buffer"),
    }


def _png_files(folder: Path) -> list[str]:
    return [p.name for p in folder.glob("*.png")]


def target_met(row: dict[str, Any]) -> bool:
    """Accuracy and AUROC log p(x) vs uniform at their targets, no divergence on the way."""
    auroc = row["auroc"]["uniform"]["logpx"]
    return (
        row["status"] != "diverged"
        and row["recoveries"] == 0
        and row["accuracy"] >= TARGET_ACCURACY
        and auroc is not None
        and auroc >= TARGET_AUROC_UNIFORM
    )


def generating_met(row: dict[str, Any]) -> bool:
    """The generation claim: no energy split and no divergence for the whole run, the judge
    classifies >= 50 % of the class-conditional samples as their class, test accuracy >= 50 %
    and AUROC log p(x) vs uniform >= 0.95."""
    judged = row["judge_conditional_accuracy"]
    return (
        target_met(row)
        and row["energy_split_at"] is None
        and row["accuracy"] >= TARGET_ACCURACY_GENERATING
        and judged is not None
        and judged >= TARGET_JUDGED
    )


def generation_table(rows: list[dict[str, Any]]) -> list[str]:
    """The generation figures as Markdown lines (the judged rows only)."""
    judged = [r for r in rows if r["judge_conditional_accuracy"] is not None]
    if not judged:
        return []
    lines = [
        "",
        f"Generation, judged by the CE twin ({JUDGE}): class-conditional samples it classifies "
        "as their class (of the chains' starts in brackets), the model's own rate, FID in the "
        "twin's features of fresh chains and of the replay buffer against the test split. "
        f"Target: no energy split, judged >= {TARGET_JUDGED:.0%}, accuracy >= "
        f"{TARGET_ACCURACY_GENERATING:.0%}, AUROC log p(x) vs uniform >= {TARGET_AUROC_UNIFORM}.",
        "",
        "| config | chains start | split at | judged (starts) | own rate | FID fresh | "
        "FID buffer | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in judged:
        split = "-" if r["energy_split_at"] is None else str(r["energy_split_at"])
        lines.append(
            f"| {r['config']} | {r['gen_init']} | {split} | "
            f"{r['judge_conditional_accuracy']:.1%} ({r['judge_start_accuracy']:.1%}) | "
            f"{r['conditional_accuracy']:.1%} | {_num(r['fid_fresh'], 1)} | "
            f"{_num(r['fid_buffer'], 1)} | {'yes' if r['generating_met'] else 'no'} |"
        )
    return lines


def markdown(rows: list[dict[str, Any]], minutes: float | None) -> str:
    """The results as a Markdown table (AUROC columns: log p(x) / max p(y|x) / mass)."""
    if minutes is None:
        title = f"smoke run: synthetic images, 2 iterations, SmallCNN width {SMOKE_WIDTH}"
    else:
        title = f"{minutes:g} minutes per configuration, SmallCNN width {WIDTH}"
    lines = [
        f"# CIFAR budget: {title}",
        "",
        "AUROC cells: log p(x) / max p(y|x) / approximate mass. Target: accuracy >= "
        f"{TARGET_ACCURACY:.0%}, AUROC log p(x) vs uniform >= {TARGET_AUROC_UNIFORM}, "
        "no divergence.",
        "",
        "| config | status | iters | s/iter | E data / E sample | acc | ECE | "
        + " | ".join(f"AUROC {s}" for s in OOD_SETS)
        + " | target |",
        "|" + "---|" * (8 + len(OOD_SETS)),
    ]
    for r in rows:
        aurocs = [" / ".join(_num(r["auroc"][s][k], 2) for k in SCORES) for s in OOD_SETS]
        energies = f"{_num(r['energy_data'], 1)} / {_num(r['energy_sample'], 1)}"
        lines.append(
            f"| {r['config']} | {r['status']} | {r['iterations']} | "
            f"{r['seconds_per_iteration']:.2f} | {energies} | {r['accuracy']:.1%} | "
            f"{r['ece']:.1%} | " + " | ".join(aurocs) + f" | {'yes' if r['target_met'] else 'no'} |"
        )
    lines += generation_table(rows)
    lines += [
        "",
        "Per configuration: `<config>/report.md`, log p(x) histograms "
        "(`logpx_hist.png`), reliability diagram and sample grids.",
    ]
    return "\n".join(lines) + "\n"


def _num(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def check_args(args: argparse.Namespace) -> list[str]:
    """The configuration names to run (raises BenchmarkError on bad input)."""
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise BenchmarkError(
            f"--configs: unknown {unknown or 'empty list'}; expected names "
            f"among {', '.join(CONFIGS)}"
        )
    if not args.smoke:
        if args.data_root is None:
            raise BenchmarkError(
                "--data-root: required (an image folder with train/ and test/), or --smoke"
            )
        if not (args.minutes > 0 and math.isfinite(args.minutes)):
            raise BenchmarkError(f"--minutes: expected a positive number, got {args.minutes}")
    if args.threads < 1:
        raise BenchmarkError(f"--threads: expected >= 1, got {args.threads}")
    if args.jobs < 1:
        raise BenchmarkError(f"--jobs: expected >= 1, got {args.jobs}")
    if args.judge is not None and not Path(args.judge).is_file():
        raise BenchmarkError(f"--judge {args.judge}: no such checkpoint file")
    return names


def check_runs(names: list[str], args: argparse.Namespace, runs: Path) -> None:
    """Refuse run folders that have trained past ``--minutes``: their figures are not its."""
    for name in names:
        path = runs / name / "summary.json"
        if args.smoke or not path.is_file():
            continue
        summary = json.loads(path.read_text())
        if trained_past(summary, args.minutes):
            raise BenchmarkError(
                f"--minutes {args.minutes:g}: {runs / name} has trained "
                f"{summary['seconds'] / 60.0:.1f} minutes; give another --runs folder"
            )


def run_all(names: list[str], args: argparse.Namespace, data_root: Path, runs: Path) -> None:
    check_runs(names, args, runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every configuration trains first: the CE twin judges the others once it is trained.
    judge = Path(args.judge) if args.judge else None
    if judge is None and JUDGE in names:
        judge = runs / JUDGE / "checkpoints" / "last.pt"
    if args.jobs == 1:
        for n in names:
            train_config(n, args, data_root, runs)
        rows = [evaluate_config(n, args, runs, out, judge) for n in names]
    else:  # fresh interpreters: each run sets its own torch thread count
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            for f in [pool.submit(train_config, n, args, data_root, runs) for n in names]:
                f.result()
            futures = [pool.submit(evaluate_config, n, args, runs, out, judge) for n in names]
            rows = [f.result() for f in futures]
    minutes = None if args.smoke else args.minutes
    with (out / "results.json").open("w", encoding="utf-8") as f:
        json.dump(
            {
                "minutes": minutes,
                "width": WIDTH,
                "threads": args.threads,
                "jobs": args.jobs,
                "seed": args.seed,
                "rows": rows,
            },
            f,
            indent=2,
        )
        f.write("\n")
    (out / "results.md").write_text(markdown(rows, minutes), encoding="utf-8")
    print(f"wrote {out / 'results.json'} and results.md")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, flags in CONFIGS.items():
            print(f"{name:16s} {shlex.join(flags)}")
        return 0
    try:
        names = check_args(args)
        if args.smoke:
            with tempfile.TemporaryDirectory(prefix="cifar_budget_smoke_") as tmp:
                make_smoke_folder(Path(tmp) / "data")
                run_all(names, args, Path(tmp) / "data", Path(tmp) / "runs")
            return 0
        data_root = Path(args.data_root)
        if args.archives is not None:
            extract_archives(Path(args.archives), data_root)
        if not ((data_root / "train").is_dir() and (data_root / "test").is_dir()):
            raise BenchmarkError(
                f"--data-root {data_root}: expected train/ and test/ folders "
                "(give --archives to extract them)"
            )
        run_all(names, args, data_root, Path(args.runs))
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
