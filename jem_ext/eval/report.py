"""Evaluate a trained JEM checkpoint (optionally beside a second one) and write a report.

``python -m jem_ext.eval --checkpoint RUN_OR_FILE [--compare OTHER] --out DIR`` runs a list of
tasks on the test split of the data set the checkpoint was trained on and writes

- ``DIR/report.json``: every figure, machine-readable; the second checkpoint's figures (when
  ``--compare`` is given) under the key ``"compare"``, with the same layout;
- ``DIR/report.md``: the same figures as tables (both models side by side) with the PNGs;
- PNG figures: reliability diagram, log p(x) histograms, sample grids, robustness curves.

Tasks (``--tasks``, default: all of them; ``fid`` is skipped, with the reason in the report,
when neither ``--inception-weights`` nor ``--fid-classifier`` is given):

``accuracy``
    test accuracy; with ``--refine-steps K > 0`` also the accuracy after K SGLD steps on
    log p(x) from each input (:class:`~jem_ext.eval.attacks.SGLDRefinedClassifier`).
``calibration``
    expected calibration error with 20 equal-width bins of max p(y|x), reliability diagram.
``ood``
    AUROC of in-distribution test data against each OOD set for three scores: ``logpx``
    (logsumexp_y f(x)[y]), ``maxprob`` (max_y p(y|x)) and ``approx_mass`` (minus the per-sample
    L2 norm of d log p(x) / dx). Built-in OOD sets with the data's shape and as many samples as
    the test set: ``uniform`` (U(-1, 1) pixels), ``gaussian`` (N(0, 1) pixels clamped to
    [-1, 1]), ``constant`` (one U(-1, 1) value for all pixels of an image), ``interp`` (the
    mean (lambda = 0.5, as in the paper's "Interp" set) of two different random test images);
    plus any ``--ood NAME[:FOLDER]`` data set (its test split).
``generation``
    sample grids from fresh SGLD chains started at U(-1, 1) noise (unconditional, and
    class-conditional on E(x, y) = -f(x)[y], one row per class), and from the checkpoint's
    replay buffer when it holds one. The chains use the ``--checkpoint``'s sampler settings
    (step size, noise, clamp, gradient clipping; clamp [-1, 1] when it has none) unless
    ``--sgld-step-size`` / ``--sgld-noise`` are given; the same settings serve both models.
    Also reported: the fraction of class-conditional samples classified as their class and
    the mean log p(x) of the samples and of the test images.
``fid``
    Inception Score of the fresh-chain samples and FID between them and test images, with
    the FID Inception-v3 weights (``--inception-weights``); otherwise with the penultimate
    features / class probabilities of another classifier (``--fid-classifier``), reported as
    not comparable with published figures.
``robustness``
    accuracy under PGD (L-inf and L2) of the SGLD-refined classifier (K SGLD steps from the
    input averaged over several noisy chains), attacked through the refinement. Defaults are
    sized for a CPU and digits: the first 100 test points (of the seeded subset), 10 PGD
    steps of 2.5 eps / 10 from a random start, K = 5 refinement steps, 2 chains; radii
    L-inf 0, 0.05, 0.1, 0.2, 0.3 and L2 0, 0.25, 0.5, 1, 2 in the [-1, 1] input units
    (L-inf 0.1 here is 12.75/255 in [0, 1] pixel units). About 4 minutes for two small
    models on 2 shared CPU cores.

Bad input (a foreign or missing checkpoint, data whose sample shape or class count does not
match the model, an unknown task or data set, unreadable Inception weights) is reported as one
line on stderr with exit status 2, before anything is written. Every output file is written
atomically (temporary file, then :func:`os.replace`), and only once all figures are computed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import atomic_write_text

__all__ = ["EvalError", "TASKS", "build_parser", "main", "run"]

TASKS = ("accuracy", "calibration", "ood", "generation", "fid", "robustness")
BUILTIN_OOD = ("uniform", "gaussian", "constant", "interp")
SCORES = ("logpx", "maxprob", "approx_mass")
NORMS = ("linf", "l2")
DEFAULT_EPS = {"linf": [0.0, 0.05, 0.1, 0.2, 0.3], "l2": [0.0, 0.25, 0.5, 1.0, 2.0]}
ECE_BINS = 20


class EvalError(Exception):
    """Bad input to the evaluation (reported as one line on stderr, exit status 2)."""


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become :class:`EvalError` (one line, exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise EvalError(f"{message} (see --help)")


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint file (.pt) or run folder (uses checkpoints/best.pt, else "
                   "checkpoints/last.pt)")
    p.add_argument("--compare", default=None,
                   help="second checkpoint or run folder evaluated on the same data; its "
                   "figures go under 'compare' in report.json and beside the first everywhere")
    p.add_argument("--out", required=True,
                   help="output folder (created; existing report files are replaced)")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help="comma-separated tasks among " + ", ".join(TASKS))
    p.add_argument("--label", default=None,
                   help="name of the first model in tables and plots (default: its objective "
                   "from the run config, e.g. 'jem')")
    p.add_argument("--compare-label", default=None,
                   help="name of the --compare model (default: its objective, e.g. 'ce')")
    p.add_argument("--dataset", default=None,
                   help="evaluate on this data set instead of the checkpoint's config['dataset']")
    p.add_argument("--data-root", default=None,
                   help="folder of the data set files (default: the checkpoint's "
                   "config['data_root'])")
    p.add_argument("--batch-size", type=int, default=100, help="batch size of every pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--max-samples", type=int, default=None,
                   help="use a random subset (fixed by --seed) of at most this many test "
                   "images (and of each --ood set); default: all of them")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--sgld-step-size", type=float, default=None,
                   help="SGLD step size on d log p(x)/dx for refinement, generation and the "
                   "robust classifier, used for both models (default: the --checkpoint's "
                   "sampler setting, else JEM's 1.0)")
    p.add_argument("--sgld-noise", type=float, default=None,
                   help="SGLD noise standard deviation (default: the --checkpoint's sampler "
                   "setting, else JEM's 0.01)")
    p.add_argument("--refine-steps", type=int, default=0,
                   help="accuracy task: also report the accuracy after K SGLD refinement steps "
                   "(0: skip)")
    p.add_argument("--ood", action="append", default=[], metavar="NAME[:FOLDER]",
                   help="extra OOD data set (any name load_dataset knows, e.g. svhn:/data/svhn "
                   "or folder:/path/to/images); its test split is used; repeatable")
    p.add_argument("--gen-steps", type=int, default=100,
                   help="SGLD steps of the fresh generation chains (from U(-1,1) noise)")
    p.add_argument("--gen-n", type=int, default=100,
                   help="number of fresh unconditional samples (grid, IS and FID); the "
                   "conditional grid has max(1, gen_n // classes) samples per class")
    p.add_argument("--inception-weights", default=None,
                   help="FID Inception-v3 state_dict (e.g. pytorch-fid's pt_inception-2015-12-"
                   "05-*.pth) for the fid task")
    p.add_argument("--fid-classifier", default=None,
                   help="checkpoint whose classifier replaces Inception for IS/FID when "
                   "--inception-weights is not given (figures not comparable with papers)")
    p.add_argument("--pgd-norms", default="linf,l2", help="comma-separated PGD norms (linf, l2)")
    p.add_argument("--pgd-eps", action="append", default=[], metavar="[NORM=]E1,E2,...",
                   help="PGD radii in the model's [-1, 1] input units, e.g. 'linf=0,0.1,0.2' "
                   "or 'l2=0,0.5,1'; without 'NORM=' the list applies to every norm; "
                   "repeatable. Defaults: " + "; ".join(
                       f"{k}={','.join(map(str, v))}" for k, v in DEFAULT_EPS.items()))
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps per attack")
    p.add_argument("--pgd-step-size", type=float, default=None,
                   help="PGD step length; default 2.5 * eps / steps (Madry et al.)")
    p.add_argument("--robust-refine-steps", type=int, default=5,
                   help="K: SGLD refinement steps of the attacked classifier (0: plain)")
    p.add_argument("--robust-chains", type=int, default=2,
                   help="noisy SGLD chains averaged by the attacked classifier")
    p.add_argument("--robust-sigma", type=float, default=0.0,
                   help="std of the Gaussian noise added to the input to start each chain")
    p.add_argument("--robust-n", type=int, default=100,
                   help="number of test points attacked")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    return p


@dataclass
class Options:
    """Validated settings derived from the command line."""

    tasks: list[str]
    pgd_norms: list[str]
    pgd_eps: dict[str, list[float]]
    ood_specs: list[tuple[str, str | None]]


def _validate_args(args: argparse.Namespace) -> Options:
    """Check flag values (raises :class:`EvalError`)."""
    tasks = _csv(args.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalError(
            f"--tasks: unknown task(s) {', '.join(unknown) or '(none given)'}; "
            f"expected a comma list of {', '.join(TASKS)}"
        )
    tasks = [t for t in TASKS if t in tasks]
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
    norms = _csv(args.pgd_norms)
    bad = [n for n in norms if n not in NORMS]
    if bad or not norms:
        raise EvalError(f"--pgd-norms: expected a comma list of {', '.join(NORMS)}, got "
                        f"{args.pgd_norms!r}")
    eps = {n: list(DEFAULT_EPS[n]) for n in norms}
    for spec in args.pgd_eps:
        target, _, values = spec.rpartition("=")
        if target and target not in NORMS:
            raise EvalError(f"--pgd-eps {spec!r}: unknown norm {target!r} (expected "
                            f"{', '.join(NORMS)})")
        try:
            parsed = [float(v) for v in _csv(values)]
        except ValueError:
            raise EvalError(f"--pgd-eps {spec!r}: expected comma-separated numbers") from None
        if not parsed or any(not math.isfinite(v) or v < 0 for v in parsed):
            raise EvalError(f"--pgd-eps {spec!r}: expected non-negative numbers")
        for n in [target] if target else norms:
            if n in eps:
                eps[n] = sorted(set(parsed))
    oods = []
    for spec in args.ood:
        name, _, folder = spec.partition(":")
        if not name:
            raise EvalError(f"--ood {spec!r}: expected NAME[:FOLDER]")
        if name in BUILTIN_OOD:
            raise EvalError(f"--ood {name}: a built-in OOD set, always evaluated")
        oods.append((name, folder or None))
    return Options(tasks=tasks, pgd_norms=norms, pgd_eps=eps, ood_specs=oods)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A checkpoint and its rebuilt model."""

    path: Path
    state: dict[str, Any]
    model: nn.Module
    label: str
    in_shape: tuple[int, ...]
    num_classes: int

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.state.get("config")
        return cfg if isinstance(cfg, dict) else {}


def _load(path: str, device: str, what: str, label: str | None = None) -> Loaded:
    """Resolve, load and rebuild a checkpoint (raises :class:`EvalError`)."""
    from ..checkpoint import (CheckpointError, load_checkpoint, model_from_checkpoint,
                              resolve_checkpoint)

    try:
        file = resolve_checkpoint(path)
        state = load_checkpoint(file, map_location="cpu")
        model = model_from_checkpoint(state, device=device)
    except CheckpointError as err:
        raise EvalError(f"{what}: {err}") from None
    spec = state["model_spec"]
    model.requires_grad_(False)
    cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
    if label is None:
        label = str(cfg.get("objective") or file.parent.parent.name or file.stem)
    return Loaded(path=file, state=state, model=model, label=label,
                  in_shape=tuple(int(s) for s in spec["in_shape"]),
                  num_classes=int(spec["num_classes"]))


def _check_data(data, loaded: Loaded, what: str) -> None:
    """The data's sample shape (and class count) must match the model's."""
    if tuple(data.shape) != loaded.in_shape:
        raise EvalError(
            f"{what}: samples of {data.name!r} have shape {tuple(data.shape)} but the model of "
            f"{loaded.path} expects {loaded.in_shape}"
        )


def _subset(data, n: int | None, seed: int):
    """A seeded random subset of at most ``n`` samples (all of them when n is None)."""
    if n is None or len(data) <= n:
        return data.x, data.y
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:n].sort().values
    return data.x[idx], data.y[idx]


def _load_data(name: str, root: str | None, what: str):
    from ..data import DataError, load_dataset

    try:
        return load_dataset(name, root, "test")
    except DataError as err:
        raise EvalError(f"{what}: {err}") from None


# ----------------------------------------------------------------------------------------------
# Computation helpers
# ----------------------------------------------------------------------------------------------


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, bs: int, device: str, progress: bool,
            desc: str = "logits") -> torch.Tensor:
    out = []
    with _bar(len(x), desc, progress) as bar:
        for s in range(0, len(x), bs):
            out.append(model(x[s:s + bs].to(device)).float().cpu())
            bar.update(len(x[s:s + bs]))
    return torch.cat(out)


def ood_scores(model: nn.Module, x: torch.Tensor, batch_size: int, device: str = "cpu",
               progress: bool = False, desc: str = "scores") -> dict[str, np.ndarray]:
    """Per-sample OOD scores (higher = more in-distribution) of ``x`` under ``model``.

    Returns ``{"logpx": logsumexp f(x), "maxprob": max p(y|x), "approx_mass": -||d logpx/dx||}``
    as float64 arrays. The model must be in eval mode (samples are then independent).
    """
    from ..ops import energy

    out: dict[str, list[np.ndarray]] = {k: [] for k in SCORES}
    with _bar(len(x), desc, progress) as bar:
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size].to(device).requires_grad_(True)
            with torch.enable_grad():
                logits = model(xb)
                logpx = -energy(logits)
                (grad,) = torch.autograd.grad(logpx.sum(), xb)
            out["logpx"].append(logpx.detach().double().cpu().numpy())
            out["maxprob"].append(torch.softmax(logits.detach().double(), 1).max(1).values
                                  .cpu().numpy())
            out["approx_mass"].append(-grad.flatten(1).double().norm(dim=1).cpu().numpy())
            bar.update(len(xb))
    return {k: np.concatenate(v) for k, v in out.items()}


def builtin_ood_sets(x_test: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The built-in OOD sets: as many samples as ``x_test``, with its sample shape.

    ``uniform``: U(-1, 1) pixels; ``gaussian``: N(0, 1) pixels clamped to [-1, 1];
    ``constant``: one U(-1, 1) value for every pixel and channel of an image; ``interp``:
    (x_i + x_j) / 2 for a random derangement j of the test images (lambda = 0.5).
    """
    n, shape = len(x_test), tuple(x_test.shape[1:])
    g = torch.Generator().manual_seed(seed + 1)
    uniform = torch.rand((n, *shape), generator=g) * 2 - 1
    gaussian = torch.randn((n, *shape), generator=g).clamp(-1, 1)
    constant = (torch.rand((n,) + (1,) * len(shape), generator=g) * 2 - 1).expand(n, *shape)
    perm = torch.randperm(n, generator=g)
    fixed = perm == torch.arange(n)
    perm[fixed] = (perm[fixed] + 1) % n  # never mix an image with itself
    interp = 0.5 * (x_test + x_test[perm])
    return {"uniform": uniform, "gaussian": gaussian, "constant": constant.contiguous(),
            "interp": interp}


def _sgld(model, x0, steps, args, y=None):
    from ..sampler import sgld_chain

    return sgld_chain(model, x0, steps, step_size=args.sgld_step_size,
                      noise_std=args.sgld_noise, y=y, clamp=args.gen_clamp,
                      grad_clip=args.gen_grad_clip)


def generate(model: nn.Module, n: int, shape: Sequence[int], steps: int, args,
             y: torch.Tensor | None = None, seed: int = 0, progress: bool = False,
             desc: str = "SGLD") -> torch.Tensor:
    """``n`` samples from fresh SGLD chains started at U(-1, 1).

    Step size, noise, clamp and gradient clipping come from ``args`` (``sgld_step_size``,
    ``sgld_noise``, ``gen_clamp``, ``gen_grad_clip``).

    With ``y``, the chains follow E(x, y) = -f(x)[y] (class-conditional samples).
    """
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((n, *shape), generator=g) * 2 - 1
    out = []
    bs = args.batch_size
    with _bar(n, desc, progress) as bar:
        for s in range(0, n, bs):
            yb = None if y is None else y[s:s + bs].to(args.device)
            out.append(_sgld(model, x0[s:s + bs].to(args.device), steps, args, y=yb).cpu())
            bar.update(len(x0[s:s + bs]))
    return torch.cat(out)


def _find_buffer(obj: Any, shape: tuple[int, ...], depth: int = 0) -> torch.Tensor | None:
    """The replay-buffer tensor ``[N, *shape]`` inside a sampler state dict, if any."""
    if depth > 4 or obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        if obj.dim() == len(shape) + 1 and tuple(obj.shape[1:]) == shape and obj.shape[0] > 0:
            return obj
        return None
    if isinstance(obj, dict):
        for key in ("buffer", "data"):
            if key in obj:
                found = _find_buffer(obj[key], shape, depth + 1)
                if found is not None:
                    return found
        for value in obj.values():
            found = _find_buffer(value, shape, depth + 1)
            if found is not None:
                return found
    return None


# ----------------------------------------------------------------------------------------------
# Tasks (each returns a JSON-able dict and registers figures to draw)
# ----------------------------------------------------------------------------------------------


@dataclass
class Context:
    """Everything the tasks share."""

    args: argparse.Namespace
    opts: Options
    models: list[Loaded]  # [main] or [main, compare]
    x_test: torch.Tensor
    y_test: torch.Tensor
    dataset: str
    ood_extra: dict[str, torch.Tensor]
    fid_net: tuple[str, Any] | None  # ("inception", net) or ("classifier", Loaded) or None
    fid_skip_reason: str | None
    figures: list[tuple[str, Callable[[Path], None]]] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> bool:
        return not self.args.no_progress


def task_accuracy(ctx: Context, m: Loaded, key: str) -> dict[str, Any]:
    """Test accuracy, and the accuracy after --refine-steps SGLD steps."""
    from .attacks import SGLDRefinedClassifier

    a = ctx.args
    logits = _logits(m.model, ctx.x_test, a.batch_size, a.device, ctx.progress,
                     f"{m.label}: accuracy")
    ctx.cache[(key, "logits")] = logits
    out: dict[str, Any] = {"accuracy": float((logits.argmax(1) == ctx.y_test).double().mean())}
    if a.refine_steps > 0:
        torch.manual_seed(a.seed)
        refined = SGLDRefinedClassifier(m.model, a.refine_steps, a.sgld_step_size, a.sgld_noise)
        r_logits = _logits(refined, ctx.x_test, a.batch_size, a.device, ctx.progress,
                           f"{m.label}: refined accuracy")
        out["accuracy_refined"] = {
            "steps": a.refine_steps,
            "accuracy": float((r_logits.argmax(1) == ctx.y_test).double().mean()),
        }
    return out


def _cached_logits(ctx: Context, m: Loaded, key: str) -> torch.Tensor:
    if (key, "logits") not in ctx.cache:
        ctx.cache[(key, "logits")] = _logits(m.model, ctx.x_test, ctx.args.batch_size,
                                             ctx.args.device, ctx.progress, f"{m.label}: logits")
    return ctx.cache[(key, "logits")]


def task_calibration(ctx: Context, m: Loaded, key: str) -> dict[str, Any]:
    """ECE over 20 equal-width bins of max p(y|x)."""
    from .metrics import expected_calibration_error

    probs = torch.softmax(_cached_logits(ctx, m, key).double(), 1)
    res = expected_calibration_error(probs, ctx.y_test, n_bins=ECE_BINS)
    ctx.cache[(key, "calibration")] = res
    return {
        "ece": res.ece,
        "calibration": {
            "n_bins": ECE_BINS,
            "bin_edges": res.bin_edges.tolist(),
            "counts": res.counts.tolist(),
            "accuracy": [None if math.isnan(v) else float(v) for v in res.accuracy],
            "confidence": [None if math.isnan(v) else float(v) for v in res.confidence],
        },
    }


def task_ood(ctx: Context, m: Loaded, key: str) -> dict[str, Any]:
    """AUROC of test data against each OOD set for every score, and log p(x) histograms."""
    from .metrics import auroc

    a = ctx.args
    sets = dict(builtin_ood_sets(ctx.x_test, a.seed))
    sets.update(ctx.ood_extra)
    scores_in = ood_scores(m.model, ctx.x_test, a.batch_size, a.device, ctx.progress,
                           f"{m.label}: scores {ctx.dataset}")
    table: dict[str, dict[str, float]] = {}
    logpx = {f"{ctx.dataset} (test)": scores_in["logpx"]}
    for name, x in sets.items():
        s_out = ood_scores(m.model, x, a.batch_size, a.device, ctx.progress,
                           f"{m.label}: scores {name}")
        table[name] = {k: auroc(scores_in[k], s_out[k]) for k in SCORES}
        logpx[name] = s_out["logpx"]
    ctx.cache[(key, "logpx")] = logpx
    return {
        "ood": table,
        "ood_sizes": {"in": len(ctx.x_test), **{k: len(v) for k, v in sets.items()}},
        "logpx_mean": {k: float(np.mean(v)) for k, v in logpx.items()},
    }


def task_generation(ctx: Context, m: Loaded, key: str) -> dict[str, Any]:
    """Sample grids from fresh chains (unconditional, class-conditional) and the buffer."""
    from ..data import save_image_grid

    a = ctx.args
    images = len(m.in_shape) == 3 and m.in_shape[0] in (1, 3)
    fresh = generate(m.model, a.gen_n, m.in_shape, a.gen_steps, a, seed=a.seed + 2,
                     progress=ctx.progress, desc=f"{m.label}: SGLD unconditional")
    ctx.cache[(key, "samples")] = fresh
    per = max(1, a.gen_n // m.num_classes)
    y = torch.arange(m.num_classes).repeat_interleave(per)
    cond = generate(m.model, len(y), m.in_shape, a.gen_steps, a, y=y, seed=a.seed + 3,
                    progress=ctx.progress, desc=f"{m.label}: SGLD conditional")
    cond_logits = _logits(m.model, cond, a.batch_size, a.device, False)
    test_logpx = float(-_energy_mean(_cached_logits(ctx, m, key)))
    out: dict[str, Any] = {
        "steps": a.gen_steps, "n_unconditional": len(fresh), "n_conditional": len(cond),
        "step_size": a.sgld_step_size, "noise_std": a.sgld_noise, "clamp": a.gen_clamp,
        "grad_clip": a.gen_grad_clip, "init": "uniform(-1, 1)",
        # Fraction of class-conditional samples that the model classifies as their class.
        "conditional_accuracy": float((cond_logits.argmax(1) == y).double().mean()),
        "logpx_mean_samples": float(-_energy_mean(
            _logits(m.model, fresh, a.batch_size, a.device, False))),
        "logpx_mean_test": test_logpx,
        "files": {},
    }
    buf = _find_buffer(m.state.get("sampler"), m.in_shape)
    suffix = "" if key == "main" else "_compare"
    if buf is not None:
        g = torch.Generator().manual_seed(a.seed + 4)
        pick = torch.randperm(len(buf), generator=g)[: a.gen_n]
        buffer_x = buf[pick].float().cpu()
        out["buffer_size"] = len(buf)
    else:
        buffer_x = None
        out["buffer"] = "the checkpoint holds no replay buffer (short-run sampler or CE model)"
    if images:
        grids = {f"samples_uncond{suffix}.png": (fresh, None),
                 f"samples_cond{suffix}.png": (cond, per)}
        if buffer_x is not None:
            grids[f"samples_buffer{suffix}.png"] = (buffer_x, None)
        for name, (x, nrow) in grids.items():
            out["files"][name.split("_")[1].split(".")[0].replace("compare", "")] = name
            ctx.figures.append((name, lambda p, x=x, nrow=nrow: save_image_grid(x, p, nrow=nrow)))
    else:
        out["files_note"] = f"no grids: samples of shape {m.in_shape} are not images"
    return {"generation": out}


def _energy_mean(logits: torch.Tensor) -> float:
    from ..ops import energy

    return float(energy(logits.double()).mean())


def task_fid(ctx: Context, m: Loaded, key: str) -> dict[str, Any]:
    """IS of fresh-chain samples and FID against test images (Inception or a classifier)."""
    from .inception import classifier_features, extract
    from .metrics import fid, inception_score

    a = ctx.args
    if ctx.fid_net is None:
        return {"fid": {"skipped": ctx.fid_skip_reason}}
    samples = ctx.cache.get((key, "samples"))
    if samples is None:
        samples = generate(m.model, a.gen_n, m.in_shape, a.gen_steps, a, seed=a.seed + 2,
                           progress=ctx.progress, desc=f"{m.label}: SGLD for FID")
    kind, net = ctx.fid_net
    if kind == "inception":
        def fn(x):
            feats, logits = net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
            return feats, torch.softmax(logits.double(), 1)
        note = "FID Inception-v3 (pool3 features, 1008-way logits)"
    else:
        def fn(x):
            return classifier_features(net.model, x)
        note = (f"features of classifier {net.path}: NOT comparable with published "
                "Inception-based figures")
    f_gen, p_gen = extract(fn, samples, a.batch_size, a.device, f"{m.label}: features gen",
                           ctx.progress)
    if "fid_test_features" not in ctx.cache:  # shared by both models
        ctx.cache["fid_test_features"] = extract(fn, ctx.x_test, a.batch_size, a.device,
                                                 "features test", ctx.progress)[0]
    f_test = ctx.cache["fid_test_features"]
    splits = min(10, len(samples))
    is_mean, is_std = inception_score(p_gen, splits=splits)
    out = {
        "network": kind, "note": note, "n_generated": len(samples), "n_test": len(ctx.x_test),
        "feature_dim": int(f_gen.shape[1]),
        "fid": fid(f_gen, f_test), "is_mean": is_mean, "is_std": is_std, "is_splits": splits,
        "comparable_with_published": kind == "inception",
    }
    if min(len(samples), len(ctx.x_test)) <= f_gen.shape[1]:
        out["warning"] = (f"fewer samples than feature dimensions ({f_gen.shape[1]}): the "
                          "covariances are singular and the FID is unreliable (use more "
                          "--gen-n and test images)")
    return {"fid": out}


def task_robustness(ctx: Context, m: Loaded, key: str) -> dict[str, Any]:
    """PGD accuracy-vs-epsilon of the SGLD-refined classifier, per norm."""
    from .attacks import SGLDRefinedClassifier, robust_accuracy

    a = ctx.args
    n = min(a.robust_n, len(ctx.x_test))
    x, y = ctx.x_test[:n], ctx.y_test[:n]
    clf = SGLDRefinedClassifier(m.model, a.robust_refine_steps, a.sgld_step_size, a.sgld_noise,
                                sigma=a.robust_sigma, n_chains=a.robust_chains)
    out: dict[str, Any] = {"n": n, "refine_steps": a.robust_refine_steps,
                           "chains": a.robust_chains, "sigma": a.robust_sigma,
                           "pgd_steps": a.pgd_steps,
                           "pgd_step_size": a.pgd_step_size or "2.5 * eps / steps",
                           "curves": {}}
    steps = max(a.pgd_steps, 1)
    step = a.pgd_step_size if a.pgd_step_size is not None else (lambda e: 2.5 * e / steps)
    g = torch.Generator(device=a.device).manual_seed(a.seed + 5)
    for norm in ctx.opts.pgd_norms:
        torch.manual_seed(a.seed + 6)
        curve = robust_accuracy(clf, x, y, norm, ctx.opts.pgd_eps[norm], a.pgd_steps, step,
                                a.batch_size, device=a.device, generator=g,
                                desc=f"{m.label}: PGD {norm}", progress=ctx.progress)
        out["curves"][norm] = [[e, acc] for e, acc in curve]
    return {"robustness": out}


TASK_FUNCS = {
    "accuracy": task_accuracy,
    "calibration": task_calibration,
    "ood": task_ood,
    "generation": task_generation,
    "fid": task_fid,
    "robustness": task_robustness,
}


# ----------------------------------------------------------------------------------------------
# Report writing
# ----------------------------------------------------------------------------------------------


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], images: bool = True) -> str:
    """The report as markdown tables (both models side by side); ``images`` adds the PNGs."""
    results = [report] + ([report["compare"]] if "compare" in report else [])
    labels = [r["label"] for r in results]
    parts = [f"# Evaluation of {report['label']}"
             + (f" vs {report['compare']['label']}" if "compare" in report else ""),
             ""]
    rows = [[r["label"], f"`{r['checkpoint']}`", r.get("objective", "-"),
             r.get("iteration", "-")] for r in results]
    parts += [_table(["model", "checkpoint", "objective", "iteration"], rows), "",
              f"Data: `{report['dataset']}` test split, {report['n_test']} images "
              f"(seed {report['settings']['seed']}).", ""]
    tasks = report["tasks"]

    if "accuracy" in tasks or "calibration" in tasks:
        header, cols = ["metric"] + labels, []
        if "accuracy" in tasks:
            cols.append(("accuracy (%)", [_pct(r.get("accuracy")) for r in results]))
            if "accuracy_refined" in report:
                k = report["accuracy_refined"]["steps"]
                cols.append((f"accuracy after {k} SGLD steps (%)",
                             [_pct(r.get("accuracy_refined", {}).get("accuracy"))
                              for r in results]))
        if "calibration" in tasks:
            cols.append((f"ECE, {ECE_BINS} bins (%)", [_pct(r.get("ece")) for r in results]))
        parts += ["## Accuracy and calibration", "",
                  _table(header, [[name, *vals] for name, vals in cols]), ""]
        if images and "calibration" in tasks:
            parts += ["![reliability diagram](reliability.png)", ""]

    if "ood" in tasks:
        sets = list(report["ood"])
        header = ["OOD set"] + [f"{s} ({lab})" for s in SCORES for lab in labels]
        rows = [[name] + [f"{r['ood'][name][s]:.3f}" for s in SCORES for r in results]
                for name in sets]
        parts += ["## OOD detection (AUROC, in-distribution test set vs each set)", "",
                  "Scores: logpx = logsumexp_y f(x)[y]; maxprob = max_y p(y|x); "
                  "approx_mass = -||d logpx/dx||_2. Built-in sets: uniform U(-1,1), "
                  "gaussian N(0,1) clamped to [-1,1], constant (one random value per image), "
                  "interp (mean of two test images).", "",
                  _table(header, rows), ""]
        if images:
            parts += [f"![log p(x) {r['label']}]({f})" for r, f in
                      zip(results, ["logpx_hist.png", "logpx_hist_compare.png"])] + [""]

    if "generation" in tasks:
        rows = []
        for r in results:
            gen = r["generation"]
            rows.append([r["label"], gen["steps"], _pct(gen["conditional_accuracy"]),
                         f"{gen['logpx_mean_samples']:.2f}", f"{gen['logpx_mean_test']:.2f}",
                         gen.get("buffer_size", "none")])
        parts += ["## Generation (fresh SGLD chains from U(-1,1))", "",
                  _table(["model", "SGLD steps", "conditional samples classified as their "
                          "class (%)", "mean logpx samples", "mean logpx test",
                          "replay buffer size"], rows), ""]
        if images:
            for r in results:
                for kind, f in r["generation"]["files"].items():
                    parts.append(f"{r['label']} {kind}: ![{r['label']} {kind}]({f})")
            parts.append("")

    if "fid" in tasks:
        parts += ["## IS and FID", ""]
        f0 = report["fid"]
        if "skipped" in f0:
            parts += [f"Skipped: {f0['skipped']}", ""]
        else:
            rows = [[r["label"], f"{r['fid']['is_mean']:.3f} ± {r['fid']['is_std']:.3f}",
                     f"{r['fid']['fid']:.3f}", r["fid"]["n_generated"]] for r in results]
            parts += [f"Network: {f0['note']}.", "",
                      _table(["model", "IS", "FID", "samples"], rows), ""]
            if "warning" in f0:
                parts += [f"Warning: {f0['warning']}.", ""]

    if "robustness" in tasks:
        rb = report["robustness"]
        parts += ["## Robustness (PGD through the SGLD-refined classifier)", "",
                  f"{rb['n']} test points, K = {rb['refine_steps']} SGLD steps, "
                  f"{rb['chains']} chains, PGD {rb['pgd_steps']} steps, step "
                  f"{rb['pgd_step_size']}; eps in the model's [-1, 1] input units "
                  "(eps 0 = clean accuracy of the refined classifier).", ""]
        for norm, curve in rb["curves"].items():
            rows = [[f"{e:g}"] + [_pct(dict(map(tuple, r["robustness"]["curves"][norm]))
                                       .get(e)) for r in results] for e, _ in curve]
            parts += [f"### {norm} (accuracy %)", "", _table(["eps"] + labels, rows), ""]
            if images:
                parts += [f"![{norm}](robustness_{norm}.png)", ""]

    if report.get("skipped"):
        parts += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in report["skipped"].items()]
        parts.append("")
    return "\n".join(parts)


def _draw_shared(ctx: Context, results: list[dict[str, Any]]) -> None:
    """Register the figures that show both models together."""
    from . import plots

    labels = [m.label for m in ctx.models]
    keys = ["main", "compare"][: len(ctx.models)]
    if "calibration" in ctx.opts.tasks:
        cal = {lab: ctx.cache[(k, "calibration")] for lab, k in zip(labels, keys)}
        ctx.figures.append(("reliability.png", lambda p: plots.reliability_diagram(
            cal, p, title=f"Reliability on {ctx.dataset} test")))
    if "ood" in ctx.opts.tasks:
        for lab, k, name in zip(labels, keys, ["logpx_hist.png", "logpx_hist_compare.png"]):
            ctx.figures.append((name, lambda p, d=ctx.cache[(k, "logpx")], lab=lab:
                                plots.logpx_histograms(d, p, title=f"log p(x) under {lab}")))
    if "robustness" in ctx.opts.tasks:
        for norm in ctx.opts.pgd_norms:
            curves = {r["label"]: [tuple(c) for c in r["robustness"]["curves"][norm]]
                      for r in results}
            ctx.figures.append((f"robustness_{norm}.png", lambda p, c=curves, n=norm:
                                plots.robustness_curve(c, p, title=f"PGD {n}, K = "
                                f"{ctx.args.robust_refine_steps} SGLD steps",
                                xlabel=f"eps ({n})")))


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _prepare(args: argparse.Namespace) -> Context:
    """Validate everything and load all inputs; raises :class:`EvalError`, writes nothing."""
    opts = _validate_args(args)
    try:
        torch.device(args.device)
    except RuntimeError:
        raise EvalError(f"--device: unknown device {args.device!r}") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device}: CUDA is not available")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out}: exists and is not a folder")
    main_m = _load(args.checkpoint, args.device, "--checkpoint", args.label)
    models = [main_m]
    cfg = main_m.config
    dataset = args.dataset or cfg.get("dataset")
    if not dataset:
        raise EvalError(f"--checkpoint {main_m.path}: its config names no 'dataset'; "
                        "pass --dataset")
    root = args.data_root if args.data_root is not None else cfg.get("data_root")
    data = _load_data(dataset, root, f"data set {dataset!r}")
    _check_data(data, main_m, f"data set {dataset!r}")
    if data.num_classes != main_m.num_classes:
        raise EvalError(f"data set {dataset!r} has {data.num_classes} classes but the model of "
                        f"{main_m.path} has {main_m.num_classes} outputs")
    if args.compare:
        other = _load(args.compare, args.device, "--compare", args.compare_label)
        if (other.in_shape, other.num_classes) != (main_m.in_shape, main_m.num_classes):
            raise EvalError(
                f"--compare {other.path}: its model takes {other.in_shape} with "
                f"{other.num_classes} classes, but the --checkpoint model takes "
                f"{main_m.in_shape} with {main_m.num_classes} classes"
            )
        if other.label == main_m.label:
            other.label += " (compare)"
        models.append(other)
    sampler = main_m.state.get("sampler") if isinstance(main_m.state.get("sampler"), dict) else {}
    if args.sgld_step_size is None:
        args.sgld_step_size = float(sampler.get("step_size") or 1.0)
    if args.sgld_noise is None:
        args.sgld_noise = float(sampler.get("noise_std", 0.01) if sampler.get("noise_std")
                                is not None else 0.01)
    clamp = sampler.get("clamp")
    args.gen_clamp = (-1.0, 1.0) if clamp is None else (float(clamp[0]), float(clamp[1]))
    args.gen_grad_clip = sampler.get("grad_clip")
    x_test, y_test = _subset(data, args.max_samples, args.seed)
    ood_extra = {}
    for name, folder in opts.ood_specs:
        d = _load_data(name, folder, f"--ood {name}")
        _check_data(d, main_m, f"--ood {name}")
        ood_extra[name] = _subset(d, args.max_samples, args.seed)[0]
    fid_net, reason = None, None
    if "fid" in opts.tasks:
        if args.inception_weights:
            from .inception import load_inception

            if main_m.in_shape[0] not in (1, 3) or len(main_m.in_shape) != 3:
                raise EvalError(f"--inception-weights: samples of shape {main_m.in_shape} "
                                "are not images")
            try:
                fid_net = ("inception", load_inception(args.inception_weights, args.device))
            except ValueError as err:
                raise EvalError(f"--inception-weights: {err}") from None
        elif args.fid_classifier:
            clf = _load(args.fid_classifier, args.device, "--fid-classifier")
            if clf.in_shape != main_m.in_shape:
                raise EvalError(f"--fid-classifier {clf.path}: its model takes {clf.in_shape}, "
                                f"the evaluated model {main_m.in_shape}")
            fid_net = ("classifier", clf)
        else:
            reason = ("no --inception-weights (FID Inception-v3 state_dict) and no "
                      "--fid-classifier given; nothing is downloaded at run time")
    return Context(args=args, opts=opts, models=models, x_test=x_test, y_test=y_test,
                   dataset=dataset, ood_extra=ood_extra, fid_net=fid_net,
                   fid_skip_reason=reason)


def _settings(args: argparse.Namespace, opts: Options) -> dict[str, Any]:
    s = {k: v for k, v in vars(args).items() if k not in ("pgd_eps", "ood")}
    s["pgd_eps"] = opts.pgd_eps
    s["ood"] = [f"{n}:{f}" if f else n for n, f in opts.ood_specs]
    return s


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by parsed ``args``; returns the report dict.

    All inputs are validated before any computation; the output folder is created and the
    files written (each atomically) only once every figure is computed.

    Raises:
        EvalError: bad input (nothing has been written).
    """
    ctx = _prepare(args)
    start = time.time()
    results = []
    for key, m in zip(["main", "compare"], ctx.models):
        r: dict[str, Any] = {
            "label": m.label, "checkpoint": str(m.path),
            "objective": m.config.get("objective"), "iteration": m.state.get("iteration"),
            "best_val_accuracy": m.state.get("best_val_accuracy"),
        }
        timing = {}
        for task in ctx.opts.tasks:
            torch.manual_seed(args.seed)
            t0 = time.time()
            r.update(TASK_FUNCS[task](ctx, m, key))
            timing[task] = round(time.time() - t0, 2)
        r["seconds_by_task"] = timing
        results.append(r)
    report = results[0]
    report.update({
        "dataset": ctx.dataset, "split": "test", "n_test": len(ctx.x_test),
        "tasks": ctx.opts.tasks, "settings": _settings(args, ctx.opts),
    })
    if "fid" in ctx.opts.tasks and ctx.fid_net is None:
        report["skipped"] = {"fid": ctx.fid_skip_reason}
    if len(results) > 1:
        report["compare"] = results[1]
    _draw_shared(ctx, results)
    report["seconds"] = round(time.time() - start, 1)
    report["files"] = ["report.json", "report.md"] + [name for name, _ in ctx.figures]

    markdown = render_markdown(report) + "\n"
    as_json = json.dumps(report, indent=2, default=_json_default) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in ctx.figures:
        draw(out / name)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.json", as_json)
    return report


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jem_ext.eval``; returns the exit status (2 on bad input)."""
    try:
        args = build_parser().parse_args(argv)
        report = run(args)
    except EvalError as err:
        print(f"jem_ext.eval: error: {err}", file=sys.stderr)
        return 2
    print(render_markdown(report, images=False))
    print(f"\nwrote {Path(args.out) / 'report.json'}, report.md and "
          f"{len(report['files']) - 2} PNGs in {report['seconds']} s")
    return 0
