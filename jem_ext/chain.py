"""The SGLD chain of a JEM classifier read as an energy model, and its settings.

* :class:`ChainSpec` -- a chain's settings as one value (steps, step size, noise, clamp,
  gradient clip); the trainer, the CUDA-graph chain, the evaluation and a loaded run pass it
  around. JEM's defaults (:data:`DEFAULT_N_STEPS` and the rest) are written here and nowhere
  else.
* :func:`run_chain` -- the chain every caller runs: ``n_steps`` of
  ``x <- x - s * dE/dx + sigma * N(0, I)`` (optionally with the gradient clipped and ``x``
  clamped: the proximal SGLD of JEM++), with the energy ``E(x) = -logsumexp f(x)`` or
  ``E(x, y) = -f(x)[y]`` of :mod:`jem_ext.ops`; :func:`sgld_chain` is its keyword form for
  library users, :func:`sgld_steps_` its in-place body (what a CUDA graph captures).
* :func:`sample_from_noise` -- fresh chains from uniform noise (sample grids, generation).

Nothing here reads a tensor value on the host, so the chain can be captured in a CUDA graph.
:mod:`jem_ext.sampler` re-exports every name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .modules import eval_mode, model_device

# JEM's chain (the reference code's settings for images in [-1, 1]): the one home of these
# defaults for the sampler, the evaluation and a loaded run.
DEFAULT_N_STEPS = 20
DEFAULT_STEP_SIZE = 1.0
DEFAULT_NOISE_STD = 0.01
DEFAULT_CLAMP = (-1.0, 1.0)  # the data range; proximal SGLD clamps samples to it
PROXIMAL_GRAD_CLIP = 0.03  # JEM++'s element-wise clip of dE/dx when proximal SGLD names none
DEFAULT_BUFFER_SIZE = 10000  # chains the replay buffer keeps between iterations
DEFAULT_REINIT_PROB = 0.05  # fraction of drawn chains restarted from the init (reinit_freq)

Autocast = Callable[[], AbstractContextManager[Any]]

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_CLAMP",
    "DEFAULT_NOISE_STD",
    "DEFAULT_N_STEPS",
    "DEFAULT_REINIT_PROB",
    "DEFAULT_STEP_SIZE",
    "PROXIMAL_GRAD_CLIP",
    "Autocast",
    "ChainSpec",
    "run_chain",
    "sample_from_noise",
    "sgld_chain",
    "sgld_steps_",
]


# ------------------------------------------------------------------------ chain


@dataclass(frozen=True)
class ChainSpec:
    """The settings of an SGLD chain (JEM's by default; see :func:`sgld_chain`).

    Attributes:
        n_steps: number of steps.
        step_size: ``s`` in ``x - s * dE/dx``.
        noise_std: standard deviation of the added Gaussian noise.
        clamp: ``(lo, hi)`` bounds applied after each step, or None.
        grad_clip: clip ``dE/dx`` element-wise to ``[-grad_clip, grad_clip]``, or None.
    """

    n_steps: int = DEFAULT_N_STEPS
    step_size: float = DEFAULT_STEP_SIZE
    noise_std: float = DEFAULT_NOISE_STD
    clamp: tuple[float, float] | None = None
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.clamp is not None:  # any pair of numbers, kept as a hashable float pair
            object.__setattr__(self, "clamp", (float(self.clamp[0]), float(self.clamp[1])))

    @classmethod
    def of(
        cls,
        steps: int,
        step_size: float,
        noise_std: float,
        proximal: bool = False,
        grad_clip: float | None = None,
    ) -> ChainSpec:
        """A chain with JEM++'s proximal SGLD when ``proximal``: samples clamped to
        :data:`DEFAULT_CLAMP`, the gradient clipped to ``grad_clip`` (default
        :data:`PROXIMAL_GRAD_CLIP`)."""
        if proximal and grad_clip is None:
            grad_clip = PROXIMAL_GRAD_CLIP
        clamp = DEFAULT_CLAMP if proximal else None
        return cls(steps, step_size, noise_std, clamp, grad_clip)

    def with_steps(self, steps: int) -> ChainSpec:
        """The same chain with another number of steps."""
        return replace(self, n_steps=steps)


def sgld_chain(
    model: nn.Module,
    x: Tensor,
    n_steps: int,
    step_size: float = DEFAULT_STEP_SIZE,
    noise_std: float = DEFAULT_NOISE_STD,
    y: Tensor | None = None,
    clamp: tuple[float, float] | None = None,
    grad_clip: float | None = None,
    generator: torch.Generator | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Tensor:
    """Run ``n_steps`` SGLD steps on the energy of ``model`` from ``x``; returns a detached tensor.

    Each step: ``E = ops.energy(model(x), y)``, ``g = dE/dx`` by ``torch.autograd.grad`` (no
    parameter ``.grad`` is touched, no graph retained), then
    ``ops.sgld_step_(x, g, step_size, noise_std, *clamp, grad_clip, generator)``. ``x`` itself is
    not modified (the chain runs on a copy). The model is in eval mode during the chain and its
    previous mode is restored afterwards. The loop never reads tensor values on the host.

    Args:
        model: maps ``[B, *shape]`` to logits ``[B, C]``.
        x: chain starts.
        n_steps: number of steps (0 returns a copy of ``x``).
        step_size: ``s`` in ``x - s * dE/dx``.
        noise_std: standard deviation of the added Gaussian noise.
        y: int64 ``[B]`` labels for the class-conditional energy ``E(x, y) = -f(x)[y]``.
            A label out of range raises on the CPU; on CUDA its chain turns NaN and
            :func:`jem_ext.ops.raise_label_errors` raises later (the chain never syncs).
        clamp: ``(lo, hi)`` bounds applied after each step, or None.
        grad_clip: clip ``dE/dx`` element-wise to ``[-grad_clip, grad_clip]``, or None.
        generator: generator for the noise (on ``x``'s device).
        autocast: returns the context manager the forward and input-gradient run in (mixed
            precision); the chain state ``x`` keeps its dtype. None: full precision.
    """
    spec = ChainSpec(n_steps, step_size, noise_std, clamp, grad_clip)
    return run_chain(model, x, spec, y=y, generator=generator, autocast=autocast)


def run_chain(
    model: nn.Module,
    x: Tensor,
    spec: ChainSpec,
    *,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    autocast: Autocast | None = None,
) -> Tensor:
    """The chain ``spec`` from ``x`` (see :func:`sgld_chain`); returns a detached tensor.

    This is the signature of every chain function (``SGLDSampler.chain``,
    :class:`jem_ext.graphs.GraphedChain`, ``sample_from_noise``'s ``chain``).
    """
    if spec.n_steps < 0:
        raise ValueError(f"sgld_chain: n_steps must be >= 0, got {spec.n_steps}")
    if y is not None:
        y = y.to(device=x.device, dtype=torch.int64)
    x = x.detach().clone()
    with eval_mode(model):
        sgld_steps_(model, x, spec, y, generator, autocast)
    return x


def sgld_steps_(
    model: nn.Module,
    x: Tensor,
    spec: ChainSpec,
    y: Tensor | None,
    generator: torch.Generator | None,
    autocast: Autocast | None = None,
) -> Tensor:
    """The body of :func:`run_chain`: the chain's steps on ``x`` in place (model mode as
    given, ``y`` already on ``x``'s device). Nothing here reads the host, so the loop can be
    captured in a CUDA graph (:mod:`jem_ext.graphs`)."""
    lo, hi = (None, None) if spec.clamp is None else spec.clamp
    precision = nullcontext if autocast is None else autocast
    with torch.enable_grad():
        for _ in range(spec.n_steps):
            xg = x.detach().requires_grad_(True)
            with precision():
                e = ops.energy(model(xg), y)
            (g,) = torch.autograd.grad(e.sum(), [xg])
            with torch.no_grad():
                ops.sgld_step_(
                    x,
                    g.to(x.dtype),
                    spec.step_size,
                    spec.noise_std,
                    lo,
                    hi,
                    spec.grad_clip,
                    generator,
                )
    return x


def sample_from_noise(
    model: nn.Module,
    n: int,
    shape: Sequence[int],
    n_steps: int | None = None,
    step_size: float = DEFAULT_STEP_SIZE,
    noise_std: float = DEFAULT_NOISE_STD,
    *,
    spec: ChainSpec | None = None,
    y: Tensor | None = None,
    clamp: tuple[float, float] | None = None,
    grad_clip: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    chain: Callable[..., Tensor] | None = None,
    init: Callable[..., Tensor] | None = None,
) -> Tensor:
    """``n`` samples from fresh SGLD chains started at U(-1, 1)^shape (or drawn from ``init``,
    an initializer of :mod:`jem_ext.inits` such as a run's fitted per-class Gaussians, of class
    ``y`` where given); returned on the CPU.

    The one "chain from uniform noise" of the package (sample grids during training, the
    evaluation's generation task). Deterministic in ``seed`` on a given device: the starts are
    drawn on the CPU, the chains' noise from a generator on the model's device seeded with
    ``seed``. Chains run ``batch_size`` at a time; ``on_batch(k)`` is called after each batch of
    ``k`` chains (e.g. a progress bar's ``update``). With ``y`` (int64 ``[n]``), chain ``i``
    follows ``E(x, y_i)``. ``chain`` replaces :func:`run_chain` (e.g. a
    :class:`jem_ext.graphs.GraphedChain`). The chain is ``spec``, or else the one the keyword
    arguments describe (as in :func:`sgld_chain`; ``n_steps`` is then required).
    """
    if spec is None:
        if n_steps is None:
            raise ValueError("sample_from_noise: give n_steps or spec")
        spec = ChainSpec(n_steps, step_size, noise_std, clamp, grad_clip)
    if n < 0 or batch_size < 1:
        raise ValueError(
            f"sample_from_noise: need n >= 0 and batch_size >= 1, got {n}, {batch_size}"
        )
    device = model_device(model)
    starts = torch.Generator().manual_seed(seed)
    if init is None:
        x0 = torch.rand((n, *shape), generator=starts) * 2 - 1
    else:
        x0 = init(n, shape, y=y, generator=starts, device="cpu")
    noise = torch.Generator(device=device).manual_seed(seed)
    out = []
    for s in range(0, n, batch_size):
        yb = None if y is None else y[s : s + batch_size].to(device)
        xb = x0[s : s + batch_size].to(device)
        run = run_chain if chain is None else chain
        out.append(run(model, xb, spec, y=yb, generator=noise, autocast=autocast).cpu())
        if yb is not None:  # class-conditional chains: their labels' deferred check (CUDA)
            ops.raise_label_errors(device)
        if on_batch is not None:
            on_batch(len(xb))
    return torch.cat(out) if out else x0
