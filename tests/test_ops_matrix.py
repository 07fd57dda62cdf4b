"""Every op over every dtype and device, driven by one `sample_inputs(device,
dtype)` factory per op: values and gradients against float64 references,
`opcheck`, torch.compile, and fake kernels that refuse what the real kernels
refuse."""

from dataclasses import dataclass, field

import pytest
import torch
from reference import energy_reference, philox_normals, sgld_reference
from torch._subclasses.fake_tensor import FakeTensorMode

import jem_ext.ops as ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class Sample:
    args: tuple
    kwargs: dict = field(default_factory=dict)


def _logits(b, c, dtype, device, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g) * scale).to(device, dtype)


def _labels(b, c, device, seed):
    return torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed)).to(device)


def _logit_layouts(dtype, device):
    """(logits, labels) pairs: class counts 1..1000, a strided and an empty batch."""
    out = [
        (_logits(b, c, dtype, device, seed=c), _labels(b, c, device, seed=c))
        for b, c in ((4, 10), (3, 1), (5, 37), (2, 1000))
    ]
    wide = _logits(6, 16, dtype, device, seed=7)
    out.append((wide[:, ::2], _labels(6, 8, device, seed=7)))
    out.append((_logits(0, 5, dtype, device, seed=0), _labels(0, 5, device, seed=0)))
    return out


def energy_sample_inputs(device, dtype):
    samples = []
    for logits, y in _logit_layouts(dtype, device):
        samples += [Sample((logits,)), Sample((logits, y))]
    return samples


def energy_ce_sample_inputs(device, dtype):
    return [Sample((logits, y)) for logits, y in _logit_layouts(dtype, device)]


def sgld_sample_inputs(device, dtype):
    """Arguments of sgld_step_philox_ (explicit noise, so repeatable)."""
    g = torch.Generator().manual_seed(0)

    def pair(*shape):
        x = (torch.rand(*shape, generator=g) * 2 - 1).to(device, dtype)
        return x, torch.randn(*shape, generator=g).to(device, dtype)

    x1, g1 = pair(4, 5)
    x2, g2 = pair(3, 2, 7)
    x3, g3 = pair(6, 8)
    x4, g4 = pair(0, 3)
    return [
        Sample((x1, g1, 0.1, 0.05, 3, 0)),
        Sample((x2, g2, 0.3, 0.0, 5, 8), dict(clamp_min=-1.0, clamp_max=1.0, grad_clip=0.5)),
        Sample((x3.t(), g3.t(), 1.0, 1.0, 2**64 - 1, 4), dict(clamp_max=0.25)),
        Sample((x4, g4, 1.0, 1.0, 9, 0)),
    ]


def energy_ce_reference(logits, y):
    lg = logits.double()
    lse = torch.logsumexp(lg, 1)
    return -lse, lse - lg.gather(1, y.unsqueeze(1)).squeeze(1)


def sgld_philox_reference(x, grad, step, std, seed, offset, **kw):
    xi = torch.from_numpy(philox_normals(x.numel(), seed, offset)).view(x.shape).to(x.device)
    return sgld_reference(x, grad, xi, step, std, **kw)


def _assert_close(got, want, dtype, tol=None):
    tol = TOL[dtype] if tol is None else tol
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_values_match_float64_references(device, dtype):
    for s in energy_sample_inputs(device, dtype):
        e = ops.energy(*s.args)
        assert e.dtype == dtype and e.device.type == device
        _assert_close(e, energy_reference(*s.args), dtype)
    for s in energy_ce_sample_inputs(device, dtype):
        for got, want in zip(ops.energy_ce(*s.args), energy_ce_reference(*s.args)):
            _assert_close(got, want, dtype)
    for s in sgld_sample_inputs(device, dtype):
        x, rest = s.args[0], s.args[1:]
        want = sgld_philox_reference(x, *rest, **s.kwargs)
        got = ops.sgld_step_philox_(x.clone(), *rest, **s.kwargs)
        assert got.dtype == dtype and got.shape == x.shape
        # The noise is float32 Box-Muller in every dtype.
        _assert_close(got, want, dtype, max(TOL[dtype], TOL[torch.float32]))


def _grad_of(fn, logits, *rest):
    """d/dlogits of sum(output_i * weight_i) for fixed per-row weights."""
    x = logits.detach().clone().requires_grad_(True)
    outs = fn(x, *rest)
    outs = outs if isinstance(outs, tuple) else (outs,)
    w = torch.linspace(-1.0, 2.0, max(1, logits.shape[0]), dtype=torch.float64)
    w = w[: logits.shape[0]].to(logits.device)
    loss = sum(((o.double() * w * (i + 1)).sum() for i, o in enumerate(outs)))
    (g,) = torch.autograd.grad(loss, [x])
    return g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_float64_autograd(device, dtype):
    for s in energy_sample_inputs(device, dtype):
        want = _grad_of(energy_reference, s.args[0].double(), *s.args[1:])
        _assert_close(_grad_of(ops.energy, *s.args), want, dtype)
    for s in energy_ce_sample_inputs(device, dtype):
        want = _grad_of(energy_ce_reference, s.args[0].double(), *s.args[1:])
        _assert_close(_grad_of(ops.energy_ce, *s.args), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, dtype):
    # The first samples of each op: opcheck runs its schema, fake-tensor,
    # autograd-registration and AOT-dispatch checks on each.
    for s in energy_sample_inputs(device, dtype)[:4]:
        args = (s.args[0].clone().requires_grad_(True),) + s.args[1:]
        torch.library.opcheck(torch.ops.jem_ext.energy.default, args)
    for s in energy_ce_sample_inputs(device, dtype)[:2]:
        args = (s.args[0].clone().requires_grad_(True),) + s.args[1:]
        torch.library.opcheck(torch.ops.jem_ext.energy_ce.default, args)
    for s in sgld_sample_inputs(device, dtype)[:2]:
        x, grad, step, std, seed, offset = s.args
        kw = dict(clamp_min=None, clamp_max=None, grad_clip=None) | s.kwargs
        torch.library.opcheck(
            torch.ops.jem_ext._sgld_step_philox_.default,
            (
                x.clone(),
                grad,
                step,
                std,
                kw["clamp_min"],
                kw["clamp_max"],
                kw["grad_clip"],
                seed,
                offset,
            ),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_matches_eager(device, dtype):
    torch._dynamo.reset()

    def energies(logits, y):
        e, ce = ops.energy_ce(logits, y)
        return ops.energy(logits) + e + ce + ops.energy(logits, y)

    def step(x, grad, *rest, **kw):
        ops.sgld_step_philox_(x, grad, *rest, **kw)
        return x

    compiled_energies = torch.compile(energies, fullgraph=True, backend="aot_eager")
    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    for s in energy_ce_sample_inputs(device, dtype)[:3]:
        torch.testing.assert_close(compiled_energies(*s.args), energies(*s.args))
    for s in sgld_sample_inputs(device, dtype)[:2]:
        x, rest = s.args[0], s.args[1:]
        torch.testing.assert_close(
            compiled_step(x.clone(), *rest, **s.kwargs), step(x.clone(), *rest, **s.kwargs)
        )


# ------------------------------------------------- fake kernels refuse too


def _bad_calls():
    z = torch.zeros
    ops_ = torch.ops.jem_ext
    nan = float("nan")
    return [
        (ops_.energy.default, (z(3, 4, dtype=torch.int32),), "logits must be float32"),
        (ops_.energy.default, (z(3),), "logits must be 2-D"),
        (ops_.energy.default, (z(3, 0),), "at least one class"),
        (ops_.energy.default, (z(3, 4), z(3, dtype=torch.int32)), "y must be int64"),
        (ops_.energy.default, (z(3, 4), z(2, dtype=torch.int64)), r"y must have shape \[3\]"),
        (
            ops_.energy.default,
            (z(3, 4), z(3, dtype=torch.int64, device="meta")),
            "y must be on logits's device",
        ),
        (ops_.energy_ce.default, (z(3, 4), None), "y .*is required"),
        (
            ops_.energy_ce.default,
            (z(3, 4, dtype=torch.int64), z(3, dtype=torch.int64)),
            "logits must be float32",
        ),
        (
            ops_.energy_backward.default,
            (z(3, 4), None, None, z(3, dtype=torch.int64), None),
            "grad_lse must be float32",
        ),
        (
            ops_.energy_backward.default,
            (z(3, 4), None, None, z(2), None),
            r"grad_lse must have shape \[3\]",
        ),
        (
            ops_.energy_backward.default,
            (z(3, 4), None, None, None, z(3)),
            "grad_pick needs the labels y",
        ),
        (
            ops_.energy_backward.default,
            (z(3, 4), None, z(3, device="meta"), z(3), None),
            "energy must be on logits's device",
        ),
        (
            ops_.sgld_step_.default,
            (z(3, dtype=torch.int32), z(3, dtype=torch.int32), 1.0, 0.0),
            "x must be float32",
        ),
        (ops_.sgld_step_.default, (z(3), z(4), 1.0, 0.0), "grad must have x's shape"),
        (
            ops_.sgld_step_.default,
            (z(3), z(3, dtype=torch.float64), 1.0, 0.0),
            "grad must have x's dtype",
        ),
        (
            ops_.sgld_step_.default,
            (z(3), z(3, device="meta"), 1.0, 0.0),
            "grad must be on x's device",
        ),
        (ops_.sgld_step_.default, (z(3), z(3), 1.0, -1.0), "noise_std must be finite and >= 0"),
        (ops_.sgld_step_.default, (z(3), z(3), 1.0, 0.0, nan), "clamp_min must be a number"),
        (ops_.sgld_step_.default, (z(3), z(3), 1.0, 0.0, 1.0, 0.0), "clamp_min must be <="),
        (
            ops_.sgld_step_.default,
            (z(3), z(3), 1.0, 0.0, None, None, -1.0),
            "grad_clip must be >= 0",
        ),
        (
            ops_._sgld_step_philox_.default,
            (z(3), z(3), 1.0, 0.0, None, None, None, 0, 3),
            "offset must be a non-negative multiple of 4",
        ),
    ]


@pytest.mark.parametrize("op,args,match", _bad_calls())
def test_fake_kernels_refuse_what_the_real_kernels_refuse(op, args, match):
    mixed_devices = any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args)
    if not mixed_devices:  # the real CPU kernel (meta tensors have no real kernel)
        with pytest.raises(RuntimeError, match=match):
            op(*args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        with pytest.raises(RuntimeError, match=match):
            op(*fake)
