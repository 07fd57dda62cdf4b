"""``energy`` and ``energy_ce``: the energy ops' Python face, and the deferred check of
out-of-range labels on CUDA (``raise_label_errors``)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_label_record",
    "energy",
    "energy_ce",
    "label_error_record",
    "raise_label_errors",
]

_ops = torch.ops.jem_ext


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
