"""The classification tasks: accuracy, calibration, OOD detection and robustness.

Each task is a function of (model, data, settings) that returns a typed result; a result's
``to_json()`` gives its part of report.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import predict_logits
from ..ops import energy
from .attacks import SGLDRefinedClassifier, robust_accuracy
from .inputs import EvalData, Loaded
from .metrics import CalibrationResult, accuracy, auroc, expected_calibration_error
from .settings import ECE_BINS, SCORES, EvalSettings, SGLDSettings
from .speed import autocast_model, uncompiled

__all__ = [
    "AccuracyResult",
    "CalibrationTaskResult",
    "OODResult",
    "RobustnessResult",
    "builtin_ood_sets",
    "logits_of",
    "ood_scores",
    "run_accuracy",
    "run_calibration",
    "run_ood",
    "run_robustness",
]


def progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    """A tqdm bar counting images (hidden unless ``progress``)."""
    return tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)


def logits_of(
    model: nn.Module,
    x: torch.Tensor,
    settings: EvalSettings,
    desc: str,
    progress: bool | None = None,
) -> torch.Tensor:
    """Batched eval-mode logits of ``model`` on ``x`` (float32, on the CPU), with a bar;
    the forward runs in --precision."""
    show = settings.display.progress if progress is None else progress
    with progress_bar(len(x), desc, show) as bar:
        return predict_logits(
            autocast_model(model, settings), x, settings.data.batch_size, on_batch=bar.update
        )


# ------------------------------------------------------------------------------ accuracy


@dataclass
class AccuracyResult:
    """Test accuracy, and the accuracy after ``refined_steps`` SGLD steps when asked for."""

    accuracy: float
    refined_steps: int = 0
    refined_accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"accuracy": self.accuracy}
        if self.refined_steps > 0:
            out["accuracy_refined"] = {
                "steps": self.refined_steps,
                "accuracy": self.refined_accuracy,
            }
        return out


def run_accuracy(
    m: Loaded, data: EvalData, settings: EvalSettings, sgld: SGLDSettings, logits: torch.Tensor
) -> AccuracyResult:
    """Accuracy of the test ``logits``; with --refine-steps K also after K SGLD steps."""
    result = AccuracyResult(accuracy=accuracy(logits, data.y))
    if settings.sgld.refine_steps > 0:
        torch.manual_seed(settings.data.seed)
        refined = SGLDRefinedClassifier(m.model, chain=sgld.with_steps(settings.sgld.refine_steps))
        r_logits = logits_of(refined, data.x, settings, f"{m.label}: refined accuracy")
        result.refined_steps = settings.sgld.refine_steps
        result.refined_accuracy = accuracy(r_logits, data.y)
    return result


# --------------------------------------------------------------------------- calibration


def _none_if_nan(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values]


@dataclass
class CalibrationTaskResult:
    """Expected calibration error over ``ECE_BINS`` bins and its reliability statistics."""

    stats: CalibrationResult

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        return {
            "ece": s.ece,
            "calibration": {
                "n_bins": ECE_BINS,
                "bin_edges": s.bin_edges.tolist(),
                "counts": s.counts.tolist(),
                "accuracy": _none_if_nan(s.accuracy),
                "confidence": _none_if_nan(s.confidence),
            },
        }


def run_calibration(data: EvalData, logits: torch.Tensor) -> CalibrationTaskResult:
    """ECE over 20 equal-width bins of max p(y|x) of the test ``logits``."""
    probs = torch.softmax(logits.double(), 1)
    return CalibrationTaskResult(expected_calibration_error(probs, data.y, n_bins=ECE_BINS))


# ----------------------------------------------------------------------------------- OOD


def ood_scores(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int,
    device: str = "cpu",
    progress: bool = False,
    desc: str = "scores",
) -> dict[str, np.ndarray]:
    """Per-sample OOD scores (higher = more in-distribution) of ``x`` under ``model``.

    Returns ``{"logpx": logsumexp f(x), "maxprob": max p(y|x), "approx_mass": -||d logpx/dx||}``
    as float64 arrays. The model must be in eval mode (samples are then independent).
    """
    out: dict[str, list[np.ndarray]] = {k: [] for k in SCORES}
    with progress_bar(len(x), desc, progress) as bar:
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size].to(device).requires_grad_(True)
            with torch.enable_grad():
                logits = model(xb)
                logpx = -energy(logits)
                (grad,) = torch.autograd.grad(logpx.sum(), xb)
            out["logpx"].append(logpx.detach().double().cpu().numpy())
            out["maxprob"].append(
                torch.softmax(logits.detach().double(), 1).max(1).values.cpu().numpy()
            )
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
    return {
        "uniform": uniform,
        "gaussian": gaussian,
        "constant": constant.contiguous(),
        "interp": interp,
    }


@dataclass
class OODResult:
    """AUROC per OOD set and score, set sizes, and log p(x) per set (for the histograms)."""

    auroc: dict[str, dict[str, float]]
    sizes: dict[str, int]
    logpx: dict[str, np.ndarray] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "ood": self.auroc,
            "ood_sizes": self.sizes,
            "logpx_mean": {k: float(np.mean(v)) for k, v in self.logpx.items()},
        }


def run_ood(m: Loaded, data: EvalData, settings: EvalSettings) -> OODResult:
    """AUROC of test data against each OOD set for every score."""
    sets = dict(builtin_ood_sets(data.x, settings.data.seed))
    sets.update(data.ood_extra)

    model = autocast_model(m.model, settings)

    def scores(x: torch.Tensor, name: str) -> dict[str, np.ndarray]:
        return ood_scores(
            model,
            x,
            settings.data.batch_size,
            settings.data.device,
            settings.display.progress,
            f"{m.label}: scores {name}",
        )

    scores_in = scores(data.x, data.dataset)
    table: dict[str, dict[str, float]] = {}
    logpx = {f"{data.dataset} (test)": scores_in["logpx"]}
    for name, x in sets.items():
        s_out = scores(x, name)
        table[name] = {k: auroc(scores_in[k], s_out[k]) for k in SCORES}
        logpx[name] = s_out["logpx"]
    sizes = {"in": len(data.x), **{k: len(v) for k, v in sets.items()}}
    return OODResult(auroc=table, sizes=sizes, logpx=logpx)


# ---------------------------------------------------------------------------- robustness


@dataclass
class RobustnessResult:
    """PGD accuracy-vs-radius curves of the SGLD-refined classifier, per norm."""

    n: int
    refine_steps: int
    chains: int
    sigma: float
    pgd_steps: int
    pgd_step_size: float | str
    curves: dict[str, list[list[float]]]

    def to_json(self) -> dict[str, Any]:
        return {"robustness": dict(vars(self))}


def _pgd_step(settings: EvalSettings) -> float | Callable[[float], float]:
    """The PGD step length: --pgd-step-size, else 2.5 * eps / steps (Madry et al.)."""
    if settings.robustness.pgd_step_size is not None:
        return settings.robustness.pgd_step_size
    steps = max(settings.robustness.pgd_steps, 1)
    return lambda e: 2.5 * e / steps


def run_robustness(
    m: Loaded, data: EvalData, settings: EvalSettings, sgld: SGLDSettings
) -> RobustnessResult:
    """PGD accuracy of the SGLD-refined classifier on the first --robust-n test points (the
    model runs uncompiled: PGD differentiates through the refinement's input gradients)."""
    s = settings
    n = min(s.robustness.robust_n, len(data.x))
    x, y = data.x[:n], data.y[:n]
    clf = SGLDRefinedClassifier(
        autocast_model(uncompiled(m.model), s),
        chain=sgld.with_steps(s.robustness.robust_refine_steps),
        sigma=s.robustness.robust_sigma,
        n_chains=s.robustness.robust_chains,
    )
    result = RobustnessResult(
        n=n,
        refine_steps=s.robustness.robust_refine_steps,
        chains=s.robustness.robust_chains,
        sigma=s.robustness.robust_sigma,
        pgd_steps=s.robustness.pgd_steps,
        pgd_step_size=s.robustness.pgd_step_size or "2.5 * eps / steps",
        curves={},
    )
    g = torch.Generator(device=s.data.device).manual_seed(s.data.seed + 5)
    for norm in s.robustness.norms:
        torch.manual_seed(s.data.seed + 6)
        curve = robust_accuracy(
            clf,
            x,
            y,
            norm,
            s.robustness.eps[norm],
            s.robustness.pgd_steps,
            _pgd_step(s),
            s.data.batch_size,
            device=s.data.device,
            generator=g,
            desc=f"{m.label}: PGD {norm}",
            progress=s.display.progress,
        )
        result.curves[norm] = [[e, acc] for e, acc in curve]
    return result
