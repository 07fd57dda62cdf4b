"""The ops' fake (meta) kernels, for ``torch.compile`` and tracing.

Importing this module registers them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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
