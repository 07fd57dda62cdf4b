"""sgld_step_: the update against a float64 reference, the noise against an
independent Philox/Box-Muller, its statistics, layouts, dtypes, errors,
opcheck and torch.compile."""

import math

import numpy as np
import pytest
import torch
from reference import philox4x32_10, philox_normals, sgld_reference
from scipy import stats

from jem_ext import ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-6, torch.float64: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def noise(n, seed, offset=0, device="cpu", dtype=torch.float32):
    """The op's own noise: x = 0, grad = 0, step 0, std 1."""
    x = torch.zeros(n, device=device, dtype=dtype)
    return ops.sgld_step_philox_(x, torch.zeros_like(x), 0.0, 1.0, seed, offset)


# ------------------------------------------------------------- the generator


def test_philox_known_answers():
    # Known-answer vectors of Philox4x32-10 (Random123's kat_vectors).
    ctr = np.array(
        [[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]],
        dtype=np.uint64,
    )
    key = np.array([[0, 0], [0xFFFFFFFF, 0xFFFFFFFF], [0xA4093822, 0x299F31D0]], dtype=np.uint64)
    expected = np.array(
        [
            [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
            [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ],
        dtype=np.uint32,
    )
    np.testing.assert_array_equal(philox4x32_10(ctr, key), expected)


@pytest.mark.parametrize("seed,offset", [(0, 0), (42, 8), (2**40 + 7, 4 * 2**33), (2**64 - 1, 4)])
@pytest.mark.parametrize("n", [1, 3, 4, 1023, 4099])
def test_noise_matches_independent_philox_box_muller(seed, offset, n):
    got = noise(n, seed, offset).double().numpy()
    want = philox_normals(n, seed, offset)
    # float32 polynomials for log/sin/cos: a few ulp of the result.
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_noise_statistics():
    n = 1_000_000
    z = noise(n, seed=1234).double().numpy()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.skew(z)) < 5 * math.sqrt(6) * se
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24) * se
    # Normality (fixed seed, so the p-value is a fixed number, far above 1e-4).
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # Neighbours (also within a Box-Muller pair and across Philox words).
    for lag in (1, 2, 3, 4, 5):
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < 5 * se
    assert abs(np.corrcoef(z[0::4], z[1::4])[0, 1]) < 5 * 2 * se


def test_consecutive_calls_independent_and_seeded_calls_reproducible():
    n = 200_000
    g = torch.Generator().manual_seed(7)
    x1 = torch.zeros(n)
    x2 = torch.zeros(n)
    ops.sgld_step_(x1, torch.zeros(n), 0.0, 1.0, generator=g)
    ops.sgld_step_(x2, torch.zeros(n), 0.0, 1.0, generator=g)
    assert abs(np.corrcoef(x1.numpy(), x2.numpy())[0, 1]) < 5 / math.sqrt(n)
    g.manual_seed(7)
    x3 = torch.zeros(n)
    ops.sgld_step_(x3, torch.zeros(n), 0.0, 1.0, generator=g)
    assert torch.equal(x1, x3)
    # The default generator obeys torch.manual_seed.
    torch.manual_seed(3)
    a = ops.sgld_step_(torch.zeros(10), torch.zeros(10), 0.0, 1.0)
    torch.manual_seed(3)
    b = ops.sgld_step_(torch.zeros(10), torch.zeros(10), 0.0, 1.0)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ the update


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(clamp_min=-1.0, clamp_max=1.0),
        dict(grad_clip=0.05),
        dict(clamp_min=-0.5),
        dict(clamp_max=0.25, grad_clip=1.0),
    ],
)
def test_update_matches_reference(device, dtype, kw):
    torch.manual_seed(0)
    x = (torch.rand(3, 5, 7) * 2 - 1).to(device, dtype)
    grad = torch.randn(3, 5, 7).to(device, dtype)
    xi = noise(x.numel(), 11, 4, device).view_as(x)
    want = sgld_reference(x, grad, xi, 0.3, 0.1, **kw)
    got = ops.sgld_step_philox_(x.clone(), grad, 0.3, 0.1, 11, 4, **kw)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_in_place_and_returns_x():
    x = torch.zeros(16)
    out = ops.sgld_step_(x, torch.ones(16), 0.5, 0.0)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(x, torch.full((16,), -0.5))


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.t(),  # transposed
        lambda t: t[:, ::2],  # strided columns
        lambda t: t.unsqueeze(0).expand(2, -1, -1)[1],  # a view of an expanded tensor's slice
    ],
)
def test_non_contiguous_inputs(make, device):
    torch.manual_seed(1)
    base = torch.randn(6, 8, device=device)
    g_base = torch.randn(6, 8, device=device)
    x = make(base.clone())
    grad = make(g_base.clone())
    want = ops.sgld_step_philox_(x.contiguous(), grad.contiguous(), 0.2, 0.3, 5, 0)
    got = ops.sgld_step_philox_(x, grad, 0.2, 0.3, 5, 0)
    assert torch.equal(got, want) and torch.equal(x, want)


def test_non_contiguous_x_updates_its_storage_only_where_viewed():
    base = torch.zeros(4, 6)
    view = base[:, ::2]
    ops.sgld_step_(view, torch.ones_like(view), 1.0, 0.0)
    assert torch.equal(base[:, ::2], torch.full((4, 3), -1.0))
    assert torch.equal(base[:, 1::2], torch.zeros(4, 3))


@pytest.mark.parametrize("shape", [(0,), (0, 3), (1,), (1, 1, 1)])
def test_empty_and_single_element(shape, device):
    x = torch.zeros(shape, device=device)
    out = ops.sgld_step_(x, torch.ones(shape, device=device), 2.0, 0.0)
    assert out.shape == shape
    assert torch.all(out == -2.0)


def test_nan_propagates_through_clip_and_clamp():
    x = torch.tensor([float("nan"), 0.0])
    g = torch.tensor([0.0, float("nan")])
    ops.sgld_step_(x, g, 1.0, 0.0, clamp_min=-1.0, clamp_max=1.0, grad_clip=1.0)
    assert torch.isnan(x).all()


def test_paper_parameterisation():
    # x - alpha/2 dE/dx + N(0, alpha): step alpha/2, std sqrt(alpha).
    alpha = 0.04
    x = torch.zeros(400_000)
    ops.sgld_step_(
        x,
        torch.full_like(x, 2.0),
        alpha / 2,
        alpha**0.5,
        generator=torch.Generator().manual_seed(0),
    )
    assert abs(x.mean().item() + alpha) < 5 * math.sqrt(alpha / x.numel())
    assert abs(x.var().item() / alpha - 1) < 0.02


# -------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: ops.sgld_step_(
                torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), 1, 0
            ),
            "x must be float32, float64, float16 or bfloat16",
        ),
        (lambda: ops.sgld_step_(torch.zeros(3), torch.zeros(4), 1, 0), "grad must have x's shape"),
        (
            lambda: ops.sgld_step_(torch.zeros(3), torch.zeros(3, dtype=torch.float64), 1, 0),
            "grad must have x's dtype",
        ),
        (
            lambda: ops.sgld_step_(torch.zeros(3), torch.zeros(3), 1, -1.0),
            "noise_std must be finite and >= 0",
        ),
        (
            lambda: ops.sgld_step_(torch.zeros(3), torch.zeros(3), 1, 0, grad_clip=-1.0),
            "grad_clip must be >= 0",
        ),
        (
            lambda: ops.sgld_step_(
                torch.zeros(3), torch.zeros(3), 1, 0, clamp_min=1.0, clamp_max=0.0
            ),
            "clamp_min must be <= clamp_max",
        ),
        (
            lambda: torch.ops.jem_ext._sgld_step_philox_(
                torch.zeros(3), torch.zeros(3), 1.0, 0.0, None, None, None, 0, 3
            ),
            "offset must be a non-negative multiple of 4",
        ),
        (
            lambda: ops.sgld_step_(torch.zeros(3), torch.zeros(3), 1, 0, clamp_min=float("nan")),
            "clamp_min must be a number or None, got nan",
        ),
        (
            lambda: ops.sgld_step_(
                torch.zeros(3), torch.zeros(3), 1, 0, clamp_min=0.0, clamp_max=float("nan")
            ),
            "clamp_max must be a number or None, got nan",
        ),
        (
            lambda: ops.sgld_step_philox_(
                torch.zeros(3), torch.zeros(3), 1, 0, seed=0, clamp_max=float("nan")
            ),
            "clamp_max must be a number or None",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# The scalar arguments take real numbers (Python and NumPy ints and floats,
# 0-dim real tensors), as torch's own float arguments do, but no bools: each
# refusal is a TypeError naming the argument.
SCALAR_ARGS = ["step_size", "noise_std", "clamp_min", "clamp_max", "grad_clip"]
NOT_REAL = {
    "str": "2",
    "bool": True,
    "numpy_bool": np.bool_(True),
    "complex": 1 + 2j,
    "list": [1.0],
    "tensor_1_element": torch.tensor([2.0]),
    "tensor_2_elements": torch.tensor([1.0, 2.0]),
    "bool_tensor": torch.tensor(True),
}


def _sgld_kwargs(**override):
    kw = dict(step_size=0.5, noise_std=0.0, clamp_min=-1.0, clamp_max=1.0, grad_clip=1.0)
    kw.update(override)
    return kw


@pytest.mark.parametrize("value", list(NOT_REAL))
@pytest.mark.parametrize("name", SCALAR_ARGS)
@pytest.mark.parametrize("philox", [False, True])
def test_scalar_arguments_refuse_what_is_not_a_real_number(name, value, philox):
    x = torch.zeros(3)
    call = (
        (lambda **kw: ops.sgld_step_philox_(x, torch.ones(3), seed=1, **kw))
        if philox
        else (lambda **kw: ops.sgld_step_(x, torch.ones(3), **kw))
    )
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        call(**_sgld_kwargs(**{name: NOT_REAL[value]}))
    assert torch.equal(x, torch.zeros(3))  # nothing written


@pytest.mark.parametrize(
    "value", [2, 2.0, np.float32(2.0), np.int64(2), torch.tensor(2.0), torch.tensor(2)]
)
def test_scalar_arguments_take_numbers_and_0_dim_tensors(value):
    x = torch.zeros(3)
    ops.sgld_step_(x, torch.ones(3), step_size=value, noise_std=0.0)
    torch.testing.assert_close(x, torch.full((3,), -2.0))


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("value", [True, 4.0, "4"])
def test_philox_seed_and_offset_refuse_what_is_not_an_int(name, value):
    with pytest.raises(TypeError, match=f"{name} must be an int"):
        ops.sgld_step_philox_(torch.zeros(3), torch.ones(3), 1.0, 0.0, **{"seed": 1, name: value})


@pytest.mark.parametrize("name", ["step_size", "noise_std"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("raw", [False, True])
def test_step_size_and_noise_std_must_be_finite(name, value, raw):
    kw = {"step_size": 0.5, "noise_std": 0.1, name: value}
    x = torch.zeros(3)
    call = torch.ops.jem_ext.sgld_step_ if raw else ops.sgld_step_
    with pytest.raises(RuntimeError, match=f"{name} must be finite"):
        call(x, torch.ones(3), kw["step_size"], kw["noise_std"])
    assert torch.equal(x, torch.zeros(3))


def test_infinite_bounds_and_clip_mean_no_bound():
    x = torch.zeros(3)
    ops.sgld_step_(x, torch.ones(3), 2.0, 0.0, -math.inf, math.inf, math.inf)
    torch.testing.assert_close(x, torch.full((3,), -2.0))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(seed=2**64), r"seed must be in \[0, 2\*\*64 - 1\], got 18446744073709551616"),
        (dict(seed=-1), r"seed must be in \[0, 2\*\*64 - 1\], got -1"),
        (dict(seed=0, offset=3), r"offset must be a multiple of 4 in \[0, 2\*\*63 - 4\], got 3"),
        (dict(seed=0, offset=-4), r"offset must be a multiple of 4 in \[0, 2\*\*63 - 4\]"),
        (dict(seed=0, offset=2**63), r"offset must be a multiple of 4 in \[0, 2\*\*63 - 4\]"),
    ],
)
def test_philox_seed_and_offset_out_of_range_name_the_range(kw, match):
    with pytest.raises(ValueError, match=match):
        ops.sgld_step_philox_(torch.zeros(3), torch.zeros(3), 1.0, 0.0, **kw)


def test_philox_seed_range_ends_are_accepted():
    for seed in (0, 2**63 - 1, 2**63, 2**64 - 1):
        ops.sgld_step_philox_(torch.zeros(3), torch.zeros(3), 1.0, 1.0, seed, 2**63 - 4)


# ------------------------------------------------------------------ aliasing


@pytest.mark.parametrize(
    "views",
    [
        lambda b: (b[1:], b[:-1]),  # shifted by one element
        lambda b: (b[:4], b[2:6]),  # half overlapping
        lambda b: (b[:6].view(2, 3), b[:6].view(3, 2).t()),  # same memory, other layout
        lambda b: (b[:6].view(2, 3)[:, ::2], b[1:7].view(2, 3)[:, ::2]),  # strided views
    ],
)
def test_partially_overlapping_grad_is_refused(views, device):
    base = torch.arange(7.0, device=device)
    x, grad = views(base)
    before = base.clone()
    with pytest.raises(RuntimeError, match="grad shares memory with x"):
        ops.sgld_step_(x, grad, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="grad shares memory with x"):
        ops.sgld_step_philox_(x, grad, 1.0, 0.0, seed=0)
    assert torch.equal(base, before)


def test_expanded_x_is_refused(device):
    x = torch.zeros(3, device=device).expand(4, 3)
    with pytest.raises(RuntimeError, match="x has elements that share memory"):
        ops.sgld_step_(x, torch.zeros(4, 3, device=device), 1.0, 0.0)


def test_grad_that_is_x_or_disjoint_views_of_one_buffer_is_allowed(device):
    base = torch.arange(8.0, device=device)
    ops.sgld_step_(base, base, 0.5, 0.0)  # x <- x - 0.5 x
    assert torch.equal(base, torch.arange(8.0, device=device) * 0.5)
    base = torch.arange(8.0, device=device)
    ops.sgld_step_(base[:4], base[4:], 1.0, 0.0)
    assert torch.equal(base[:4], torch.full((4,), -4.0, device=device))


def test_refuses_tensors_that_require_grad():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.sgld_step_(x, torch.zeros(3), 1.0, 0.0)
    with torch.no_grad():
        ops.sgld_step_(x, torch.ones(3), 1.0, 0.0)
    assert torch.equal(x.detach(), -torch.ones(3))


def test_bumps_version_counter():
    x = torch.zeros(3)
    v = x._version
    ops.sgld_step_(x, torch.zeros(3), 1.0, 0.0)
    assert x._version > v


# ------------------------------------------------------ opcheck and compile


def test_opcheck():
    x = torch.randn(5, 3)
    g = torch.randn(5, 3)
    # Noise-free calls: opcheck compares repeated runs, which random noise would fail.
    torch.library.opcheck(
        torch.ops.jem_ext.sgld_step_.default,
        (x.clone(), g, 0.1, 0.0),
        {"clamp_min": -1.0, "clamp_max": 1.0},
    )
    torch.library.opcheck(
        torch.ops.jem_ext._sgld_step_philox_.default,
        (x.clone(), g, 0.1, 0.5, None, None, 0.3, 17, 8),
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    # Both ops in one graph: the energy terms of a JEM loss (with their fused
    # backward) and an in-place SGLD step on a chain tensor.
    def fn(x, w, y, z, z2, gz):
        logits = x @ w
        e, ce = ops.energy_ce(logits, y)
        loss = (ops.energy(logits) + e + ce).mean()
        ops.sgld_step_philox_(z, gz, 0.1, 0.05, 9, 4, clamp_min=-1.0, clamp_max=1.0)
        ops.sgld_step_(z2, gz, 0.1, 0.05, grad_clip=0.5)  # noise from the default generator
        return loss

    def run(f):
        torch.manual_seed(0)
        x, w = torch.randn(8, 4), torch.randn(4, 10, requires_grad=True)
        y = torch.randint(0, 10, (8,))
        z, gz = torch.rand(5, 3), torch.randn(5, 3)
        z2 = z.clone()
        loss = f(x, w, y, z, z2, gz)
        loss.backward()
        return loss.detach(), w.grad, z, z2

    eager = run(fn)
    compiled = run(torch.compile(fn, fullgraph=True, backend=backend))
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 5, 4096, 1_000_003])
def test_cuda_noise_equals_cpu_bitwise(n):
    cpu = noise(n, 123, 40)
    gpu = noise(n, 123, 40, device="cuda").cpu()
    assert torch.equal(cpu, gpu)


@pytest.mark.cuda
def test_cuda_generator_reproducible_and_graph_capturable():
    g = torch.Generator(device="cuda").manual_seed(5)
    a = ops.sgld_step_(
        torch.zeros(1000, device="cuda"), torch.zeros(1000, device="cuda"), 0, 1, generator=g
    )
    b = ops.sgld_step_(
        torch.zeros(1000, device="cuda"), torch.zeros(1000, device="cuda"), 0, 1, generator=g
    )
    assert not torch.equal(a, b)
    g.manual_seed(5)
    a2 = ops.sgld_step_(
        torch.zeros(1000, device="cuda"), torch.zeros(1000, device="cuda"), 0, 1, generator=g
    )
    assert torch.equal(a, a2)
    # The generator's Philox state is (seed, offset 0) then (seed, 4): the
    # first call equals the explicit-seed op at offset 0.
    assert torch.equal(a, noise(1000, 5, 0, device="cuda"))
    x = torch.zeros(1 << 16, device="cuda")
    grad = torch.zeros_like(x)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.sgld_step_(x, grad, 0.0, 1.0)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        ops.sgld_step_(x, grad, 0.0, 1.0)
    x.zero_()
    graph.replay()
    first = x.clone()
    x.zero_()
    graph.replay()
    assert not torch.equal(first, x)  # each replay draws fresh noise
    assert abs(first.std().item() - 1) < 0.02


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [5, 4099, 1_000_003])
@pytest.mark.parametrize("start", [0, 1])
def test_cuda_grad_that_is_x_equals_cpu_bitwise(dtype, n, start):
    # grad aliases x (the kernel reads both before writing x, with no __restrict__ on grad);
    # start 1 takes the scalar path, 0 the vector loads issued before the noise math.
    x = (torch.rand(n + 1, generator=torch.Generator().manual_seed(n)) * 4 - 2).to(dtype)
    cpu = x.clone()[start:]
    gpu = x.cuda()[start:]
    for t in (cpu, gpu):
        ops.sgld_step_philox_(t, t, 0.3, 0.05, seed=7, offset=16, clamp_min=-1.5, clamp_max=1.5)
    assert torch.equal(gpu.cpu(), cpu)
