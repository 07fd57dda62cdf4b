"""The generation task: fresh chains (unconditional and class-conditional, judged by a second
classifier with --judge) and sample grids of them and of the replay buffer. IS / FID of the
samples: :mod:`jem_ext.eval.fid`.

Each task is a function of (model, data, settings) that returns a typed result; a result's
``to_json()`` gives its part of report.json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..ops import energy
from ..sampler import GaussianInit, Initializer, _init_from_state, sample_from_noise
from .inputs import EvalData, Loaded, load_model
from .settings import EvalError, EvalSettings, SGLDSettings
from .speed import chain_autocast
from .tasks import logits_of, progress_bar

__all__ = [
    "GenerationResult",
    "buffer_pick",
    "chain_init",
    "generate",
    "grid_file",
    "load_judge",
    "run_generation",
]


GRID_MAX = 100  # samples drawn in a grid (the figures use every sample)
GRID_PER_CLASS = 10  # rows of the class-conditional grid are classes, this many samples each


def grid_file(kind: str, compare: bool) -> str:
    """The PNG name of a sample grid (``samples_<kind>[_compare].png``)."""
    return f"samples_{kind}{'_compare' if compare else ''}.png"


def chain_init(m: Loaded, kind: str) -> Initializer | None:
    """Where the fresh chains of ``m`` start: None for U(-1, 1) (``kind`` "uniform"), or the
    per-class Gaussians its run fitted to the training data (``kind`` "gaussian", JEM++'s
    informative init, saved with its sampler).

    Raises:
        EvalError: "gaussian" for a checkpoint whose chains start from uniform noise only.
    """
    if kind == "uniform":
        return None
    saved = _init_from_state((m.state.get("sampler") or {}).get("init"))
    fitted = getattr(saved, "informative", saved)
    if not isinstance(fitted, GaussianInit):
        raise EvalError(
            f"--gen-init gaussian: {m.path} holds no fitted per-class Gaussians (its run "
            "used --init uniform or trained no sampler); use --gen-init uniform"
        )
    return fitted.to("cpu")


def _init_name(kind: str) -> str:
    return "uniform(-1, 1)" if kind == "uniform" else "per-class Gaussians of the run"


def load_judge(settings: EvalSettings, main: Loaded) -> Loaded | None:
    """The --judge classifier, checked to take the evaluated model's inputs and classes."""
    if settings.generation.judge is None:
        return None
    judge = load_model(settings.generation.judge, settings.data.device, "--judge")
    if judge.in_shape != main.in_shape or judge.num_classes != main.num_classes:
        raise EvalError(
            f"--judge {judge.path}: its model takes {judge.in_shape} with "
            f"{judge.num_classes} classes, the evaluated model {main.in_shape} with "
            f"{main.num_classes}"
        )
    return judge


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
    init: Initializer | None = None,
) -> torch.Tensor:
    """``n`` samples from fresh SGLD chains started at U(-1, 1) (or drawn from ``init``), with
    ``sgld``'s settings.

    With ``y``, the chains follow E(x, y) = -f(x)[y] (class-conditional samples). The forwards
    run in --precision; ``chain`` replaces the eager chain (e.g. a CUDA-graph chain).
    """
    with progress_bar(n, desc, settings.display.progress) as bar:
        return sample_from_noise(
            model,
            n,
            shape,
            spec=sgld.with_steps(steps),
            y=y,
            seed=seed,
            batch_size=settings.data.batch_size,
            on_batch=bar.update,
            autocast=chain_autocast(settings),
            chain=chain,
            init=init,
        )


def _mean_logpx(logits: torch.Tensor) -> float:
    return float(-energy(logits.double()).mean())


@dataclass
class JudgeRates:
    """How often a second classifier (--judge) classifies the class-conditional samples as
    their class: a JEM's own classifier is easy to satisfy (its chains climb its own logit),
    an independent one is not. ``start`` rates are of the chains' starting points."""

    path: str
    conditional: float
    start: float
    own_start: float

    def to_json(self) -> dict[str, Any]:
        return {
            "judge": self.path,
            "judge_conditional_accuracy": self.conditional,
            "judge_start_accuracy": self.start,
            "conditional_start_accuracy": self.own_start,
        }


def _class_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: EvalSettings) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    logits = logits_of(model, x, s, "judged samples", progress=False)
    return float((logits.argmax(1) == y).double().mean())


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
    init: str = "uniform"
    judged: JudgeRates | None = None

    def grids(self) -> dict[str, tuple[torch.Tensor, int | None]]:
        """Sample grids to draw, by kind: (samples, images per row or None). A grid shows at
        most ``GRID_MAX`` samples (``GRID_PER_CLASS`` a class for the conditional one); the
        figures use them all."""
        if not self.is_image:
            return {}
        per = min(self.per_class, GRID_PER_CLASS)
        classes = len(self.conditional) // self.per_class
        cond = self.conditional.view(classes, self.per_class, *self.conditional.shape[1:])
        out = {
            "uncond": (self.samples[:GRID_MAX], None),
            "cond": (cond[:, :per].flatten(0, 1), per),
        }
        if self.buffer is not None:
            out["buffer"] = (self.buffer[:GRID_MAX], None)
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
            "init": _init_name(self.init),
            "conditional_accuracy": self.conditional_accuracy,
            "logpx_mean_samples": self.logpx_mean_samples,
            "logpx_mean_test": self.logpx_mean_test,
            "files": {kind: grid_file(kind, compare) for kind in self.grids()},
        }
        if self.judged is not None:
            out.update(self.judged.to_json())
        if self.buffer_size is not None:
            out["buffer_size"] = self.buffer_size
        else:
            out["buffer"] = "the checkpoint holds no replay buffer (short-run sampler or CE model)"
        if not self.is_image:
            out["files_note"] = (
                f"no grids: samples of shape {tuple(self.samples.shape[1:])} are not images"
            )
        return {"generation": out}


def buffer_pick(m: Loaded, n: int, seed: int) -> torch.Tensor | None:
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
    judge: Loaded | None = None,
) -> GenerationResult:
    """Fresh unconditional and class-conditional chains, and a pick of the replay buffer; with
    ``judge``, its rate of the conditional samples (and of their starts) as their class."""
    s = settings
    init = chain_init(m, s.generation.gen_init)
    fresh = generate(
        m.model,
        s.generation.gen_n,
        m.in_shape,
        s.generation.gen_steps,
        sgld,
        s,
        seed=s.data.seed + 2,
        desc=f"{m.label}: SGLD unconditional",
        chain=chain,
        init=init,
    )
    per = max(1, s.generation.gen_n // m.num_classes)
    y = torch.arange(m.num_classes).repeat_interleave(per)
    cond = generate(
        m.model,
        len(y),
        m.in_shape,
        s.generation.gen_steps,
        sgld,
        s,
        y=y,
        seed=s.data.seed + 3,
        desc=f"{m.label}: SGLD conditional",
        chain=chain,
        init=init,
    )
    judged = None
    if judge is not None:  # the same chains' starts: zero steps from the same seed
        starts = generate(
            m.model, len(y), m.in_shape, 0, sgld, s, y=y, seed=s.data.seed + 3, init=init
        )
        judged = JudgeRates(
            path=str(judge.path),
            conditional=_class_rate(judge.model, cond, y, s),
            start=_class_rate(judge.model, starts, y, s),
            own_start=_class_rate(m.model, starts, y, s),
        )
    cond_logits = logits_of(m.model, cond, s, "conditional samples", progress=False)
    fresh_logits = logits_of(m.model, fresh, s, "samples", progress=False)
    buffer = buffer_pick(m, s.generation.gen_n, s.data.seed + 4)
    return GenerationResult(
        steps=s.generation.gen_steps,
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
        init=s.generation.gen_init,
        judged=judged,
    )
