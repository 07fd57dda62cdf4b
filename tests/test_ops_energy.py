"""energy / energy_ce: values and gradients against float64 references,
gradcheck (first and second order), extreme values, dtypes, layouts,
errors, opcheck."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import energy_reference

from jem_ext import ops

TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)
CLASSES = [1, 2, 10, 37, 100, 1000]


def make_logits(b, c, dtype, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g) * scale).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CLASSES)
def test_energy_and_gradient_match_reference(device, dtype, c):
    logits = make_logits(33, c, dtype, device).requires_grad_(True)
    e = ops.energy(logits)
    assert e.dtype == dtype and e.shape == (33,)
    want = energy_reference(logits.detach())
    tol = TOL[dtype] * max(1.0, want.abs().max().item())
    torch.testing.assert_close(e.double(), want, rtol=TOL[dtype], atol=tol)
    g = torch.randn(33, dtype=torch.float64)
    e.backward(g.to(device, dtype))
    want_grad = -torch.softmax(logits.detach().double(), 1) * g.to(device).unsqueeze(1)
    torch.testing.assert_close(
        logits.grad.double(), want_grad, rtol=TOL[dtype] * 4, atol=TOL[dtype] * 4
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_energy_with_labels(device, dtype):
    logits = make_logits(20, 10, dtype, device).requires_grad_(True)
    y = torch.randint(0, 10, (20,), device=device)
    e = ops.energy(logits, y)
    torch.testing.assert_close(e.double(), energy_reference(logits.detach(), y), rtol=0, atol=0)
    e.sum().backward()
    want = -F.one_hot(y, 10).to(dtype)
    assert torch.equal(logits.grad, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1, 10, 1000])
def test_energy_ce_matches_reference(device, dtype, c):
    logits = make_logits(17, c, dtype, device).requires_grad_(True)
    y = torch.randint(0, c, (17,), device=device)
    e, ce = ops.energy_ce(logits, y)
    lg = logits.detach().double()
    tol = TOL[dtype] * 10
    torch.testing.assert_close(e.double(), energy_reference(lg), rtol=tol, atol=tol)
    torch.testing.assert_close(
        ce.double(), F.cross_entropy(lg, y, reduction="none"), rtol=tol, atol=tol
    )
    ge, gce = torch.randn(17, device=device), torch.randn(17, device=device)
    (e.float() * ge + ce.float() * gce).sum().backward()
    ref = lg.clone().requires_grad_(True)
    (
        (-torch.logsumexp(ref, 1)) * ge.double()
        + F.cross_entropy(ref, y, reduction="none") * gce.double()
    ).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref.grad, rtol=tol * 4, atol=tol * 4)


def test_gradcheck_first_and_second_order():
    logits = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (6,))
    assert torch.autograd.gradcheck(ops.energy, (logits,))
    assert torch.autograd.gradcheck(lambda t: ops.energy(t, y), (logits,))
    assert torch.autograd.gradcheck(lambda t: ops.energy_ce(t, y), (logits,))
    assert torch.autograd.gradgradcheck(ops.energy, (logits,))
    assert torch.autograd.gradgradcheck(lambda t: ops.energy_ce(t, y), (logits,))


GRADCHECK_MODES = dict(
    check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True
)


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda t, g: ops.energy(t), id="energy"),
        pytest.param(lambda t, g: ops.energy(t, torch.tensor([0, 6, 2, 3, 1, 5])), id="energy_y"),
        pytest.param(lambda t, g: ops.energy_ce(t, torch.tensor([0, 6, 2, 3, 1, 5])), id="ce"),
        pytest.param(
            lambda t, g: torch.ops.jem_ext.energy_backward(
                t, torch.tensor([0, 6, 2, 3, 1, 5]), None, g, g * 2
            ),
            id="energy_backward",
        ),
    ],
)
def test_gradcheck_forward_mode_and_batched_gradients(fn):
    # Forward mode, and the batched gradients of autograd.grad(is_grads_batched)
    # and vmap over forward mode, against finite differences; the energy ones
    # on the CPU take the kept-softmax path.
    logits = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (logits, g), **GRADCHECK_MODES)
    assert torch.autograd.gradgradcheck(fn, (logits, g), check_fwd_over_rev=True)


def test_double_backward_through_input_gradient_matches_reference():
    # What PGD through SGLD refinement needs: d/dx of ||dE/dx||^2.
    torch.manual_seed(0)
    w = torch.randn(5, 10, dtype=torch.float64)

    def penalty(energy_fn, x):
        (g,) = torch.autograd.grad(energy_fn(torch.tanh(x @ w)).sum(), [x], create_graph=True)
        (gx,) = torch.autograd.grad(g.pow(2).sum(), [x])
        return gx

    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(penalty(ops.energy, x), penalty(lambda t: -torch.logsumexp(t, 1), x))


def test_extreme_values(device):
    big = 1e30
    ninf = float("-inf")
    logits = torch.tensor(
        [[big, big, 0.0], [ninf, 2.0, ninf], [-big, -big, -big]], device=device, requires_grad=True
    )
    e = ops.energy(logits)
    want = torch.tensor([-(big + torch.log(torch.tensor(2.0)).item()), -2.0, big])
    torch.testing.assert_close(e.cpu(), want)
    e.sum().backward()
    g = logits.grad.cpu()
    assert not torch.isnan(g).any()
    torch.testing.assert_close(g[0], torch.tensor([-0.5, -0.5, 0.0]))
    torch.testing.assert_close(g[1], torch.tensor([0.0, -1.0, 0.0]))
    torch.testing.assert_close(g[2], torch.full((3,), -1 / 3))


NAN, INF = float("nan"), float("inf")
# Rows of three logits with every kind of non-finite content.
NONFINITE_ROWS = [
    [NAN, NAN, NAN],
    [1.0, NAN, INF],
    [NAN, 0.0, 1.0],
    [NAN, -INF, -INF],
    [INF, 0.0, 1.0],
    [INF, INF, -INF],
    [INF, -INF, 2.0],
    [-INF, -INF, -INF],
    [-INF, 3.0, -INF],
    [0.5, -1.0, 2.0],
]


def lse_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-torch.logsumexp in float64 and its gradient (autograd) for upstream ones."""
    ref = logits.detach().double().cpu().requires_grad_(True)
    e = -torch.logsumexp(ref, 1)
    e.sum().backward()
    return e.detach(), ref.grad


def assert_close_nan(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Equal NaN positions, equal infinities, finite values close."""
    got = got.double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_logits_follow_torch_logsumexp(device, dtype):
    # NaN anywhere -> NaN; else +inf -> E = -inf; all -inf -> E = +inf; and
    # the gradient of autograd through torch.logsumexp, NaN positions included.
    logits = torch.tensor(NONFINITE_ROWS, dtype=dtype, device=device, requires_grad=True)
    want, want_grad = lse_reference(logits)
    e = ops.energy(logits)
    assert_close_nan(e, want, TOL[dtype])
    e.sum().backward()
    assert_close_nan(logits.grad, want_grad, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_energy_ce_nonfinite_logits_follow_torch_logsumexp(device, dtype):
    logits = torch.tensor(NONFINITE_ROWS, dtype=dtype, device=device, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 2, 1, 1, 2], device=device)
    ref = logits.detach().double().cpu().requires_grad_(True)
    lse = torch.logsumexp(ref, 1)
    want_ce = lse - ref.gather(1, y.cpu().unsqueeze(1)).squeeze(1)
    (want_ce.sum() - lse.sum()).backward()
    e, ce = ops.energy_ce(logits, y)
    assert_close_nan(e, -lse.detach(), TOL[dtype])
    assert_close_nan(ce, want_ce.detach(), TOL[dtype])
    (e.sum() + ce.sum()).backward()
    assert_close_nan(logits.grad, ref.grad, TOL[dtype])


@pytest.mark.parametrize("scale", [1e3, 3e3, 1e4])
def test_energy_ce_cross_entropy_precise_for_large_logits(device, scale):
    # lse - l_y of two numbers near 1e4 would lose the digits that matter.
    # Spread logits and logits around a large common offset (small CE).
    spread = make_logits(128, 10, torch.float32, device, scale=scale, seed=3)
    offset = make_logits(128, 10, torch.float32, device, seed=4) + scale * torch.tensor(
        [[1.0], [-1.0]], device=device
    ).repeat(64, 1)
    logits = torch.cat([spread, offset])
    y = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(1)).to(device)
    _, ce = ops.energy_ce(logits, y)
    want = F.cross_entropy(logits.double(), y, reduction="none")
    torch.testing.assert_close(ce.double(), want, rtol=2e-6, atol=2e-6)


def test_energy_ce_without_labels_says_they_are_required():
    with pytest.raises(RuntimeError, match=r"energy_ce: y \(int64 class labels.*required"):
        ops.energy_ce(torch.zeros(3, 4), None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_float32(device, dtype):
    # 1000 equal logits: a half-precision running sum would be off by ~1 in lse.
    logits = torch.full((3, 1000), 2.0, dtype=dtype, device=device)
    want = -(2.0 + torch.log(torch.tensor(1000.0, dtype=torch.float64)))
    torch.testing.assert_close(
        ops.energy(logits).double().cpu(), want.expand(3), rtol=TOL[dtype], atol=TOL[dtype] * 10
    )


def test_non_contiguous_and_empty(device):
    base = make_logits(10, 24, torch.float32, device)
    for logits in (base.t().contiguous().t(), base[:, ::2], base[::3]):
        assert not logits.is_contiguous() or logits.shape[0] < 10
        torch.testing.assert_close(ops.energy(logits).double(), energy_reference(logits))
    empty = torch.zeros(0, 5, device=device, requires_grad=True)
    e = ops.energy(empty)
    assert e.shape == (0,)
    e.sum().backward()
    assert empty.grad.shape == (0, 5)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 40),
    c=st.integers(1, 300),
    scale=st.floats(0.01, 100.0),
    shift=st.floats(-1e4, 1e4),
)
def test_energy_property_matches_reference(b, c, scale, shift):
    logits = torch.randn(b, c, dtype=torch.float64) * scale + shift
    torch.testing.assert_close(
        ops.energy(logits.float()).double(),
        energy_reference(logits.float()),
        rtol=3e-6,
        atol=3e-6 * (abs(shift) + scale),
    )
    torch.testing.assert_close(ops.energy(logits), energy_reference(logits), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.energy(torch.zeros(3)), "logits must be 2-D"),
        (lambda: ops.energy(torch.zeros(3, 0)), "at least one class"),
        (lambda: ops.energy(torch.zeros(3, 4, dtype=torch.int64)), "logits must be float32"),
        (
            lambda: ops.energy(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int32)),
            "y must be int64",
        ),
        (
            lambda: ops.energy(torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64)),
            r"y must have shape \[3\]",
        ),
        (
            lambda: ops.energy(torch.zeros(3, 4), torch.tensor([0, 4, 1])),
            r"y\[1\] = 4 is out of range",
        ),
        (lambda: ops.energy_ce(torch.zeros(3, 4), torch.tensor([0, -1, 1])), "out of range for 4"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_opcheck():
    logits = torch.randn(5, 10, requires_grad=True)
    y = torch.randint(0, 10, (5,))
    torch.library.opcheck(torch.ops.jem_ext.energy.default, (logits,))
    torch.library.opcheck(torch.ops.jem_ext.energy.default, (logits, y))
    torch.library.opcheck(torch.ops.jem_ext.energy_ce.default, (logits, y))
    g = torch.randn(5, requires_grad=True)
    torch.library.opcheck(
        torch.ops.jem_ext.energy_backward.default,
        (logits.detach().requires_grad_(True), y, None, g, g),
    )
    # the kept-softmax energy (C++ autograd) and the pair its autograd uses
    torch.library.opcheck(torch.ops.jem_ext._energy_kept_softmax.default, (logits,))
    torch.library.opcheck(torch.ops.jem_ext._energy_softmax.default, (logits.detach(),))
    probs = torch.softmax(logits.detach(), 1)
    torch.library.opcheck(torch.ops.jem_ext._energy_softmax_backward_.default, (probs, g.detach()))


# On the CPU, energy() with a backward ahead keeps the forward's softmax
# (_energy_softmax) and its backward needs no exp; every other call recomputes
# it in energy_backward. Both must give the same gradients, values and NaNs.


def _grad_node_names(t: torch.Tensor) -> str:
    return t.grad_fn.name() if t.grad_fn is not None else ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_energy_keeps_the_softmax_on_the_cpu_when_a_backward_follows(dtype):
    logits = make_logits(9, 10, dtype, "cpu").requires_grad_(True)
    assert "KeptSoftmax" in _grad_node_names(ops.energy(logits))
    assert "KeptSoftmax" not in _grad_node_names(ops.energy(logits, torch.zeros(9).long()))
    with torch.no_grad():
        assert ops.energy(logits).grad_fn is None
    half = make_logits(9, 10, torch.float16, "cpu").requires_grad_(True)
    assert "KeptSoftmax" not in _grad_node_names(ops.energy(half))


@pytest.mark.parametrize("c", [1, 3, 10, 16, 17, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kept_softmax_gradient_equals_the_recomputed_one(dtype, c):
    logits = make_logits(300, c, dtype, "cpu", scale=6.0)
    if c > 1:
        logits[0, 0] = float("nan")
        logits[1, :] = float("-inf")
        logits[2, c - 1] = float("inf")
        logits[3, :] = 1e30
        logits[4, 0] = -1e30
    g = torch.randn(300, dtype=dtype)
    g[5] = float("inf")
    lr = logits.clone().requires_grad_(True)
    e = ops.energy(lr)
    (got,) = torch.autograd.grad(e, [lr], g)
    want = torch.ops.jem_ext.energy_backward(logits, None, None, -g, None)
    assert_close_nan(got, want.double(), TOL[dtype])
    # and from an expanded gradient (a sum's backward hands one over)
    (got_sum,) = torch.autograd.grad(ops.energy(lr).sum(), [lr])
    want_sum = torch.ops.jem_ext.energy_backward(logits, None, None, -torch.ones_like(g), None)
    assert_close_nan(got_sum, want_sum.double(), TOL[dtype])
    # and the energies are those of the energy op
    same = torch.ops.jem_ext.energy.default(logits, None)
    torch.testing.assert_close(e.detach(), same, rtol=0, atol=0, equal_nan=True)


def test_kept_softmax_survives_retain_graph_and_create_graph():
    logits = make_logits(6, 10, torch.float64, "cpu").requires_grad_(True)
    e = ops.energy(logits)
    (g1,) = torch.autograd.grad(e.sum(), [logits], retain_graph=True)
    (g1b,) = torch.autograd.grad(e.sum(), [logits], retain_graph=True)  # the softmax is spent
    (g2,) = torch.autograd.grad(e.sum(), [logits], create_graph=True)
    torch.testing.assert_close(g1, g1b)
    torch.testing.assert_close(g1, g2)
    # the first gradient is not changed by the later backwards
    torch.testing.assert_close(g1, -torch.softmax(logits.detach(), 1))
    # second order through the create_graph backward: d/dl sum(g2 ** 2)
    (h,) = torch.autograd.grad((g2**2).sum(), [logits])
    ref = logits.detach().clone().requires_grad_(True)
    (rg,) = torch.autograd.grad((-ref.logsumexp(1)).sum(), [ref], create_graph=True)
    (rh,) = torch.autograd.grad((rg**2).sum(), [ref])
    torch.testing.assert_close(h, rh)


def test_softmax_backward_bad_inputs_raise_clear_errors():
    probs = torch.rand(4, 10)
    with pytest.raises(RuntimeError, match="grad_energy"):
        torch.ops.jem_ext._energy_softmax_backward_(probs, torch.ones(5))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.jem_ext._energy_softmax_backward_(torch.rand(10, 4).t(), torch.ones(4))
    with pytest.raises(RuntimeError, match="_energy_softmax"):
        torch.ops.jem_ext._energy_softmax(torch.ones(4))


@pytest.mark.cuda
@pytest.mark.parametrize("c", [1, 10, 33, 257, 1000, 2049, 4096, 100_000])
def test_cuda_matches_cpu(c):
    logits = make_logits(70, c, torch.float32, "cpu")
    y = torch.randint(0, c, (70,))
    for fn in (lambda t, yy: ops.energy(t), ops.energy, ops.energy_ce):
        lc = logits.clone().requires_grad_(True)
        lg = logits.cuda().requires_grad_(True)
        oc, og = fn(lc, y), fn(lg, y.cuda())
        oc = oc if isinstance(oc, tuple) else (oc,)
        og = og if isinstance(og, tuple) else (og,)
        for a, b in zip(oc, og):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
        sum(o.sum() for o in oc).backward()
        sum(o.sum() for o in og).backward()
        torch.testing.assert_close(lg.grad.cpu(), lc.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "c"), [(3, 1000), (2000, 1000), (5, 3001), (2, 100_000), (7, 77)])
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_rows_of_many_classes_match_the_reference(dtype, b, c, offset):
    # Small and large batches take the block and the warp layouts; offset 1
    # starts the rows off any 16-byte boundary (the vector loads' scalar head).
    flat = make_logits(b * c + 1, 1, dtype, "cuda").flatten()
    logits = flat[offset : offset + b * c].view(b, c)
    assert (logits.data_ptr() % 16 == 0) == (offset == 0)
    logits.requires_grad_(True)
    y = torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(3)).cuda()
    ref = logits.detach().double()
    tol = TOL[dtype] * max(1.0, math.log(c))
    e, ce = ops.energy_ce(logits, y)
    torch.testing.assert_close(e.double(), -torch.logsumexp(ref, 1), rtol=tol, atol=tol)
    want_ce = F.cross_entropy(ref, y, reduction="none")
    torch.testing.assert_close(ce.double(), want_ce, rtol=tol, atol=tol)
    (g,) = torch.autograd.grad(ops.energy(logits).sum(), [logits])
    torch.testing.assert_close(g.double(), -torch.softmax(ref, 1), rtol=tol, atol=tol)


def test_second_order_nonfinite_follows_torch_logsumexp():
    w = torch.linspace(-1.0, 1.0, 3, dtype=torch.float64)

    def hessian_times_w(energy_fn):
        x = torch.tensor(NONFINITE_ROWS, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(energy_fn(x).sum(), [x], create_graph=True)
        (h,) = torch.autograd.grad((g * w).sum(), [x])
        return h

    want = hessian_times_w(lambda t: -torch.logsumexp(t, 1))
    assert_close_nan(hessian_times_w(ops.energy), want, 1e-10)


# ---------------------------------------------------------------- bad labels
# The CPU kernels raise at once; the CUDA kernels give NaN rows and record the
# first bad label, which ops.raise_label_errors turns into the same message.

BAD_LABEL_CALLS = {
    "energy": lambda logits, y: ops.energy(logits, y),
    "energy_ce": lambda logits, y: ops.energy_ce(logits, y),
    "energy_backward": lambda logits, y: torch.ops.jem_ext.energy_backward(
        logits, y, None, None, torch.ones(logits.shape[0], device=logits.device)
    ),
}


def _cpu_message(op, label):
    logits, y = torch.zeros(3, 4), torch.tensor([0, label, 1])
    with pytest.raises(RuntimeError) as err:
        BAD_LABEL_CALLS[op](logits, y)
    return str(err.value)


@pytest.mark.parametrize("op", list(BAD_LABEL_CALLS))
@pytest.mark.parametrize("label", [4, -1, 2**40])
def test_label_record_raises_the_cpu_kernels_message(op, label):
    code = {v: k for k, v in ops._LABEL_ERROR_OPS.items()}[op]
    want = _cpu_message(op, label)
    assert want == f"{op}: label y[1] = {label} is out of range for 4 classes"
    with pytest.raises(RuntimeError) as err:
        ops.check_label_record(torch.tensor([code, 1, label, 4]))
    assert str(err.value) == want
    ops.check_label_record(torch.zeros(4, dtype=torch.int64))  # op 0: nothing recorded


def test_raise_label_errors_is_a_no_op_on_the_cpu():
    with pytest.raises(RuntimeError):
        ops.energy(torch.zeros(3, 4), torch.tensor([0, 4, 1]))
    assert "raise_label_errors" in ops.__all__
    assert ops.label_error_record("cpu").tolist() == [0, 0, 0, 0]
    ops.raise_label_errors("cpu")
    ops.raise_label_errors(torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("op", list(BAD_LABEL_CALLS))
@pytest.mark.parametrize("c", [4, 40, 3000])
def test_cuda_bad_labels_give_nan_rows_and_a_deferred_cpu_message(op, c):
    ops.raise_label_errors("cuda")  # nothing left over from other tests
    logits = torch.zeros(3, c, device="cuda")
    y = torch.tensor([0, c, 1], device="cuda")
    out = BAD_LABEL_CALLS[op](logits, y)  # no raise, no host sync
    rows = out[1] if isinstance(out, tuple) else out
    assert torch.isnan(rows[1]).all() and not torch.isnan(rows[[0, 2]]).any()
    with pytest.raises(RuntimeError) as err:
        ops.raise_label_errors("cuda")
    assert str(err.value) == f"{op}: label y[1] = {c} is out of range for {c} classes"
    ops.raise_label_errors("cuda")  # taken: cleared
    torch.cuda.synchronize()  # the context is still usable
    assert ops.energy(logits).sum().item() == pytest.approx(-3 * math.log(c))


@pytest.mark.cuda
def test_cuda_labelled_energy_calls_do_not_synchronise():
    logits = torch.randn(64, 10, device="cuda", requires_grad=True)
    y = torch.randint(0, 10, (64,), device="cuda")
    for _ in range(2):  # the second round runs with lazy initialisation done
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            e, ce = ops.energy_ce(logits, y)
            (e.sum() + ce.sum() + ops.energy(logits, y).sum()).backward()
            record = ops.label_error_record("cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert record.tolist() == [0, 0, 0, 0]


@pytest.mark.cuda
def test_cuda_bad_labels_under_graph_capture_give_nan_rows():
    # No host read while capturing: the row of the bad label becomes NaN, and
    # the record written by the replay raises afterwards.
    ops.raise_label_errors("cuda")
    logits = torch.zeros(3, 4, device="cuda")
    y = torch.tensor([0, 7, 1], device="cuda")
    ops.energy_ce(logits, torch.zeros(3, dtype=torch.int64, device="cuda"))  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        e, ce = ops.energy_ce(logits, y)
    ops.raise_label_errors("cuda")  # capturing ran nothing
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(ce[1]) and not torch.isnan(ce[[0, 2]]).any()
    assert not torch.isnan(e).any()
    with pytest.raises(RuntimeError, match=r"^energy_ce: label y\[1\] = 7 is out of range for 4"):
        ops.raise_label_errors("cuda")


# The float32 CPU loops for up to 16 classes run 16 rows (AVX-512) or 8 rows
# (AVX2) at a time, with exps that skip their range checks when a whole group
# is in range: every class count of those loops, batches that end in a
# partial group, and special rows each in a group of its own among regular
# groups, against float64 torch.logsumexp and its gradient.
@pytest.mark.parametrize("c", range(2, 17))
@pytest.mark.parametrize("b", [1, 7, 16, 17, 40, 205])
def test_rows_of_few_classes_match_torch_in_every_group(b, c):
    logits = make_logits(b, c, torch.float32, "cpu", scale=5.0, seed=c)
    specials = {
        17: lambda row: row.fill_(float("nan")),
        18: lambda row: row.__setitem__(0, float("nan")),
        19: lambda row: row.__setitem__(c - 1, float("inf")),
        20: lambda row: row.fill_(float("-inf")),
        36: lambda row: row.__setitem__(0, row.max() - 100.0),  # exp underflows to 0
        37: lambda row: row.__setitem__(0, row.max() - 87.3),  # a tiny exp, in range
        38: lambda row: row.add_(1e4),  # large logits
    }
    for r, set_row in specials.items():
        if r < b:
            set_row(logits[r])
    lr = logits.clone().requires_grad_(True)
    g = torch.randn(b)
    e = ops.energy(lr)
    (got,) = torch.autograd.grad(e, [lr], g)
    ref = logits.double().requires_grad_(True)
    want_e = -torch.logsumexp(ref, 1)
    (want,) = torch.autograd.grad(want_e, [ref], g.double())
    assert_close_nan(e.detach(), want_e.detach(), TOL[torch.float32])
    assert_close_nan(got, want, TOL[torch.float32])
    lse_only = torch.ops.jem_ext.energy.default(logits, None)
    torch.testing.assert_close(lse_only, e.detach(), rtol=0, atol=0, equal_nan=True)
    y = torch.arange(b) % c
    energy, ce = ops.energy_ce(logits, y)
    torch.testing.assert_close(energy, e.detach(), rtol=0, atol=0, equal_nan=True)
    want_ce = want_e.detach() + ref.detach().gather(1, y[:, None])[:, 0]
    assert_close_nan(ce, -want_ce, TOL[torch.float32])
