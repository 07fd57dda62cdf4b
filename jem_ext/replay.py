"""Where SGLD chains start: the persistent replay buffer (the initialisers live in
:mod:`jem_ext.inits` and are re-exported here).

* :class:`UniformInit`, :class:`GaussianInit` -- uniform noise on ``[-1, 1]^D`` (JEM) or
  per-class Gaussians fitted to the data ("informative" init, JEM++).
* :class:`ReplayBuffer` -- the persistent contrastive-divergence buffer: chains start from
  stored samples, a fraction ``reinit_prob`` of them re-initialised each time; optionally split
  into one sub-buffer per class for class-conditional sampling.

Nothing here reads a tensor value on the host. Random numbers come from the ``generator``
argument when one is given (see :mod:`jem_ext.sampler`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .chain import DEFAULT_REINIT_PROB
from .inits import INITS, GaussianInit, Initializer, UniformInit, _rand, _randint
from .inits import _init_from_state as _init_from_state  # re-exported for the sampler

__all__ = ["INITS", "Initializer", "UniformInit", "GaussianInit", "ReplayBuffer"]

# ----------------------------------------------------------------------- buffer


class ReplayBuffer:
    """Persistent SGLD replay buffer living on ``device``.

    Args:
        size: number of stored samples. With ``num_classes`` the buffer is split into
            ``size // num_classes`` rows per class (class ``k`` owns rows
            ``[k * per_class, (k + 1) * per_class)``), so ``.data`` has
            ``per_class * num_classes`` rows.
        sample_shape: shape of one sample, e.g. ``(3, 32, 32)``.
        num_classes: split the buffer by class (for class-conditional sampling), or None.
        device: where the samples live (the model's device).
        reinit_prob: probability that a drawn chain restarts from ``init`` instead.
        init: an initializer (default ``UniformInit(-1, 1)``); also fills the buffer at start.
        generator: optional generator for the initial fill.
    """

    def __init__(
        self,
        size: int,
        sample_shape: Sequence[int],
        num_classes: int | None = None,
        device: Any = "cpu",
        reinit_prob: float = DEFAULT_REINIT_PROB,
        init: Initializer | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"ReplayBuffer: num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"ReplayBuffer: reinit_prob must lie in [0, 1], got {reinit_prob}")
        per = size // num_classes if num_classes else size
        if per < 1:
            raise ValueError(
                f"ReplayBuffer: size {size} too small"
                + (f" for {num_classes} classes" if num_classes else "")
            )
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.num_classes = num_classes
        self.per_class = per
        self.size = per * (num_classes or 1)
        self.device = torch.device(device)
        self.reinit_prob = float(reinit_prob)
        self.init = UniformInit() if init is None else init
        labels = self.labels
        self.data = self.init(
            self.size, self.sample_shape, y=labels, generator=generator, device=self.device
        ).to(self.device, torch.float32)

    @property
    def labels(self) -> Tensor | None:
        """Class of each row ``[size]`` (int64), or None for an unconditional buffer."""
        if self.num_classes is None:
            return None
        return torch.arange(self.num_classes, device=self.device).repeat_interleave(self.per_class)

    def sample(
        self,
        batch_size: int,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``batch_size`` chain starts; returns ``(x0, idx)``.

        Rows are drawn uniformly (from class ``y[b]``'s slice for a split buffer, where ``y`` is
        required); each row independently restarts from ``init`` with probability
        ``reinit_prob``. ``x0`` is a fresh tensor; pass ``idx`` to :meth:`update`.
        """
        if self.num_classes is not None:
            if y is None:
                raise ValueError("ReplayBuffer.sample: a class-split buffer needs labels y")
            y = y.to(self.device, torch.int64)
            if y.shape != (batch_size,):
                raise ValueError(
                    f"ReplayBuffer.sample: y must have shape [{batch_size}], got {tuple(y.shape)}"
                )
            idx = y * self.per_class + _randint(
                self.per_class, (batch_size,), generator, self.device
            )
        else:
            idx = _randint(self.size, (batch_size,), generator, self.device)
        x0 = self.data[idx]
        if self.reinit_prob > 0:
            fresh = self.init(
                batch_size, self.sample_shape, y=y, generator=generator, device=self.device
            ).to(x0.dtype)
            mask = _rand((batch_size,), generator, self.device) < self.reinit_prob
            x0 = torch.where(mask.view(-1, *([1] * len(self.sample_shape))), fresh, x0)
        return x0, idx

    def update(self, idx: Tensor, x: Tensor) -> None:
        """Write samples ``x`` back to rows ``idx`` (no host sync)."""
        self.data[idx.to(self.device)] = x.detach().to(self.device, self.data.dtype)

    def state_dict(self) -> dict[str, Any]:
        """``{"data", "num_classes", "per_class", "reinit_prob"}`` (weights_only-safe)."""
        return {
            "data": self.data.detach().cpu().clone(),
            "num_classes": self.num_classes,
            "per_class": self.per_class,
            "reinit_prob": self.reinit_prob,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore samples saved by :meth:`state_dict`; the layout must match.

        Raises:
            ValueError: different shape or class split.
        """
        data = d["data"]
        if tuple(data.shape) != tuple(self.data.shape) or d.get("num_classes") != self.num_classes:
            raise ValueError(
                f"ReplayBuffer.load_state_dict: saved buffer {tuple(data.shape)} with "
                f"num_classes={d.get('num_classes')} does not match {tuple(self.data.shape)} "
                f"with num_classes={self.num_classes}"
            )
        self.data.copy_(data.to(self.device))
        self.reinit_prob = float(d.get("reinit_prob", self.reinit_prob))

    def __len__(self) -> int:
        return self.size
