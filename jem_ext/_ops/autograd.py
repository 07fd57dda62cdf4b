"""The energy ops' autograd (reverse and forward mode, first and second order) and vmap rules.

Importing this module registers them on ``torch.ops.jem_ext``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.jem_ext

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
