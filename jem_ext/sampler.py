"""SGLD sampling from a JEM classifier read as an energy model.

The pieces, in the order the paper's algorithm uses them:

* :class:`UniformInit`, :class:`GaussianInit`, :class:`ReplayBuffer` (defined in
  :mod:`jem_ext.replay`, re-exported here) -- where chains start: uniform noise, per-class
  Gaussians, or the persistent contrastive-divergence buffer.
* :func:`sgld_chain` -- ``n_steps`` of ``x <- x - s * dE/dx + sigma * N(0, I)`` (optionally with
  the gradient clipped and ``x`` clamped: the proximal SGLD of JEM++), with the energy
  ``E(x) = -logsumexp f(x)`` or ``E(x, y) = -f(x)[y]`` of :mod:`jem_ext.ops`; its settings as
  one :class:`ChainSpec` (defined in :mod:`jem_ext.chain` with JEM's defaults and
  :func:`run_chain`, re-exported here).
* :class:`SGLDSampler` -- buffer (or short-run init) + chain + write-back, with a state dict.

Everything that runs per step or per batch stays on the model's device and never reads a tensor
value on the host (no ``.item()``, no branching on tensor values, no CPU-side buffer), so the
chain can be captured in a CUDA graph. Random numbers come from the ``generator`` argument when
one is given: it should live on the buffer's / model's device (a CPU generator also works with a
CUDA buffer, at the cost of host-to-device copies of the random draws).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .chain import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_CLAMP,
    DEFAULT_N_STEPS,
    DEFAULT_NOISE_STD,
    DEFAULT_REINIT_PROB,
    DEFAULT_STEP_SIZE,
    PROXIMAL_GRAD_CLIP,
    Autocast,
    ChainSpec,
    run_chain,
    sample_from_noise,
    sgld_chain,
    sgld_steps_,
)
from .inits import MixedInit
from .modules import model_device
from .replay import INITS, GaussianInit, Initializer, ReplayBuffer, UniformInit, _init_from_state

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
    "INITS",
    "Initializer",
    "UniformInit",
    "GaussianInit",
    "MixedInit",
    "ReplayBuffer",
    "SGLDSampler",
    "run_chain",
    "sgld_chain",
    "sgld_steps_",
    "sample_from_noise",
]


# ---------------------------------------------------------------------- sampler


class SGLDSampler:
    """SGLD sampler with a persistent buffer (PCD, JEM) or fresh starts (short-run).

    Args:
        n_steps, step_size, noise_std, clamp, grad_clip: chain settings (see :func:`sgld_chain`);
            JEM: 20, 1.0, 0.01, None, None; proximal SGLD (JEM++): ``grad_clip`` set and
            ``clamp=(-1, 1)``, typically 5 to 10 steps.
        spec: the chain settings as one :class:`ChainSpec` (replaces the five above).
        buffer: a :class:`ReplayBuffer`, or None for short-run sampling from ``init``.
        init: initializer for short-run mode (default ``UniformInit(-1, 1)``); ignored when a
            buffer is given (the buffer has its own).
        conditional: sample from ``p(x | y)`` with ``E(x, y)``; then :meth:`sample` needs ``y``.
        sample_shape: shape of one sample; needed in short-run mode unless ``init`` knows it
            (a :class:`GaussianInit` does).

    The chain settings are the attribute ``spec``; ``n_steps``, ``step_size``, ``noise_std``,
    ``clamp`` and ``grad_clip`` read (and set) its fields. Attributes ``chain`` (a callable with
    :func:`run_chain`'s signature, e.g. a
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
        *,
        spec: ChainSpec | None = None,
    ) -> None:
        if spec is not None:
            n_steps, step_size, noise_std = spec.n_steps, spec.step_size, spec.noise_std
            clamp, grad_clip = spec.clamp, spec.grad_clip
        if n_steps < 0:
            raise ValueError(f"SGLDSampler: n_steps must be >= 0, got {n_steps}")
        if noise_std < 0:
            raise ValueError(f"SGLDSampler: noise_std must be >= 0, got {noise_std}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"SGLDSampler: grad_clip must be > 0, got {grad_clip}")
        if clamp is not None and not clamp[0] < clamp[1]:
            raise ValueError(f"SGLDSampler: clamp must be (lo, hi) with lo < hi, got {clamp}")
        self.spec = ChainSpec(
            int(n_steps),
            float(step_size),
            float(noise_std),
            clamp,
            None if grad_clip is None else float(grad_clip),
        )
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
        self.chain: Callable[..., Tensor] = run_chain
        self.autocast: Autocast | None = None

    # The chain's settings, one field of ``spec`` each (library code sets them one by one).
    n_steps = property(lambda self: self.spec.n_steps, lambda self, v: self._set(n_steps=v))
    step_size = property(lambda self: self.spec.step_size, lambda self, v: self._set(step_size=v))
    noise_std = property(lambda self: self.spec.noise_std, lambda self, v: self._set(noise_std=v))
    clamp = property(lambda self: self.spec.clamp, lambda self, v: self._set(clamp=v))
    grad_clip = property(lambda self: self.spec.grad_clip, lambda self, v: self._set(grad_clip=v))

    def _set(self, **changes: Any) -> None:
        self.spec = replace(self.spec, **changes)

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
        device = model_device(model)
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
            self.spec,
            y=y if self.conditional else None,
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
        self.spec = ChainSpec(
            int(d["n_steps"]),
            float(d["step_size"]),
            float(d["noise_std"]),
            None if d["clamp"] is None else (d["clamp"][0], d["clamp"][1]),
            None if d["grad_clip"] is None else float(d["grad_clip"]),
        )
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
