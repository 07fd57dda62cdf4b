"""The two fused ops of jem_ext, as torch ops with a documented Python face.

* :func:`sgld_step_`: one in-place SGLD update with Gaussian noise drawn
  inside the kernel (counter-based Philox, seeded from a torch Generator).
* :func:`energy` / :func:`energy_ce`: the JEM energy ``-logsumexp(logits)``
  (or ``-logits[y]``), and the energy together with the per-sample
  cross-entropy from one pass over the logits.

The kernels live in ``csrc/`` and are registered as ``torch.ops.jem_ext.*``
when :mod:`jem_ext._C` loads; this module adds what PyTorch needs around
them: fake (meta) kernels for ``torch.compile``, and the energy ops'
autograd (reverse and forward mode, first and second order) and vmap rules,
so that autograd, ``torch.autograd.forward_ad`` and the ``torch.func``
transforms differentiate them. The CPU kept-softmax path's autograd is C++
(``csrc/autograd/energy_autograd.cpp``).
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch
from torch import Tensor

__all__ = ["sgld_step_", "energy", "energy_ce", "raise_label_errors"]

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


def energy(logits: Tensor, y: Tensor | None = None) -> Tensor:
    r"""JEM energy per sample, differentiable.

    ``E(x) = -logsumexp_c logits[b, c]`` without ``y``; ``E(x, y) = -logits[b, y[b]]``
    with ``y`` (int64 ``[B]``). ``logits`` is ``[B, C]`` (any ``C >= 1``)
    in float32/64 or float16/bfloat16 (accumulated in float32). Stable for
    huge values; NaN and infinite logits give what ``-torch.logsumexp`` gives,
    in the value and in the gradient (a row of only ``-inf``: ``E = +inf``
    with a NaN gradient). The backward is fused: ``-softmax(logits) * g``
    (or ``-g`` on the label), and supports double backward. Forward mode
    (``torch.autograd.forward_ad``, ``torch.func.jvp``) and the ``torch.func``
    transforms (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``hessian``,
    ``vmap``) give what they give for ``-torch.logsumexp``. On the CPU, when
    a backward will follow, the forward keeps its softmax and the backward
    scales it in place (no second pass of exps).

    Labels out of range raise ``RuntimeError("energy: label y[b] = v is out of
    range for C classes")`` on the CPU. On CUDA the kernels cannot raise
    without a host synchronisation per call: they give NaN for that row
    (value and gradient) and record the first bad label on the device;
    :func:`raise_label_errors` raises the same message from that record (the
    trainer does so with the loss terms it reads every iteration).
    """
    if y is None and _keeps_softmax(logits):
        return _ops._energy_kept_softmax.default(logits)
    return _ops.energy.default(logits, y)


def _keeps_softmax(logits: Tensor) -> bool:
    # On the CPU the backward's exps cost as much as the whole forward, so
    # when a backward will follow, the forward keeps its softmax for it and
    # the backward turns it into the gradient in place (no exp, no new B x C
    # tensor): _energy_kept_softmax, whose autograd is C++. Half types would
    # round it; other devices and compiled graphs (which plan their own
    # memory) recompute, and so do forward mode and the torch.func transforms
    # (the op hands those to the energy op's autograd itself; checking here
    # spares them the detour).
    return (
        logits.requires_grad
        and torch.is_grad_enabled()
        and logits.device.type == "cpu"
        and logits.dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


def energy_ce(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(energy(logits), cross_entropy(logits, y, reduction="none"))`` in one pass.

    The JEM loss needs both ``logsumexp(logits)`` (for log p(x)) and the
    cross-entropy ``logsumexp(logits) - logits[y]``; this computes the
    logsumexp once. The cross-entropy of a finite row is computed from the
    max-shifted logits, as ``F.cross_entropy`` does, so it keeps its precision
    for large logits. Differentiable in ``logits`` (fused backward). Labels
    out of range: as in :func:`energy` (on CUDA a NaN cross-entropy for that
    row and an error raised later by :func:`raise_label_errors`).
    """
    return _ops.energy_ce.default(logits, y)


# --------------------------------------------------------- deferred label check

# Op codes of the device's label record (csrc/cuda/energy_cuda.cu).
_LABEL_ERROR_OPS = {1: "energy", 2: "energy_ce", 3: "energy_backward"}


def label_error_record(device: torch.device | str) -> Tensor:
    """The label record of ``device``, taken (cleared), without waiting for the device.

    An int64 tensor ``[op, row, label, classes]`` on ``device``: the first out-of-range label
    a CUDA energy kernel met since the last take (``op`` 0: none). Copy it to the host together
    with other values read anyway and pass it to :func:`check_label_record`. On the CPU the
    kernels raise at once and the record is always empty.
    """
    return _ops._take_label_error.default(torch.empty(0, device=device))


def check_label_record(record: Tensor) -> None:
    """Raise the CPU kernels' ``RuntimeError`` for a label record that holds an error.

    ``record`` is a host copy of :func:`label_error_record`'s tensor.
    """
    op, row, label, classes = (int(v) for v in record.tolist())
    if op:
        name = _LABEL_ERROR_OPS.get(op, f"energy op {op}")
        raise RuntimeError(
            f"{name}: label y[{row}] = {label} is out of range for {classes} classes"
        )


def raise_label_errors(device: torch.device | str | None = None) -> None:
    """Raise the error of the first out-of-range label that ``device``'s energy kernels met.

    On CUDA, :func:`energy` with labels, :func:`energy_ce` and their backward give NaN for a
    row whose label is out of range and record it on the device instead of raising (raising
    would need a host synchronisation in every call). This reads and clears the record (one
    small device-to-host copy, which waits for the work queued so far) and raises the message
    the CPU kernels raise, naming the op, the row, the label and the number of classes.
    A no-op on the CPU (the kernels there raise at once). ``device``: the current CUDA
    device when ``None``.
    """
    if device is None:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type == "cpu":
        return
    check_label_record(label_error_record(device).cpu())


# ---------------------------------------------------------------- fake kernels


# They check what csrc/checks.h checks (dtype, device, shape and the
# scalar arguments) with the same messages, so a traced or compiled call
# fails where an eager call fails.

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_floating(op: str, name: str, t: Tensor) -> None:
    torch._check(
        t.dtype in _FLOATING,
        lambda: f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}",
    )


def _check_same_device(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    torch._check(
        t.device == ref.device,
        lambda: f"{op}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}",
    )


def _check_logits_meta(op: str, logits: Tensor, y: Tensor | None) -> None:
    _check_floating(op, "logits", logits)
    torch._check(
        logits.dim() == 2,
        lambda: f"{op}: logits must be 2-D [batch, classes], got shape {tuple(logits.shape)}",
    )
    torch._check(
        logits.shape[1] >= 1,
        lambda: f"{op}: logits need at least one class, got shape {tuple(logits.shape)}",
    )
    if y is None:
        return
    torch._check(y.dtype == torch.int64, lambda: f"{op}: y must be int64, got {y.dtype}")
    torch._check(
        y.shape == (logits.shape[0],),
        lambda: f"{op}: y must have shape [{logits.shape[0]}], got {tuple(y.shape)}",
    )
    _check_same_device(op, "y", y, logits, "logits")


def _check_row_vector_meta(op: str, name: str, t: Tensor | None, logits: Tensor) -> None:
    if t is None:
        return
    _check_floating(op, name, t)
    torch._check(
        t.shape == (logits.shape[0],),
        lambda: f"{op}: {name} must have shape [{logits.shape[0]}], got {tuple(t.shape)}",
    )
    _check_same_device(op, name, t, logits, "logits")


def _check_sgld_meta(op, x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip) -> None:
    _check_floating(op, "x", x)
    torch._check(grad.shape == x.shape, lambda: f"{op}: grad must have x's shape")
    torch._check(grad.dtype == x.dtype, lambda: f"{op}: grad must have x's dtype {x.dtype}")
    _check_same_device(op, "grad", grad, x, "x")
    torch._check(
        math.isfinite(step_size), lambda: f"{op}: step_size must be finite, got {step_size}"
    )
    torch._check(
        noise_std >= 0 and math.isfinite(noise_std),
        lambda: f"{op}: noise_std must be finite and >= 0, got {noise_std}",
    )
    torch._check(
        grad_clip is None or grad_clip >= 0,
        lambda: f"{op}: grad_clip must be >= 0, got {grad_clip}",
    )
    for name, bound in (("clamp_min", clamp_min), ("clamp_max", clamp_max)):
        torch._check(
            bound is None or not math.isnan(bound),
            lambda name=name: f"{op}: {name} must be a number or None, got nan",
        )
    torch._check(
        clamp_min is None or clamp_max is None or clamp_min <= clamp_max,
        lambda: f"{op}: clamp_min must be <= clamp_max, got {clamp_min} > {clamp_max}",
    )


@torch.library.register_fake("jem_ext::sgld_step_")
def _sgld_step_fake(
    x, grad, step_size, noise_std, clamp_min=None, clamp_max=None, grad_clip=None, generator=None
):
    _check_sgld_meta("sgld_step_", x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip)


@torch.library.register_fake("jem_ext::_sgld_step_philox_")
def _sgld_step_philox_fake(
    x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip, seed, offset
):
    op = "_sgld_step_philox_"
    _check_sgld_meta(op, x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip)
    torch._check(
        offset >= 0 and offset % 4 == 0,
        lambda: f"{op}: offset must be a non-negative multiple of 4, got {offset}",
    )


@torch.library.register_fake("jem_ext::energy")
def _energy_fake(logits, y=None):
    _check_logits_meta("energy", logits, y)
    return logits.new_empty(logits.shape[0])


@torch.library.register_fake("jem_ext::_energy_softmax")
def _energy_softmax_fake(logits):
    _check_logits_meta("_energy_softmax", logits, None)
    return (
        logits.new_empty(logits.shape[0]),
        torch.empty_like(logits, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("jem_ext::_energy_kept_softmax")
def _energy_kept_softmax_fake(logits):
    _check_logits_meta("energy", logits, None)
    return logits.new_empty(logits.shape[0])


@torch.library.register_fake("jem_ext::_energy_softmax_backward_")
def _energy_softmax_backward_fake(softmax, grad_energy):
    op = "_energy_softmax_backward_"
    _check_logits_meta(op, softmax, None)
    _check_row_vector_meta(op, "grad_energy", grad_energy, softmax)


@torch.library.register_fake("jem_ext::energy_ce")
def _energy_ce_fake(logits, y):
    torch._check(
        y is not None,
        lambda: "energy_ce: y (int64 class labels of shape [batch]) is required, got None",
    )
    _check_logits_meta("energy_ce", logits, y)
    return logits.new_empty(logits.shape[0]), logits.new_empty(logits.shape[0])


@torch.library.register_fake("jem_ext::_take_label_error")
def _take_label_error_fake(like):
    return like.new_empty(4, dtype=torch.int64)


@torch.library.register_fake("jem_ext::energy_backward")
def _energy_backward_fake(logits, y, energy, grad_lse, grad_pick):
    op = "energy_backward"
    _check_logits_meta(op, logits, y)
    for name, t in (("energy", energy), ("grad_lse", grad_lse), ("grad_pick", grad_pick)):
        _check_row_vector_meta(op, name, t, logits)
    torch._check(grad_pick is None or y is not None, lambda: f"{op}: grad_pick needs the labels y")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# -------------------------------------------------------------------- autograd
#
# Each differentiable op (energy, energy_ce, energy_backward) has an
# autograd.Function below, with the reverse-mode formula (backward), the
# forward-mode one (jvp) and a vmap rule, so that autograd, forward_ad and
# every torch.func transform differentiate the op itself. They are the ops'
# Autograd kernels (registered at the end), so ``torch.ops.jem_ext.*`` called
# directly behaves as the Python face does. The softmax Jacobian is
# symmetric: one function, _softmax_jvp, is its product with a vector in both
# modes.


def _energy_hint(logits: Tensor, energy_out: Tensor) -> Tensor | None:
    # The saved energy (= -lse) spares the backward a pass over the logits,
    # but for half types it was rounded to 8 or 11 bits: recompute instead.
    return energy_out if logits.dtype in (torch.float32, torch.float64) else None


def _softmax_acc(logits: Tensor) -> Tensor:
    """exp(logits - logsumexp) in float32 (or float64): NaN and inf exactly
    where the first-order kernel (and torch.logsumexp's gradient) has them."""
    acc = logits.double() if logits.dtype == torch.float64 else logits.float()
    return torch.exp(acc - torch.logsumexp(acc, dim=1, keepdim=True))


def _softmax_jvp(s: Tensor, v: Tensor) -> Tensor:
    """(diag(s) - s s^T) v per row: the softmax Jacobian (symmetric) times v."""
    sv = s * v
    return sv - s * sv.sum(dim=1, keepdim=True)


def _lse_tangent(logits: Tensor, t: Tensor) -> Tensor:
    """d logsumexp(logits) along the tangent t: sum_c softmax_c t_c."""
    s = _softmax_acc(logits)
    return (s * t.to(s.dtype)).sum(dim=1).to(logits.dtype)


def _pick(t: Tensor, y: Tensor) -> Tensor:
    return t.gather(1, y.unsqueeze(1)).squeeze(1)


def _below_autograd(op, *args):
    """The op's device kernel. Under torch.func transforms the call reaches
    the lower transform levels first: those must see grad and forward grad
    enabled, as they were outside (autograd.Function turns both off for the
    level it runs at, which the dispatch below autograd already skips)."""
    if not torch._C._are_functorch_transforms_active():
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    with (
        torch.enable_grad(),
        torch.autograd.forward_ad._set_fwd_grad_enabled(True),
        torch._C._AutoDispatchBelowAutograd(),
    ):
        return op(*args)


def _jvp_rule(jvp):
    """A Function's jvp staticmethod, refusing forward-over-forward.

    autograd.Function computes a tangent with forward grad off, so an outer
    forward-mode level (jvp of jvp, jacfwd of jacfwd) would see a zero
    derivative of it: that raises instead. Forward-over-reverse
    (``torch.func.hessian``, jvp of grad) and reverse-over-forward work."""

    def rule(ctx, *tangents):
        if torch._C._are_functorch_transforms_active():
            stack = torch._C._functorch.get_interpreter_stack() or []
            jvps = sum(i.key() == torch._C._functorch.TransformType.Jvp for i in stack)
            if jvps > 1:
                raise NotImplementedError(
                    "jem_ext energy ops: forward mode over forward mode (jvp of jvp, "
                    "jacfwd of jacfwd) is not supported; use reverse mode for one of the "
                    "two (torch.func.hessian, jacfwd(jacrev(f)), jvp of grad)"
                )
        return jvp(ctx, *tangents)

    return staticmethod(rule)


def _needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call must go through the op's autograd.Function: a tensor
    that requires grad (with grad mode on), a forward-mode dual level open
    (the Function finds the tangents), or a torch.func transform active."""
    if torch._C._are_functorch_transforms_active():
        return True
    if torch._C._is_fwd_grad_enabled() and torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# vmap: the ops are row-wise, so a batch of B-row inputs is one call on
# N * B rows. Unbatched inputs are expanded to the batch.


def _rows(t: Tensor | None, dim: int | None, n: int) -> Tensor | None:
    """[B, ...] with a vmap dimension `dim` (None: unbatched) as [n * B, ...]."""
    if t is None:
        return None
    t = t.unsqueeze(0).expand(n, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(n * t.shape[1], *t.shape[2:])


def _check_samples(op: str, names, args, in_dims) -> None:
    """Per-sample shapes, checked before the batch is flattened (after it,
    the op would see N * B rows and its messages would name those)."""

    def sample_shape(t, d):
        return list(t.shape) if d is None else list(t.shape[:d] + t.shape[d + 1 :])

    logits = sample_shape(args[0], in_dims[0])
    torch._check(
        len(logits) == 2, lambda: f"{op}: logits must be 2-D [batch, classes], got shape {logits}"
    )
    for name, t, d in zip(names[1:], args[1:], in_dims[1:]):
        if t is not None:
            shape = sample_shape(t, d)
            torch._check(
                shape == logits[:1],
                lambda name=name, shape=shape: (
                    f"{op}: {name} must have shape "
                    f"[{logits[0]}] to match logits {logits}, got {shape}"
                ),
            )


def _energy_vmap(info, in_dims, logits, y=None):
    n = info.batch_size
    _check_samples("energy", ("logits", "y"), (logits, y), in_dims)
    flat = (_rows(t, d, n) for t, d in zip((logits, y), in_dims))
    out = _ops.energy.default(*flat)
    return out.reshape(n, -1), 0


def _energy_ce_vmap(info, in_dims, logits, y):
    n = info.batch_size
    _check_samples("energy_ce", ("logits", "y"), (logits, y), in_dims)
    flat = (_rows(t, d, n) for t, d in zip((logits, y), in_dims))
    e, ce = _ops.energy_ce.default(*flat)
    return (e.reshape(n, -1), ce.reshape(n, -1)), (0, 0)


def _energy_backward_vmap(info, in_dims, logits, y, energy, grad_lse, grad_pick):
    n = info.batch_size
    args = (logits, y, energy, grad_lse, grad_pick)
    names = ("logits", "y", "energy", "grad_lse", "grad_pick")
    _check_samples("energy_backward", names, args, in_dims)
    flat = [_rows(t, d, n) for t, d in zip(args, in_dims)]
    out = _ops.energy_backward.default(*flat)
    return out.reshape(n, -1, out.shape[1]), 0


class _Energy(torch.autograd.Function):
    """energy(logits, y): E = -lse(logits), or -logits[y]."""

    @staticmethod
    def forward(logits, y):
        return _below_autograd(_ops.energy.default, logits, y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, y = inputs
        ctx.save_for_backward(logits, y, output)
        ctx.save_for_forward(logits, y)

    @staticmethod
    def backward(ctx, grad):
        logits, y, out = ctx.saved_tensors
        if y is None:
            d = _ops.energy_backward.default(logits, None, _energy_hint(logits, out), -grad, None)
        else:
            d = _ops.energy_backward.default(logits, y, None, None, -grad)
        return d, None

    def _jvp(ctx, t_logits, t_y):
        logits, y = ctx.saved_tensors
        return -(_lse_tangent(logits, t_logits) if y is None else _pick(t_logits, y))

    jvp = _jvp_rule(_jvp)


class _EnergyCE(torch.autograd.Function):
    """energy_ce(logits, y): (E = -lse, CE = lse - logits[y])."""

    @staticmethod
    def forward(logits, y):
        return _below_autograd(_ops.energy_ce.default, logits, y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, y = inputs
        ctx.save_for_backward(logits, y, output[0])
        ctx.save_for_forward(logits, y)

    @staticmethod
    def backward(ctx, grad_energy, grad_ce):
        # E = -lse, CE = lse - l_y  =>  dL/dl = (g_ce - g_E) softmax - g_ce onehot(y)
        logits, y, out = ctx.saved_tensors
        d = _ops.energy_backward.default(
            logits, y, _energy_hint(logits, out), grad_ce - grad_energy, -grad_ce
        )
        return d, None

    def _jvp(ctx, t_logits, t_y):
        logits, y = ctx.saved_tensors
        d_lse = _lse_tangent(logits, t_logits)
        return -d_lse, d_lse - _pick(t_logits, y)

    jvp = _jvp_rule(_jvp)


class _EnergyBackward(torch.autograd.Function):
    """energy_backward: grad_lse[:, None] * softmax(logits) + grad_pick[:, None] * onehot(y).

    The `energy` input is -lse(logits) itself, a hint that spares the kernel
    a pass: its dependence on the logits is folded into the softmax Jacobian,
    and it gets no gradient (nor does its tangent count)."""

    @staticmethod
    def forward(logits, y, energy, grad_lse, grad_pick):
        return _below_autograd(_ops.energy_backward.default, logits, y, energy, grad_lse, grad_pick)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, y, energy_in, grad_lse, grad_pick = inputs
        ctx.save_for_backward(logits, y, grad_lse)
        ctx.save_for_forward(logits, y, grad_lse)

    @staticmethod
    def backward(ctx, gg):
        logits, y, grad_lse = ctx.saved_tensors
        d_logits = d_grad_lse = d_grad_pick = None
        if grad_lse is not None:
            s = _softmax_acc(logits)
            g = gg.to(s.dtype)
            if ctx.needs_input_grad[0]:
                jvp = _softmax_jvp(s, g)
                d_logits = (grad_lse.to(s.dtype).unsqueeze(1) * jvp).to(logits.dtype)
            if ctx.needs_input_grad[3]:
                d_grad_lse = (s * g).sum(dim=1).to(grad_lse.dtype)
        if ctx.needs_input_grad[4]:
            d_grad_pick = _pick(gg, y)
        return d_logits, None, None, d_grad_lse, d_grad_pick

    def _jvp(ctx, t_logits, t_y, t_energy, t_grad_lse, t_grad_pick):
        logits, y, grad_lse = ctx.saved_tensors
        out = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        if grad_lse is not None and (t_logits is not None or t_grad_lse is not None):
            s = _softmax_acc(logits)
            d = torch.zeros_like(s)
            if t_logits is not None:
                d = d + grad_lse.to(s.dtype).unsqueeze(1) * _softmax_jvp(s, t_logits.to(s.dtype))
            if t_grad_lse is not None:
                d = d + t_grad_lse.to(s.dtype).unsqueeze(1) * s
            out = out + d.to(logits.dtype)
        if t_grad_pick is not None:
            out = out.scatter_add(1, y.unsqueeze(1), t_grad_pick.to(out.dtype).unsqueeze(1))
        return out

    jvp = _jvp_rule(_jvp)


# The Autograd kernels: the Function when differentiation is asked for, the
# device kernel directly otherwise (no Python autograd round trip).

_lib = torch.library.Library("jem_ext", "IMPL")


# Function.apply would hand a call under a torch.func transform to
# custom_function_call, which runs every transform level around the Function
# at once; an Autograd kernel is already inside one level (the dispatcher
# calls it once per level, as for torch's own ops), so it applies the
# Function at that level, as custom_function_call itself does for each level.
_apply_at_this_level = torch._C._FunctionBase.__dict__["apply"]


def _apply(apply, args):
    if not torch._C._are_functorch_transforms_active():
        return apply(*args)
    with torch._functorch.utils.enable_single_level_autograd_function():
        return apply(*args)


def _autograd_kernel(name: str, function: type[torch.autograd.Function]) -> None:
    op = getattr(_ops, name).default
    n_args = len(op._schema.arguments)
    apply = _apply_at_this_level.__get__(None, function)

    def kernel(keyset, *args):
        if _needs_autograd(*(a for a in args if isinstance(a, Tensor))):
            # The dispatcher leaves out trailing arguments equal to their
            # defaults (None for every optional tensor here).
            return _apply(apply, (*args, *(None,) * (n_args - len(args))))
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _lib.impl(name, kernel, "Autograd", with_keyset=True)


_autograd_kernel("energy", _Energy)
_autograd_kernel("energy_ce", _EnergyCE)
_autograd_kernel("energy_backward", _EnergyBackward)
torch.library.register_vmap("jem_ext::energy", _energy_vmap)
torch.library.register_vmap("jem_ext::energy_ce", _energy_ce_vmap)
torch.library.register_vmap("jem_ext::energy_backward", _energy_backward_vmap)
