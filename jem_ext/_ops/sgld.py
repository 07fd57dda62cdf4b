"""``sgld_step_`` and ``sgld_step_philox_``: the SGLD op's Python face and its argument checks.

The scalar arguments are checked here (their types: a real number, an int) before the op
checks their values, so a wrong type raises a TypeError naming the argument.
"""

from __future__ import annotations

import numbers
import operator

import numpy as np
import torch
from torch import Tensor

__all__ = ["sgld_step_", "sgld_step_philox_"]

_ops = torch.ops.jem_ext


def sgld_step_(
    x: Tensor,
    grad: Tensor,
    step_size: float,
    noise_std: float,
    clamp_min: float | None = None,
    clamp_max: float | None = None,
    grad_clip: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""One SGLD step on ``x``, in place; returns ``x``.

    .. math::
        x \leftarrow \mathrm{clamp}\big(x - s\,\mathrm{clip}(g, -c, c) + \sigma\,\xi\big),
        \qquad \xi \sim \mathcal N(0, I)

    ``grad`` is :math:`\partial E/\partial x`, so the step descends the
    energy. Both parameterisations in use map onto it:

    * the paper's Langevin form :math:`x - \frac{\alpha}{2}\nabla_x E + \mathcal N(0, \alpha)`:
      ``sgld_step_(x, dE_dx, step_size=alpha / 2, noise_std=alpha ** 0.5)``;
    * the JEM reference code (step 1 on :math:`\nabla_x \mathrm{LSE} f(x)`, noise 0.01):
      with ``E = energy(f(x))`` (so ``dE/dx = -d LSE/dx``),
      ``sgld_step_(x, dE_dx, step_size=1.0, noise_std=0.01)``.

    Args:
        x: float32, float16, bfloat16 or float64 tensor, any shape or layout
            (half types compute in float32). Updated in place.
        grad: :math:`\partial E/\partial x`, same shape, dtype and device as ``x``.
        step_size: :math:`s`, a finite real number (a Python or NumPy number
            or a 0-dim tensor; not a bool or a string: those raise a TypeError).
        noise_std: :math:`\sigma \ge 0`, finite (0 gives plain gradient descent).
        clamp_min, clamp_max: optional bounds applied after the update
            (``-1, 1`` for images in [-1, 1]; the proximal SGLD of JEM++).
        grad_clip: optional :math:`c`: the gradient is clipped to ``[-c, c]``
            element-wise before the step.
        generator: torch Generator for the noise (the device's default when
            ``None``). The same generator state gives the same result;
            consecutive calls draw fresh noise. On CUDA the numbers come
            from the generator's ``philox_cuda_state``, so the op can be
            captured in a CUDA graph.

    The op is not differentiable: call it under ``torch.no_grad()`` with a
    detached ``grad`` (it raises otherwise, and it raises on forward-mode dual
    tensors and under ``torch.func`` transforms).
    """
    _ops.sgld_step_.default(
        x,
        grad,
        *_sgld_scalars("sgld_step_", step_size, noise_std, clamp_min, clamp_max, grad_clip),
        generator,
    )
    return x


def sgld_step_philox_(
    x: Tensor,
    grad: Tensor,
    step_size: float,
    noise_std: float,
    seed: int,
    offset: int = 0,
    clamp_min: float | None = None,
    clamp_max: float | None = None,
    grad_clip: float | None = None,
) -> Tensor:
    """:func:`sgld_step_` with the noise of an explicit Philox ``(seed, offset)``.

    Element ``i`` (row-major order) gets normal ``i % 4`` of Philox4x32-10
    block ``{counter: (offset // 4, i // 4), key: seed}`` via Box-Muller, the
    same numbers on every device: the reproducibility hook for tests and for
    comparing CPU with CUDA. ``seed`` is in ``[0, 2**64)``; ``offset`` is a
    multiple of 4 in ``[0, 2**63)``.
    """
    op = "sgld_step_philox_"
    _ops._sgld_step_philox_.default(
        x,
        grad,
        *_sgld_scalars(op, step_size, noise_std, clamp_min, clamp_max, grad_clip),
        _seed_as_int64(_integer(op, "seed", seed)),
        _offset_as_int64(_integer(op, "offset", offset)),
    )
    return x


def _real(op: str, name: str, value, optional: bool = False) -> float | None:
    """A scalar argument as a float, refusing what is not a real number.

    Accepts what torch's own ops accept for a float argument (Python and
    NumPy ints and floats, 0-dim real tensors), except bools: a step size of
    ``True`` is a mistake, not the number 1. Strings, complex numbers and
    tensors with dimensions raise a TypeError naming the argument.
    """
    if value is None and optional:
        return None
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool:
            return float(value.item())
        what = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    else:
        what = f"{type(value).__name__} {value!r}"
    kind = "a real number or None" if optional else "a real number"
    raise TypeError(f"{op}: {name} must be {kind}, got {what}")


def _sgld_scalars(op: str, step_size, noise_std, clamp_min, clamp_max, grad_clip) -> tuple:
    """The op's float arguments as floats, each a real number (or None where
    optional). Their values (finite step_size and noise_std, no NaN bounds)
    are the op's own checks."""
    return (
        _real(op, "step_size", step_size),
        _real(op, "noise_std", noise_std),
        _real(op, "clamp_min", clamp_min, optional=True),
        _real(op, "clamp_max", clamp_max, optional=True),
        _real(op, "grad_clip", grad_clip, optional=True),
    )


def _integer(op: str, name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


_UINT64_END = 2**64
_INT64_END = 2**63


def _seed_as_int64(seed: int) -> int:
    """The 64-bit seed in [0, 2**64) as the op's signed int64 (same bits)."""
    seed = operator.index(seed)
    if not 0 <= seed < _UINT64_END:
        raise ValueError(f"sgld_step_philox_: seed must be in [0, 2**64 - 1], got {seed}")
    return seed - _UINT64_END if seed >= _INT64_END else seed


def _offset_as_int64(offset: int) -> int:
    offset = operator.index(offset)
    if not (0 <= offset < _INT64_END and offset % 4 == 0):
        raise ValueError(
            f"sgld_step_philox_: offset must be a multiple of 4 in [0, 2**63 - 4], got {offset}"
        )
    return offset
