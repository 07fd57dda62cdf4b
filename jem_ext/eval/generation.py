"""The sampling tasks: generation (sample grids from fresh chains and the replay buffer) and
IS / FID of the fresh samples.

Each task is a function of (model, data, settings) that returns a typed result; a result's
``to_json()`` gives its part of report.json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..ops import energy
from ..sampler import sample_from_noise
from .features import classifier_features, extract
from .inception import InceptionV3, load_inception
from .inputs import EvalData, Loaded, load_model
from .metrics import fid, inception_score
from .settings import EvalError, EvalSettings, SGLDSettings
from .speed import chain_autocast
from .tasks import logits_of, progress_bar

__all__ = [
    "FIDNetwork",
    "FIDResult",
    "GenerationResult",
    "generate",
    "grid_file",
    "prepare_fid",
    "run_fid",
    "run_generation",
]


def grid_file(kind: str, compare: bool) -> str:
    """The PNG name of a sample grid (``samples_<kind>[_compare].png``)."""
    return f"samples_{kind}{'_compare' if compare else ''}.png"


def generate(
    model: nn.Module,
    n: int,
    shape: Sequence[int],
    steps: int,
    sgld: SGLDSettings,
    settings: EvalSettings,
    y: torch.Tensor | None = None,
    seed: int = 0,
    desc: str = "SGLD",
    chain: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """``n`` samples from fresh SGLD chains started at U(-1, 1), with ``sgld``'s settings.

    With ``y``, the chains follow E(x, y) = -f(x)[y] (class-conditional samples). The forwards
    run in --precision; ``chain`` replaces the eager chain (e.g. a CUDA-graph chain).
    """
    with progress_bar(n, desc, settings.progress) as bar:
        return sample_from_noise(
            model,
            n,
            shape,
            steps,
            sgld.step_size,
            sgld.noise_std,
            y=y,
            clamp=sgld.clamp,
            grad_clip=sgld.grad_clip,
            seed=seed,
            batch_size=settings.batch_size,
            on_batch=bar.update,
            autocast=chain_autocast(settings),
            chain=chain,
        )


def _mean_logpx(logits: torch.Tensor) -> float:
    return float(-energy(logits.double()).mean())


@dataclass
class GenerationResult:
    """Fresh-chain samples (unconditional, class-conditional), buffer samples and figures."""

    steps: int
    sgld: SGLDSettings
    samples: torch.Tensor = field(repr=False)
    conditional: torch.Tensor = field(repr=False)
    per_class: int
    conditional_accuracy: float
    logpx_mean_samples: float
    logpx_mean_test: float
    buffer: torch.Tensor | None = field(default=None, repr=False)
    buffer_size: int | None = None
    is_image: bool = True

    def grids(self) -> dict[str, tuple[torch.Tensor, int | None]]:
        """Sample grids to draw, by kind: (samples, images per row or None)."""
        if not self.is_image:
            return {}
        out = {"uncond": (self.samples, None), "cond": (self.conditional, self.per_class)}
        if self.buffer is not None:
            out["buffer"] = (self.buffer, None)
        return out

    def to_json(self, compare: bool = False) -> dict[str, Any]:
        g = self.sgld
        out: dict[str, Any] = {
            "steps": self.steps,
            "n_unconditional": len(self.samples),
            "n_conditional": len(self.conditional),
            "step_size": g.step_size,
            "noise_std": g.noise_std,
            "clamp": list(g.clamp),
            "grad_clip": g.grad_clip,
            "init": "uniform(-1, 1)",
            "conditional_accuracy": self.conditional_accuracy,
            "logpx_mean_samples": self.logpx_mean_samples,
            "logpx_mean_test": self.logpx_mean_test,
            "files": {kind: grid_file(kind, compare) for kind in self.grids()},
        }
        if self.buffer_size is not None:
            out["buffer_size"] = self.buffer_size
        else:
            out["buffer"] = "the checkpoint holds no replay buffer (short-run sampler or CE model)"
        if not self.is_image:
            out["files_note"] = (
                f"no grids: samples of shape {tuple(self.samples.shape[1:])} are not images"
            )
        return {"generation": out}


def _buffer_pick(m: Loaded, n: int, seed: int) -> torch.Tensor | None:
    buf = m.buffer_samples()
    if buf is None:
        return None
    pick = torch.randperm(len(buf), generator=torch.Generator().manual_seed(seed))[:n]
    return buf[pick].float().cpu()


def run_generation(
    m: Loaded,
    data: EvalData,
    settings: EvalSettings,
    sgld: SGLDSettings,
    test_logits: torch.Tensor,
    chain: Callable[..., torch.Tensor] | None = None,
) -> GenerationResult:
    """Fresh unconditional and class-conditional chains, and a pick of the replay buffer."""
    s = settings
    fresh = generate(
        m.model,
        s.gen_n,
        m.in_shape,
        s.gen_steps,
        sgld,
        s,
        seed=s.seed + 2,
        desc=f"{m.label}: SGLD unconditional",
        chain=chain,
    )
    per = max(1, s.gen_n // m.num_classes)
    y = torch.arange(m.num_classes).repeat_interleave(per)
    cond = generate(
        m.model,
        len(y),
        m.in_shape,
        s.gen_steps,
        sgld,
        s,
        y=y,
        seed=s.seed + 3,
        desc=f"{m.label}: SGLD conditional",
        chain=chain,
    )
    cond_logits = logits_of(m.model, cond, s, "conditional samples", progress=False)
    fresh_logits = logits_of(m.model, fresh, s, "samples", progress=False)
    buffer = _buffer_pick(m, s.gen_n, s.seed + 4)
    return GenerationResult(
        steps=s.gen_steps,
        sgld=sgld,
        samples=fresh,
        conditional=cond,
        per_class=per,
        # Fraction of class-conditional samples that the model classifies as their class.
        conditional_accuracy=float((cond_logits.argmax(1) == y).double().mean()),
        logpx_mean_samples=_mean_logpx(fresh_logits),
        logpx_mean_test=_mean_logpx(test_logits),
        buffer=buffer,
        buffer_size=None if buffer is None else len(m.buffer_samples()),
        is_image=m.is_image,
    )


# ------------------------------------------------------------------------------- IS / FID


@dataclass
class FIDNetwork:
    """The network IS and FID are measured with, and its features of the test images."""

    kind: str  # "inception" or "classifier"
    features: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    note: str
    test_features: np.ndarray | None = None

    def of(self, x: torch.Tensor, settings: EvalSettings, desc: str) -> tuple[np.ndarray, ...]:
        return extract(
            self.features, x, settings.batch_size, settings.device, desc, settings.progress
        )

    def of_test(self, data: EvalData, settings: EvalSettings) -> np.ndarray:
        """Features of the test images, computed once and shared by both models."""
        if self.test_features is None:
            self.test_features = self.of(data.x, settings, "features test")[0]
        return self.test_features


def _inception_features(net: InceptionV3):
    def features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, _ = net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
        return feats, torch.softmax(net.score_logits(feats).double(), 1)

    return features


def prepare_fid(settings: EvalSettings, main: Loaded) -> tuple[FIDNetwork | None, str | None]:
    """The IS/FID network from --inception-weights or --fid-classifier, or the skip reason."""
    if settings.inception_weights:
        if not main.is_image:
            raise EvalError(f"--inception-weights: samples of shape {main.in_shape} are not images")
        try:
            net = load_inception(settings.inception_weights, settings.device)
        except ValueError as err:
            raise EvalError(f"--inception-weights: {err}") from None
        return FIDNetwork(
            "inception",
            _inception_features(net),
            "FID Inception-v3 (pool3 features; IS from the 1008-way logits "
            "without the fc bias, as the original IS code)",
        ), None
    if settings.fid_classifier:
        clf = load_model(settings.fid_classifier, settings.device, "--fid-classifier")
        if clf.in_shape != main.in_shape:
            raise EvalError(
                f"--fid-classifier {clf.path}: its model takes {clf.in_shape}, "
                f"the evaluated model {main.in_shape}"
            )
        return FIDNetwork(
            "classifier",
            lambda x: classifier_features(clf.model, x),
            f"features of classifier {clf.path}: NOT comparable with published "
            "Inception-based figures",
        ), None
    return None, (
        "no --inception-weights (FID Inception-v3 state_dict) and no "
        "--fid-classifier given; nothing is downloaded at run time"
    )


@dataclass
class FIDResult:
    """IS of the fresh samples and FID between them and the test images (or why skipped)."""

    skipped: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"fid": {"skipped": self.skipped} if self.skipped else dict(self.figures)}


def run_fid(
    m: Loaded, data: EvalData, settings: EvalSettings, net: FIDNetwork, samples: torch.Tensor
) -> FIDResult:
    """IS of ``samples`` (fresh-chain samples) and their FID against the test images."""
    f_gen, p_gen = net.of(samples, settings, f"{m.label}: features gen")
    f_test = net.of_test(data, settings)
    splits = min(10, len(samples))
    is_mean, is_std = inception_score(p_gen, splits=splits)
    out = {
        "network": net.kind,
        "note": net.note,
        "n_generated": len(samples),
        "n_test": len(data.x),
        "feature_dim": int(f_gen.shape[1]),
        "fid": fid(f_gen, f_test),
        "is_mean": is_mean,
        "is_std": is_std,
        "is_splits": splits,
        "comparable_with_published": net.kind == "inception",
    }
    if min(len(samples), len(data.x)) <= f_gen.shape[1]:
        out["warning"] = (
            f"fewer samples than feature dimensions ({f_gen.shape[1]}): the "
            "covariances are singular and the FID is unreliable (use more "
            "--gen-n and test images)"
        )
    return FIDResult(figures=out)
