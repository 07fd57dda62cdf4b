"""SGLD sampling from a JEM classifier read as an energy model.

The pieces, in the order the paper's algorithm uses them:

* :class:`UniformInit`, :class:`GaussianInit`, :class:`ReplayBuffer` (defined in
  :mod:`jem_ext.replay`, re-exported here) -- where chains start: uniform noise, per-class
  Gaussians, or the persistent contrastive-divergence buffer.
* :func:`sgld_chain` -- ``n_steps`` of ``x <- x - s * dE/dx + sigma * N(0, I)`` (optionally with
  the gradient clipped and ``x`` clamped: the proximal SGLD of JEM++), with the energy
  ``E(x) = -logsumexp f(x)`` or ``E(x, y) = -f(x)[y]`` of :mod:`jem_ext.ops`.
* :class:`SGLDSampler` -- buffer (or short-run init) + chain + write-back, with a state dict.

Everything that runs per step or per batch stays on the model's device and never reads a tensor
value on the host (no ``.item()``, no branching on tensor values, no CPU-side buffer), so the
chain can be captured in a CUDA graph. Random numbers come from the ``generator`` argument when
one is given: it should live on the buffer's / model's device (a CPU generator also works with a
CUDA buffer, at the cost of host-to-device copies of the random draws).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .inits import MixedInit
from .replay import INITS, GaussianInit, Initializer, ReplayBuffer, UniformInit, _init_from_state

# JEM's chain (the reference code's settings for images in [-1, 1]): the one home of these
# defaults for the sampler, the evaluation and a loaded run.
DEFAULT_N_STEPS = 20
DEFAULT_STEP_SIZE = 1.0
DEFAULT_NOISE_STD = 0.01
DEFAULT_CLAMP = (-1.0, 1.0)

__all__ = [
    "INITS",
    "Initializer",
    "UniformInit",
    "GaussianInit",
    "MixedInit",
    "ReplayBuffer",
    "SGLDSampler",
    "sgld_chain",
    "sgld_steps_",
    "sample_from_noise",
]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


# ------------------------------------------------------------------------ chain


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
    if n_steps < 0:
        raise ValueError(f"sgld_chain: n_steps must be >= 0, got {n_steps}")
    if y is not None:
        y = y.to(device=x.device, dtype=torch.int64)
    was_training = model.training
    model.eval()
    x = x.detach().clone()
    try:
        sgld_steps_(
            model, x, n_steps, step_size, noise_std, y, clamp, grad_clip, generator, autocast
        )
    finally:
        model.train(was_training)
    return x


def sgld_steps_(
    model: nn.Module,
    x: Tensor,
    n_steps: int,
    step_size: float,
    noise_std: float,
    y: Tensor | None,
    clamp: tuple[float, float] | None,
    grad_clip: float | None,
    generator: torch.Generator | None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Tensor:
    """The body of :func:`sgld_chain`: ``n_steps`` SGLD steps on ``x`` in place (model mode as
    given, ``y`` already on ``x``'s device). Nothing here reads the host, so the loop can be
    captured in a CUDA graph (:mod:`jem_ext.graphs`)."""
    lo, hi = (None, None) if clamp is None else (float(clamp[0]), float(clamp[1]))
    precision = nullcontext if autocast is None else autocast
    with torch.enable_grad():
        for _ in range(n_steps):
            xg = x.detach().requires_grad_(True)
            with precision():
                e = ops.energy(model(xg), y)
            (g,) = torch.autograd.grad(e.sum(), [xg])
            with torch.no_grad():
                ops.sgld_step_(x, g.to(x.dtype), step_size, noise_std, lo, hi, grad_clip, generator)
    return x


def sample_from_noise(
    model: nn.Module,
    n: int,
    shape: Sequence[int],
    n_steps: int,
    step_size: float = DEFAULT_STEP_SIZE,
    noise_std: float = DEFAULT_NOISE_STD,
    *,
    y: Tensor | None = None,
    clamp: tuple[float, float] | None = None,
    grad_clip: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    chain: Callable[..., Tensor] | None = None,
    init: Initializer | None = None,
) -> Tensor:
    """``n`` samples from fresh SGLD chains started at U(-1, 1)^shape (or drawn from ``init``,
    e.g. a run's fitted per-class Gaussians, of class ``y`` where given); returned on the CPU.

    The one "chain from uniform noise" of the package (sample grids during training, the
    evaluation's generation task). Deterministic in ``seed`` on a given device: the starts are
    drawn on the CPU, the chains' noise from a generator on the model's device seeded with
    ``seed``. Chains run ``batch_size`` at a time; ``on_batch(k)`` is called after each batch of
    ``k`` chains (e.g. a progress bar's ``update``). With ``y`` (int64 ``[n]``), chain ``i``
    follows ``E(x, y_i)``. ``chain`` replaces :func:`sgld_chain` (e.g. a
    :class:`jem_ext.graphs.GraphedChain`). Other arguments as in :func:`sgld_chain`.
    """
    if n < 0 or batch_size < 1:
        raise ValueError(
            f"sample_from_noise: need n >= 0 and batch_size >= 1, got {n}, {batch_size}"
        )
    device = _model_device(model)
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
        run = sgld_chain if chain is None else chain
        out.append(
            run(
                model,
                xb,
                n_steps,
                step_size,
                noise_std,
                y=yb,
                clamp=clamp,
                grad_clip=grad_clip,
                generator=noise,
                autocast=autocast,
            ).cpu()
        )
        if yb is not None:  # class-conditional chains: their labels' deferred check (CUDA)
            ops.raise_label_errors(device)
        if on_batch is not None:
            on_batch(len(xb))
    return torch.cat(out) if out else x0


# ---------------------------------------------------------------------- sampler


class SGLDSampler:
    """SGLD sampler with a persistent buffer (PCD, JEM) or fresh starts (short-run).

    Args:
        n_steps, step_size, noise_std, clamp, grad_clip: chain settings (see :func:`sgld_chain`);
            JEM: 20, 1.0, 0.01, None, None; proximal SGLD (JEM++): ``grad_clip`` set and
            ``clamp=(-1, 1)``, typically 5 to 10 steps.
        buffer: a :class:`ReplayBuffer`, or None for short-run sampling from ``init``.
        init: initializer for short-run mode (default ``UniformInit(-1, 1)``); ignored when a
            buffer is given (the buffer has its own).
        conditional: sample from ``p(x | y)`` with ``E(x, y)``; then :meth:`sample` needs ``y``.
        sample_shape: shape of one sample; needed in short-run mode unless ``init`` knows it
            (a :class:`GaussianInit` does).

    Attributes ``chain`` (a callable with :func:`sgld_chain`'s signature, e.g. a
    :class:`jem_ext.graphs.GraphedChain`) and ``autocast`` (see :func:`sgld_chain`) choose how
    the chain runs; they are not part of the state dict.
    """

    def __init__(
        self,
        n_steps: int = DEFAULT_N_STEPS,
        step_size: float = DEFAULT_STEP_SIZE,
        noise_std: float = DEFAULT_NOISE_STD,
        clamp: tuple[float, float] | None = None,
        grad_clip: float | None = None,
        buffer: ReplayBuffer | None = None,
        init: Initializer | None = None,
        conditional: bool = False,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        if n_steps < 0:
            raise ValueError(f"SGLDSampler: n_steps must be >= 0, got {n_steps}")
        if noise_std < 0:
            raise ValueError(f"SGLDSampler: noise_std must be >= 0, got {noise_std}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"SGLDSampler: grad_clip must be > 0, got {grad_clip}")
        if clamp is not None and not clamp[0] < clamp[1]:
            raise ValueError(f"SGLDSampler: clamp must be (lo, hi) with lo < hi, got {clamp}")
        self.n_steps = int(n_steps)
        self.step_size = float(step_size)
        self.noise_std = float(noise_std)
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.buffer = buffer
        if buffer is not None:
            self.init = buffer.init  # the buffer re-initialises its own chains
        else:
            self.init = init if init is not None else UniformInit()
        self.conditional = bool(conditional)
        if sample_shape is None:
            if buffer is not None:
                sample_shape = buffer.sample_shape
            else:  # fitted initializers know it; uniform noise does not
                sample_shape = getattr(self.init, "sample_shape", None)
        self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        if buffer is None and self.sample_shape is None:
            raise ValueError("SGLDSampler: short-run mode (no buffer) needs sample_shape")
        # How the chain runs, not what it computes (set by jem_ext.accel): the chain
        # function (sgld_chain, or a CUDA-graph replay of it) and the autocast of its forwards.
        self.chain: Callable[..., Tensor] = sgld_chain
        self.autocast: Callable[[], AbstractContextManager[Any]] | None = None

    def sample(
        self,
        model: nn.Module,
        batch_size: int,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``batch_size`` samples ``x_q`` (detached, on the model's device).

        Chains start from the buffer (and the results are written back) or, in short-run mode,
        from ``init``. ``y`` (int64 ``[batch_size]``) is required for a conditional sampler or a
        class-split buffer.
        """
        device = _model_device(model)
        if y is not None:
            y = y.to(device)
        if self.conditional and y is None:
            raise ValueError("SGLDSampler.sample: a conditional sampler needs labels y")
        idx = None
        if self.buffer is not None:
            x0, idx = self.buffer.sample(
                batch_size, y if self.buffer.num_classes is not None else None, generator
            )
            x0 = x0.to(device)
        else:
            x0 = self.init(batch_size, self.sample_shape, y=y, generator=generator, device=device)
        x_q = self.chain(
            model,
            x0,
            self.n_steps,
            self.step_size,
            self.noise_std,
            y=y if self.conditional else None,
            clamp=self.clamp,
            grad_clip=self.grad_clip,
            generator=generator,
            autocast=self.autocast,
        )
        if self.buffer is not None:
            self.buffer.update(idx, x_q)
        return x_q

    def state_dict(self) -> dict[str, Any]:
        """Settings, buffer contents and initializer state (weights_only-safe)."""
        init_state = self.init.state_dict() if hasattr(self.init, "state_dict") else None
        return {
            "n_steps": self.n_steps,
            "step_size": self.step_size,
            "noise_std": self.noise_std,
            "clamp": None if self.clamp is None else list(self.clamp),
            "grad_clip": self.grad_clip,
            "conditional": self.conditional,
            "sample_shape": None if self.sample_shape is None else list(self.sample_shape),
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "init": init_state,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore settings, buffer and initializer from :meth:`state_dict`.

        Raises:
            ValueError: the saved state has a buffer and this sampler has none (or the other
                way round), or the buffer layouts differ.
        """
        if (d.get("buffer") is None) != (self.buffer is None):
            raise ValueError(
                "SGLDSampler.load_state_dict: saved sampler "
                + ("has" if d.get("buffer") is not None else "has no")
                + " replay buffer but this one "
                + ("has" if self.buffer is not None else "has none")
            )
        self.n_steps = int(d["n_steps"])
        self.step_size = float(d["step_size"])
        self.noise_std = float(d["noise_std"])
        self.clamp = None if d["clamp"] is None else (float(d["clamp"][0]), float(d["clamp"][1]))
        self.grad_clip = None if d["grad_clip"] is None else float(d["grad_clip"])
        self.conditional = bool(d["conditional"])
        if d.get("sample_shape") is not None:
            self.sample_shape = tuple(d["sample_shape"])
        if self.buffer is not None:
            self.buffer.load_state_dict(d["buffer"])
        init = _init_from_state(d.get("init"))
        if init is not None:
            fitted = getattr(self.init, "informative", self.init)
            if isinstance(fitted, GaussianInit):
                init.to(fitted.mean.device)
            self.init = init
            if self.buffer is not None:
                self.buffer.init = init
