"""The two fused ops of jem_ext, as torch ops with a documented Python face.

* :func:`sgld_step_`: one in-place SGLD update with Gaussian noise drawn
  inside the kernel (counter-based Philox, seeded from a torch Generator).
* :func:`energy` / :func:`energy_ce`: the JEM energy ``-logsumexp(logits)``
  (or ``-logits[y]``), and the energy together with the per-sample
  cross-entropy from one pass over the logits.

The kernels live in ``csrc/`` and are registered as ``torch.ops.jem_ext.*``
when :mod:`jem_ext._C` loads; this module adds what PyTorch needs around
them: fake (meta) kernels for ``torch.compile`` and the autograd formulas of
the energy ops (first and second order).
"""

from __future__ import annotations

import math
import operator

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
        step_size: :math:`s`.
        noise_std: :math:`\sigma \ge 0` (0 gives plain gradient descent).
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
    detached ``grad`` (it raises otherwise).
    """
    _ops.sgld_step_.default(
        x,
        grad,
        float(step_size),
        float(noise_std),
        None if clamp_min is None else float(clamp_min),
        None if clamp_max is None else float(clamp_max),
        None if grad_clip is None else float(grad_clip),
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
    _ops._sgld_step_philox_.default(
        x,
        grad,
        float(step_size),
        float(noise_std),
        None if clamp_min is None else float(clamp_min),
        None if clamp_max is None else float(clamp_max),
        None if grad_clip is None else float(grad_clip),
        _seed_as_int64(seed),
        _offset_as_int64(offset),
    )
    return x


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
    (or ``-g`` on the label), and supports double backward. On the CPU, when
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
        return _EnergyKeptSoftmax.apply(logits)
    return _ops.energy.default(logits, y)


def _keeps_softmax(logits: Tensor) -> bool:
    # On the CPU the backward's exps cost as much as the whole forward, so
    # when a backward will follow, the forward keeps its softmax for it and
    # the backward turns it into the gradient in place (no exp, no new B x C
    # tensor). Half types would round it; other devices and compiled graphs
    # (which plan their own memory) recompute.
    return (
        logits.requires_grad
        and torch.is_grad_enabled()
        and logits.device.type == "cpu"
        and logits.dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
    )


class _EnergyKeptSoftmax(torch.autograd.Function):
    """``energy(logits)`` whose forward keeps its softmax for the backward."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        energy_out, probs = _ops._energy_softmax.default(logits)
        ctx.save_for_backward(logits, energy_out)
        # Not saved for backward: the first backward takes it over as its
        # gradient, in place.
        ctx.probs = probs
        return energy_out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        probs, ctx.probs = ctx.probs, None
        logits, energy_out = ctx.saved_tensors
        if torch.is_grad_enabled():
            # The backward is itself differentiated (create_graph):
            # energy_backward carries the second-order formula.
            return _ops.energy_backward.default(logits, None, energy_out, -grad, None)
        if probs is None:  # a later backward of a retained graph: the same bits again
            probs = _ops._energy_softmax.default(logits)[1]
        _ops._energy_softmax_backward_.default(probs, -grad)
        return probs


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


def _check_sgld_meta(op, x, grad, noise_std, clamp_min, clamp_max, grad_clip) -> None:
    _check_floating(op, "x", x)
    torch._check(grad.shape == x.shape, lambda: f"{op}: grad must have x's shape")
    torch._check(grad.dtype == x.dtype, lambda: f"{op}: grad must have x's dtype {x.dtype}")
    _check_same_device(op, "grad", grad, x, "x")
    torch._check(noise_std >= 0, lambda: f"{op}: noise_std must be >= 0, got {noise_std}")
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
    _check_sgld_meta("sgld_step_", x, grad, noise_std, clamp_min, clamp_max, grad_clip)


@torch.library.register_fake("jem_ext::_sgld_step_philox_")
def _sgld_step_philox_fake(
    x, grad, step_size, noise_std, clamp_min, clamp_max, grad_clip, seed, offset
):
    op = "_sgld_step_philox_"
    _check_sgld_meta(op, x, grad, noise_std, clamp_min, clamp_max, grad_clip)
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


@torch.library.register_fake("jem_ext::_energy_softmax_backward_")
def _energy_softmax_backward_fake(softmax, grad_lse):
    op = "_energy_softmax_backward_"
    _check_logits_meta(op, softmax, None)
    _check_row_vector_meta(op, "grad_lse", grad_lse, softmax)


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


def _energy_hint(logits: Tensor, energy_out: Tensor) -> Tensor | None:
    # The saved energy (= -lse) spares the backward a pass over the logits,
    # but for half types it was rounded to 8 or 11 bits: recompute instead.
    return energy_out if logits.dtype in (torch.float32, torch.float64) else None


def _energy_setup(ctx, inputs, output):
    logits, y = inputs
    ctx.save_for_backward(logits, y, output)


def _energy_bwd(ctx, grad):
    logits, y, out = ctx.saved_tensors
    if y is None:
        d = _ops.energy_backward.default(logits, None, _energy_hint(logits, out), -grad, None)
    else:
        d = _ops.energy_backward.default(logits, y, None, None, -grad)
    return d, None


def _energy_ce_setup(ctx, inputs, output):
    logits, y = inputs
    ctx.save_for_backward(logits, y, output[0])


def _energy_ce_bwd(ctx, grad_energy, grad_ce):
    # E = -lse, CE = lse - l_y  =>  dL/dl = (g_ce - g_E) softmax - g_ce onehot(y)
    logits, y, out = ctx.saved_tensors
    d = _ops.energy_backward.default(
        logits, y, _energy_hint(logits, out), grad_ce - grad_energy, -grad_ce
    )
    return d, None


def _softmax_acc(logits: Tensor) -> Tensor:
    """exp(logits - logsumexp) in float32 (or float64): NaN and inf exactly
    where the first-order kernel (and torch.logsumexp's gradient) has them."""
    acc = logits.double() if logits.dtype == torch.float64 else logits.float()
    return torch.exp(acc - torch.logsumexp(acc, dim=1, keepdim=True))


def _energy_backward_setup(ctx, inputs, output):
    logits, y, energy_in, grad_lse, grad_pick = inputs
    ctx.save_for_backward(logits, y, grad_lse)


def _energy_backward_bwd(ctx, gg):
    # out = grad_lse[:, None] * softmax(logits) + grad_pick[:, None] * onehot(y).
    # The `energy` input is -lse(logits) itself, so its dependence on the
    # logits is folded into the softmax Jacobian below and it gets no grad.
    logits, y, grad_lse = ctx.saved_tensors
    d_logits = d_grad_lse = d_grad_pick = None
    if grad_lse is not None:
        s = _softmax_acc(logits)
        g = gg.to(s.dtype)
        sg = s * g
        if ctx.needs_input_grad[0]:
            jvp = sg - s * sg.sum(dim=1, keepdim=True)
            d_logits = (grad_lse.to(s.dtype).unsqueeze(1) * jvp).to(logits.dtype)
        if ctx.needs_input_grad[3]:
            d_grad_lse = sg.sum(dim=1).to(grad_lse.dtype)
    if ctx.needs_input_grad[4]:
        d_grad_pick = gg.gather(1, y.unsqueeze(1)).squeeze(1)
    return d_logits, None, None, d_grad_lse, d_grad_pick


torch.library.register_autograd("jem_ext::energy", _energy_bwd, setup_context=_energy_setup)
torch.library.register_autograd(
    "jem_ext::energy_ce", _energy_ce_bwd, setup_context=_energy_ce_setup
)
torch.library.register_autograd(
    "jem_ext::energy_backward", _energy_backward_bwd, setup_context=_energy_backward_setup
)
