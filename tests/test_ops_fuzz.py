"""Property-based fuzz of the ops against float64 torch references: shapes,
dtypes, strided layouts, NaN/inf values and memory overlap. Derandomized, so
every run draws the same cases."""

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import philox_normals, sgld_reference
from torch.func import grad, vmap

from jem_ext import ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 3e-2}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e4, -1e4, 60.0, -60.0]


@st.composite
def logit_values(draw, n):
    """n logits: mostly normal values, some special ones (NaN, +/-inf, large)."""
    special = draw(st.floats(0.0, 0.4))
    scale = draw(st.sampled_from([0.1, 3.0, 100.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(n, generator=g, dtype=torch.float64) * scale
    pick = torch.rand(n, generator=g) < special
    idx = torch.randint(0, len(SPECIAL), (n,), generator=g)
    return torch.where(pick, torch.tensor(SPECIAL, dtype=torch.float64)[idx], vals)


LAYOUTS = ["contiguous", "transposed", "strided_columns", "strided_rows"]


def lay_out(values: torch.Tensor, b: int, c: int, layout: str) -> torch.Tensor:
    """A [b, c] tensor holding `values` (row-major) in the given memory layout."""
    m = values.view(b, c)
    if layout == "transposed":
        return m.t().contiguous().t()
    if layout == "strided_columns":
        wide = torch.zeros(b, 2 * c, dtype=m.dtype)
        wide[:, ::2] = m
        return wide[:, ::2]
    if layout == "strided_rows":
        tall = torch.zeros(2 * b, c, dtype=m.dtype)
        tall[::2] = m
        return tall[::2]
    return m


def assert_matches(
    got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | float = 1.0
) -> None:
    """NaN exactly where the reference has NaN, the same infinities, and
    |got - want| <= tol * (scale + |want|) elsewhere (scale per element or row)."""
    got = got.detach().double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]) and not torch.isinf(got[~inf]).any(), (got, want)
    finite = torch.isfinite(want)
    bound = TOL[dtype] * (torch.as_tensor(scale, dtype=torch.float64).expand_as(want) + want.abs())
    excess = ((got - want).abs() - bound)[finite]
    assert not (excess > 0).any(), (got, want)


@st.composite
def logits_case(draw):
    b = draw(st.integers(0, 6))
    c = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    values = draw(logit_values(b * c))
    logits = lay_out(values.to(dtype), b, c, layout)
    labels = draw(st.lists(st.integers(0, c - 1), min_size=b, max_size=b))
    return logits, torch.tensor(labels, dtype=torch.int64)


def row_scale(logits: torch.Tensor) -> torch.Tensor:
    """Magnitude of each row's finite logits (at least 1): the scale of its lse."""
    a = logits.double().abs()
    a = torch.where(torch.isfinite(a), a, 0.0)
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1).amax(1)


@FUZZ
@given(case=logits_case(), with_labels=st.booleans())
def test_energy_matches_float64_logsumexp(case, with_labels):
    logits, y = case
    ref = logits.detach().double().requires_grad_(True)
    want = -(ref.gather(1, y.unsqueeze(1)).squeeze(1) if with_labels else torch.logsumexp(ref, 1))
    upstream = torch.linspace(-1.0, 2.0, logits.shape[0], dtype=torch.float64)
    (want * upstream).sum().backward()
    x = logits.clone().requires_grad_(True)
    e = ops.energy(x, y if with_labels else None)
    assert e.dtype == logits.dtype
    assert_matches(e, want.detach(), logits.dtype, row_scale(logits))
    (e * upstream.to(e.dtype)).sum().backward()
    assert_matches(x.grad, ref.grad, logits.dtype, 2.0)


@FUZZ
@given(case=logits_case())
def test_energy_ce_matches_float64_reference(case):
    logits, y = case
    ref = logits.detach().double().requires_grad_(True)
    lse = torch.logsumexp(ref, 1)
    want_ce = lse - ref.gather(1, y.unsqueeze(1)).squeeze(1)
    g_e = torch.linspace(-1.0, 1.0, logits.shape[0], dtype=torch.float64)
    g_ce = torch.linspace(2.0, 0.5, logits.shape[0], dtype=torch.float64)
    (-lse * g_e + want_ce * g_ce).sum().backward()
    x = logits.clone().requires_grad_(True)
    e, ce = ops.energy_ce(x, y)
    assert_matches(e, -lse.detach(), logits.dtype, row_scale(logits))
    # Finite rows: the cross-entropy itself is well conditioned (no lse scale).
    assert_matches(ce, want_ce.detach(), logits.dtype)
    (e * g_e.to(e.dtype) + ce * g_ce.to(ce.dtype)).sum().backward()
    assert_matches(x.grad, ref.grad, logits.dtype, 4.0)


# Forward mode and torch.func: the tangent (forward_ad dual tensors), the
# per-sample gradients of vmap(grad) and the vmap'ed values, for every op and
# dtype and layout, against the same transforms of the float64 reference.
# Finite logits: torch's own forward-mode formula for logsumexp puts its NaNs
# elsewhere than its reverse-mode one on non-finite rows.

TRANSFORM_OPS = {
    "energy": (lambda z, y: ops.energy(z), lambda z, y: -torch.logsumexp(z, 1)),
    "energy_y": (
        lambda z, y: ops.energy(z, y),
        lambda z, y: -z.gather(1, y.unsqueeze(1)).squeeze(1),
    ),
    "energy_ce": (
        lambda z, y: sum(ops.energy_ce(z, y)) + ops.energy_ce(z, y)[1],
        lambda z, y: (
            2 * torch.logsumexp(z, 1)
            - 2 * z.gather(1, y.unsqueeze(1)).squeeze(1)
            - torch.logsumexp(z, 1)
        ),
    ),
}


@FUZZ
@given(case=logits_case(), op=st.sampled_from(list(TRANSFORM_OPS)), seed=st.integers(0, 2**16))
def test_forward_mode_and_vmap_grad_match_float64_reference(case, op, seed):
    logits, y = case
    logits = torch.where(torch.isfinite(logits), logits, torch.zeros((), dtype=logits.dtype))
    f, ref = TRANSFORM_OPS[op]
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(logits.shape, generator=g, dtype=torch.float64)
    with fwAD.dual_level():
        got_t = fwAD.unpack_dual(f(fwAD.make_dual(logits, t.to(logits.dtype)), y)).tangent
        want_t = fwAD.unpack_dual(ref(fwAD.make_dual(logits.double(), t), y)).tangent
    assert got_t is not None and got_t.dtype == logits.dtype
    if logits.shape[0] == 0:
        assert got_t.shape == (0,)
        return
    assert_matches(got_t, want_t, logits.dtype, 4.0 * t.abs().amax().item() + 1.0)
    # per-sample gradients: each row as a batch of one
    rows, labels = logits.unsqueeze(1), y.unsqueeze(1)
    got_g = vmap(grad(lambda z, yy: f(z, yy).sum()))(rows, labels)
    want_g = vmap(grad(lambda z, yy: ref(z, yy).sum()))(rows.double(), labels)
    assert_matches(got_g, want_g, logits.dtype, 4.0)
    got_v = vmap(f)(rows, labels)
    assert_matches(
        got_v, vmap(ref)(rows.double(), labels).detach(), logits.dtype, row_scale(logits)[:, None]
    )


# ------------------------------------------------------------------ sgld_step_

SGLD_TOL = {torch.float32: 2e-6, torch.float64: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@st.composite
def sgld_case(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    n = math.prod(shape)
    x = draw(logit_values(n)).clamp(-50, 50).to(dtype).view(shape)
    grad = draw(logit_values(n)).to(dtype).view(shape)
    if len(shape) > 1 and draw(st.booleans()):
        x = x.transpose(0, -1).contiguous().transpose(0, -1)  # column-major x
        grad = torch.stack([grad, grad], -1)[..., 0]  # strided grad
    step = draw(st.sampled_from([0.0, 0.1, 1.0]))
    std = draw(st.sampled_from([0.0, 0.01, 1.0]))
    lo = draw(st.sampled_from([None, -1.0, -0.5]))
    hi = draw(st.sampled_from([None, 1.0, 0.75]))
    clip = draw(st.sampled_from([None, 0.0, 0.5, 10.0]))
    seed = draw(st.integers(0, 2**64 - 1))
    offset = 4 * draw(st.integers(0, 2**20))
    return (
        x,
        grad,
        dict(
            step_size=step,
            noise_std=std,
            seed=seed,
            offset=offset,
            clamp_min=lo,
            clamp_max=hi,
            grad_clip=clip,
        ),
    )


@FUZZ
@given(case=sgld_case())
def test_sgld_step_matches_float64_reference(case):
    x, grad, kw = case
    xi = torch.from_numpy(philox_normals(x.numel(), kw["seed"], kw["offset"]))
    # The op's noise is float32 Box-Muller: a few ulp from the float64 one.
    xi = xi.float().double().view(x.shape) if x.numel() else xi.view(x.shape)
    want = sgld_reference(
        x,
        grad,
        xi,
        kw["step_size"],
        kw["noise_std"],
        kw["clamp_min"],
        kw["clamp_max"],
        kw["grad_clip"],
    )
    got = ops.sgld_step_philox_(x.clone(), grad, **kw)
    assert got.dtype == x.dtype and got.shape == x.shape
    got = got.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    torch.testing.assert_close(
        got,
        want,
        rtol=SGLD_TOL[x.dtype],
        atol=SGLD_TOL[x.dtype] + 4e-6 * kw["noise_std"],
        equal_nan=True,
    )


@FUZZ
@given(n=st.integers(2, 24), data=st.data())
def test_sgld_step_overlap_refused_or_equal_to_eager(n, data):
    # Two windows of one buffer as x and grad: the same window (grad is x)
    # and disjoint windows run; any other overlap is refused, untouched.
    k = data.draw(st.integers(1, n))
    a = data.draw(st.integers(0, n - k))
    b = data.draw(st.integers(0, n - k))
    base = torch.arange(float(n)) * 0.5 - 3.0
    x, grad = base[a : a + k], base[b : b + k]
    want_x = x.clone() - 0.25 * grad.clone()
    if a == b or abs(a - b) >= k:
        ops.sgld_step_(x, grad, 0.25, 0.0)
        torch.testing.assert_close(x, want_x, rtol=0, atol=0)
    else:
        before = base.clone()
        with pytest.raises(RuntimeError, match="grad shares memory with x"):
            ops.sgld_step_(x, grad, 0.25, 0.0)
        assert torch.equal(base, before)
