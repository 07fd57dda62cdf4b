"""Forward mode and the torch.func transforms through the ops: every
differentiable op (the Python face and the raw torch ops) under every
transform, first and second order, against the same transform of a float64
torch reference; and the SGLD ops, which are not differentiable, refusing
them with a clear error."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

from jem_ext import ops

B, C = 3, 5
Y = torch.tensor([0, 4, 2])
G_LSE = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
G_PICK = torch.tensor([1.0, 0.25, -3.0], dtype=torch.float64)


def onehot(y, c=C):
    return F.one_hot(y, c).to(torch.float64)


def on(t, z):
    """A constant of the cases on the device of the logits z."""
    return t.to(z.device)


# name -> (function of logits [B, C] under test, torch reference). The
# energy_backward cases make its output a function of the logits and of the
# row coefficients (closed over), the shape a create_graph backward has.
CASES = {
    "energy": (lambda z: ops.energy(z), lambda z: -z.logsumexp(1)),
    "energy_y": (
        lambda z: ops.energy(z, on(Y, z)),
        lambda z: -z.gather(1, on(Y, z)[:, None]).squeeze(1),
    ),
    "energy_ce.energy": (lambda z: ops.energy_ce(z, on(Y, z))[0], lambda z: -z.logsumexp(1)),
    "energy_ce.ce": (
        lambda z: ops.energy_ce(z, on(Y, z))[1],
        lambda z: F.cross_entropy(z, on(Y, z), reduction="none"),
    ),
    "raw_energy": (lambda z: torch.ops.jem_ext.energy(z), lambda z: -z.logsumexp(1)),
    "raw_energy_y": (
        lambda z: torch.ops.jem_ext.energy(z, on(Y, z)),
        lambda z: -z.gather(1, on(Y, z)[:, None]).squeeze(1),
    ),
    "raw_energy_ce": (
        lambda z: (
            torch.ops.jem_ext.energy_ce(z, on(Y, z))[1] * 2
            + torch.ops.jem_ext.energy_ce(z, on(Y, z))[0]
        ),
        lambda z: F.cross_entropy(z, on(Y, z), reduction="none") * 2 - z.logsumexp(1),
    ),
    "raw_kept_softmax": (
        lambda z: torch.ops.jem_ext._energy_kept_softmax(z),
        lambda z: -z.logsumexp(1),
    ),
    "raw_energy_backward": (
        lambda z: torch.ops.jem_ext.energy_backward(z, on(Y, z), None, on(G_LSE, z), on(G_PICK, z)),
        lambda z: on(G_LSE, z)[:, None] * z.softmax(1) + on(G_PICK, z)[:, None] * onehot(on(Y, z)),
    ),
    "raw_energy_backward_with_energy": (
        lambda z: torch.ops.jem_ext.energy_backward(z, None, -z.logsumexp(1), on(G_LSE, z), None),
        lambda z: on(G_LSE, z)[:, None] * z.softmax(1),
    ),
}


def logits(seed=0, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(shape or (B, C)), generator=g, dtype=torch.float64) * 2


def weights_like(out):
    g = torch.Generator().manual_seed(7)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)


def scalar(f, w):
    return lambda z: (f(z) * w).sum()


def forward_ad_tangent(f, x, t):
    with fwAD.dual_level():
        out = f(fwAD.make_dual(x, t))
        return fwAD.unpack_dual(out).tangent


# name -> transform(f) evaluated at x: a tensor to compare.
def _transforms(device="cpu"):
    t = logits(1).to(device)
    xb = logits(2, 4, B, C).to(device)  # a vmap batch of 4 logits matrices

    def with_w(fn):
        def run(f, x):
            return fn(scalar(f, weights_like(f(x.detach()))), x)

        return run

    return {
        "jvp": lambda f, x: jvp(f, (x,), (t,))[1],
        "forward_ad": lambda f, x: forward_ad_tangent(f, x, t),
        "grad": with_w(lambda s, x: grad(s)(x)),
        "vjp": lambda f, x: vjp(f, x)[1](weights_like(f(x)))[0],
        "jacrev": lambda f, x: jacrev(f)(x),
        "jacfwd": lambda f, x: jacfwd(f)(x),
        "hessian": with_w(lambda s, x: hessian(s)(x)),
        "jacrev_jacrev": with_w(lambda s, x: jacrev(jacrev(s))(x)),
        "hvp_forward_over_reverse": with_w(lambda s, x: jvp(grad(s), (x,), (t,))[1]),
        "vmap": lambda f, x: vmap(f)(xb),
        "vmap_in_dims_1": lambda f, x: vmap(f, in_dims=1)(xb.movedim(0, 1)),
        "vmap_grad": lambda f, x: vmap(grad(scalar(f, weights_like(f(x)))))(xb),
        "vmap_jvp": lambda f, x: vmap(lambda xi: jvp(f, (xi,), (t,))[1])(xb),
        "grad_of_jvp": with_w(lambda s, x: grad(lambda z: jvp(s, (z,), (t,))[1])(x)),
        "autograd_double_backward": with_w(_double_backward),
    }


def _double_backward(s, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(s(x), [x], create_graph=True)
    (h,) = torch.autograd.grad((g * g * x).sum(), [x])
    return h


TRANSFORMS = _transforms()


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("case", list(CASES))
def test_transform_matches_torch_reference(case, transform):
    f, ref = CASES[case]
    x = logits(0)
    got = TRANSFORMS[transform](f, x)
    want = TRANSFORMS[transform](ref, x)
    assert got is not None, f"{transform} of {case} gave no tangent"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("transform", ["jvp", "forward_ad", "grad", "hessian", "vmap_grad"])
@pytest.mark.parametrize("case", ["energy", "energy_y", "energy_ce.ce", "raw_energy_backward"])
def test_cuda_transform_matches_cpu(case, transform):
    f, _ = CASES[case]
    got = _transforms("cuda")[transform](f, logits(0).cuda())
    want = TRANSFORMS[transform](f, logits(0))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_over_forward_raises_instead_of_a_silent_zero(case):
    # autograd.Function computes tangents with forward grad off: an outer
    # forward level would see zero, so the ops refuse it.
    f, _ = CASES[case]
    x, t = logits(0), logits(1)
    with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
        jvp(lambda z: jvp(f, (z,), (t,))[1], (x,), (t,))
    with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
        jacfwd(jacfwd(f))(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_jvp_in_low_precision_matches_float64(dtype):
    x, t = logits(0), logits(1)
    _, got = jvp(ops.energy, (x.to(dtype),), (t.to(dtype),))
    _, want = jvp(lambda z: -z.logsumexp(1), (x,), (t,))
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_forward_ad_dual_keeps_its_tangent_through_a_model():
    # The per-sample directional derivative of E(f(x)) for a small model.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, C).double()
    x, t = torch.randn(B, 4, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ops.energy(model(fwAD.make_dual(x, t)))).tangent
        want = fwAD.unpack_dual(-model(fwAD.make_dual(x, t)).logsumexp(1)).tangent
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_per_sample_gradients_with_vmap_grad_match_a_loop():
    # The everyday torch.func recipe: per-sample input gradients of E.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, C).double()
    xs = torch.randn(6, 4, dtype=torch.float64)

    def e(xi):
        return ops.energy(model(xi[None]))[0]

    got = vmap(grad(e))(xs)
    want = torch.stack(
        [torch.func.grad(lambda xi: -model(xi[None]).logsumexp(1)[0])(x) for x in xs]
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["energy", "energy_ce"])
def test_vmap_names_the_per_sample_shapes_in_its_errors(op):
    f = ops.energy if op == "energy" else ops.energy_ce
    xb = logits(2, 4, B, C)
    with pytest.raises(RuntimeError, match=rf"{op}: y must have shape \[{B}\].*got \[{B + 1}\]"):
        vmap(lambda xi: f(xi, torch.zeros(B + 1, dtype=torch.long)))(xb)
    with pytest.raises(RuntimeError, match=f"{op}: logits must be 2-D"):
        vmap(lambda xi: f(xi[0], Y))(xb)


# Which path runs: the plain CPU call with a backward ahead takes the C++
# kept-softmax autograd; forward mode and transforms the Python Functions.


def _node(t):
    return t.grad_fn.name() if t.grad_fn is not None else ""


def test_plain_cpu_reverse_mode_takes_the_cpp_kept_softmax_path():
    x = logits(0).requires_grad_(True)
    assert "EnergyKeptSoftmax" in _node(ops.energy(x))
    assert "_Energy" in _node(ops.energy(x, Y))
    assert "_EnergyCE" in _node(ops.energy_ce(x, Y)[0])
    assert "_Energy" in _node(torch.ops.jem_ext.energy(x))


def test_forward_ad_with_requires_grad_takes_the_function_and_both_modes_work():
    x, t = logits(0).requires_grad_(True), logits(1)
    with fwAD.dual_level():
        out = ops.energy(fwAD.make_dual(x, t))
        primal, tangent = fwAD.unpack_dual(out)
        assert "EnergyKeptSoftmax" not in _node(primal)
        (g,) = torch.autograd.grad(primal.sum(), [x])
    torch.testing.assert_close(tangent, -(x.detach().softmax(1) * t).sum(1))
    torch.testing.assert_close(g, -x.detach().softmax(1))


def test_kept_softmax_op_hands_dual_tensors_to_the_energy_autograd():
    x, t = logits(0), logits(1)
    with fwAD.dual_level():
        out = torch.ops.jem_ext._energy_kept_softmax(fwAD.make_dual(x, t).requires_grad_(True))
        tangent = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, -(x.softmax(1) * t).sum(1))


# sgld_step_ is an in-place update: no transform can differentiate it, and
# none may leave a stale tangent or wrapper behind silently.

SGLD_CALLS = {
    "sgld_step_": lambda x, g: ops.sgld_step_(x, g, 0.1, 0.0),
    "raw_sgld_step_": lambda x, g: torch.ops.jem_ext.sgld_step_(x, g, 0.1, 0.0),
    "sgld_step_philox_": lambda x, g: ops.sgld_step_philox_(x, g, 0.1, 0.0, seed=1),
}


@pytest.mark.parametrize("call", list(SGLD_CALLS))
@pytest.mark.parametrize("tangent_on", ["x", "grad"])
def test_sgld_refuses_forward_ad_dual_tensors(call, tangent_on):
    x, g = torch.zeros(4), torch.ones(4)
    with fwAD.dual_level(), torch.no_grad():
        if tangent_on == "x":
            x = fwAD.make_dual(x, torch.ones(4))
        else:
            g = fwAD.make_dual(g, torch.ones(4))
        with pytest.raises(RuntimeError, match="not differentiable.*forward-mode"):
            SGLD_CALLS[call](x, g)


@pytest.mark.parametrize("call", list(SGLD_CALLS))
@pytest.mark.parametrize("transform", ["jvp", "grad", "vjp", "jacfwd", "jacrev"])
def test_sgld_refuses_torch_func_differentiation(call, transform):
    def f(x):
        x = x.clone()
        with torch.no_grad():
            SGLD_CALLS[call](x, torch.ones_like(x))
        return x.sum()

    x = torch.zeros(4)
    run = {
        "jvp": lambda: jvp(f, (x,), (torch.ones(4),)),
        "grad": lambda: grad(f)(x),
        "vjp": lambda: vjp(f, x),
        "jacfwd": lambda: jacfwd(f)(x),
        "jacrev": lambda: jacrev(f)(x),
    }[transform]
    with pytest.raises(RuntimeError, match="not differentiable"):
        run()
