"""Tests of jem_ext.sampler: SGLD statistics on known densities, buffer bookkeeping, modes."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from jem_ext import ops
from jem_ext.sampler import (
    GaussianInit,
    ReplayBuffer,
    SGLDSampler,
    UniformInit,
    sample_from_noise,
    sgld_chain,
)


class GaussianMixtureLogits(nn.Module):
    """Logits ``log w_k + log N(x; mu_k, Sigma_k)``: logsumexp is the log mixture density.

    So ``E(x) = -log p(x)`` and ``E(x, k) = -log(w_k N(x; mu_k, Sigma_k))``.
    """

    def __init__(self, means, covs, weights):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.mu = nn.Parameter(means.float())  # a parameter, to check no .grad appears
        self.register_buffer("prec", torch.linalg.inv(covs).float())
        d = means.shape[1]
        logdet = torch.logdet(covs)
        self.register_buffer(
            "const", (w.log() - 0.5 * logdet - 0.5 * d * math.log(2 * math.pi)).float()
        )
        self.modes_seen: list[bool] = []

    def forward(self, x):
        self.modes_seen.append(self.training)
        diff = x[:, None, :] - self.mu[None]  # [B, K, D]
        quad = torch.einsum("bkd,kde,bke->bk", diff, self.prec, diff)
        return self.const - 0.5 * quad


def mixture_moments(means, covs, weights):
    means = torch.as_tensor(means, dtype=torch.float64)
    covs = torch.as_tensor(covs, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    mean = (w[:, None] * means).sum(0)
    second = (w[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def sample_mixture(n, means, covs, weights, generator):
    means = torch.as_tensor(means, dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.as_tensor(covs, dtype=torch.float64))
    k = torch.multinomial(
        torch.as_tensor(weights, dtype=torch.float64), n, True, generator=generator
    )
    z = torch.randn(n, means.shape[1], dtype=torch.float64, generator=generator)
    return (means[k] + (chol[k] @ z[:, :, None]).squeeze(-1)).float()


def assert_moments(x, mean, cov, z=5.0, bias=0.0):
    """Sample mean / covariance within z standard errors (estimated from the samples) + bias."""
    x = x.double()
    n = x.shape[0]
    m = x.mean(0)
    se_m = x.std(0) / math.sqrt(n)
    assert ((m - mean).abs() <= z * se_m + bias).all(), (m, mean, se_m)
    c = x - m
    prods = c[:, :, None] * c[:, None, :]  # [n, D, D]
    se_c = prods.std(0) / math.sqrt(n)
    emp = prods.mean(0)
    assert ((emp - cov).abs() <= z * se_c + bias).all(), (emp, cov, se_c)


MEANS = [[-0.8, 0.0], [0.8, 0.4]]
COVS = [[[0.25, 0.05], [0.05, 0.16]], [[0.20, -0.06], [-0.06, 0.30]]]
WEIGHTS = [0.35, 0.65]


def test_langevin_preserves_mixture():
    """Langevin (step s, noise sqrt(2s)) from exact samples stays at the mixture's moments."""
    g = torch.Generator().manual_seed(0)
    model = GaussianMixtureLogits(MEANS, COVS, WEIGHTS)
    x0 = sample_mixture(4000, MEANS, COVS, WEIGHTS, g)
    s = 0.002
    x = sgld_chain(model, x0, 300, step_size=s, noise_std=math.sqrt(2 * s), generator=g)
    mean, cov = mixture_moments(MEANS, COVS, WEIGHTS)
    # the chain moved (300 steps * 0.002 = 0.6 time units, longer than the components' ~0.2)
    assert (x - x0).abs().mean() > 0.2
    # O(s) discretisation bias is ~s/(2 sigma^2) * sigma^2 = 1e-3: allow 5e-3 on top of 5 SE
    assert_moments(x, mean, cov, z=5.0, bias=5e-3)


def test_langevin_converges_to_gaussian_from_uniform():
    """From uniform noise, short-run SGLD reaches the exact ULA stationary law of a Gaussian.

    For E = (x - mu)^T A (x - mu) / 2 the unadjusted chain x' = x - s A (x - mu) + sqrt(2s) xi
    has mean mu and covariance (A - s A^2 / 2)^{-1}: compare against that, no bias allowance.
    """
    mu = torch.tensor([[0.5, -0.3]])
    cov = torch.tensor([[[0.3, 0.1], [0.1, 0.2]]])
    model = GaussianMixtureLogits(mu, cov, [1.0])
    s = 0.01
    a = torch.linalg.inv(cov[0].double())
    ula_cov = torch.linalg.inv(a - s * a @ a / 2)
    sampler = SGLDSampler(
        n_steps=400,
        step_size=s,
        noise_std=math.sqrt(2 * s),
        init=UniformInit(-1, 1),
        sample_shape=(2,),
    )
    g = torch.Generator().manual_seed(1)
    x = sampler.sample(model, 4000, generator=g)
    assert_moments(x, mu[0].double(), ula_cov, z=5.0)


def test_conditional_chain_uses_class_energy():
    """With y = k the chain samples component k alone (E(x, y) = -f(x)[y])."""
    model = GaussianMixtureLogits(MEANS, COVS, WEIGHTS)
    g = torch.Generator().manual_seed(2)
    y = torch.arange(2).repeat_interleave(2000)
    x0 = torch.zeros(4000, 2)
    s = 0.01  # relaxation time ~ sigma^2 / s < 30 steps
    x = sgld_chain(model, x0, 150, step_size=s, noise_std=math.sqrt(2 * s), y=y, generator=g)
    for k in range(2):
        a = torch.linalg.inv(torch.tensor(COVS[k], dtype=torch.float64))
        assert_moments(
            x[y == k],
            torch.tensor(MEANS[k], dtype=torch.float64),
            torch.linalg.inv(a - s * a @ a / 2),
            z=5.0,
        )


def test_chain_step_matches_formula_and_leaves_input():
    """One noiseless step is x - s * dE/dx with E = -logsumexp f(x); the input is untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    x0 = torch.randn(5, 3)
    keep = x0.clone()
    x1 = sgld_chain(model, x0, 1, step_size=0.3, noise_std=0.0)
    xr = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((-torch.logsumexp(model(xr), 1)).sum(), [xr])
    torch.testing.assert_close(x1, x0 - 0.3 * g)
    assert torch.equal(x0, keep)
    assert not x1.requires_grad
    assert torch.equal(sgld_chain(model, x0, 0), x0)


def test_mode_restored_and_no_param_grads():
    model = GaussianMixtureLogits(MEANS, COVS, WEIGHTS)
    buf = ReplayBuffer(64, (2,), generator=torch.Generator().manual_seed(0))
    sampler = SGLDSampler(n_steps=3, step_size=0.01, noise_std=0.1, buffer=buf)
    for mode in (True, False):
        model.train(mode)
        model.modes_seen.clear()
        sampler.sample(model, 16)
        assert model.training is mode
        assert model.modes_seen == [False] * 3  # eval during the chain
    assert all(p.grad is None for p in model.parameters())


def test_mode_restored_on_error():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    m = Boom().train()
    with pytest.raises(RuntimeError):
        sgld_chain(m, torch.zeros(2, 2), 1)
    assert m.training


def test_chain_works_under_no_grad():
    model = GaussianMixtureLogits(MEANS, COVS, WEIGHTS)
    with torch.no_grad():
        x = sgld_chain(model, torch.zeros(4, 2), 2, step_size=0.1, noise_std=0.0)
    assert not torch.equal(x, torch.zeros(4, 2))


def test_buffer_writes_back_sampled_rows():
    model = GaussianMixtureLogits(MEANS, COVS, WEIGHTS)
    buf = ReplayBuffer(1000, (2,), reinit_prob=0.0, generator=torch.Generator().manual_seed(0))
    before = buf.data.clone()
    drawn = {}
    orig = buf.sample

    def spy(*a, **k):
        x0, idx = orig(*a, **k)
        drawn["x0"], drawn["idx"] = x0.clone(), idx.clone()
        return x0, idx

    buf.sample = spy
    sampler = SGLDSampler(n_steps=2, step_size=0.01, noise_std=0.1, buffer=buf)
    x_q = sampler.sample(model, 32, generator=torch.Generator().manual_seed(1))
    idx = drawn["idx"]
    torch.testing.assert_close(drawn["x0"], before[idx])  # started from the stored rows
    # every written row holds the sample of one of the chains that drew it
    for b in range(32):
        same = (idx == idx[b]).nonzero().flatten()
        assert any(torch.equal(buf.data[idx[b]], x_q[j]) for j in same)
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(buf.data[untouched], before[untouched])


def test_reinit_rate_is_binomial():
    buf = ReplayBuffer(100, (3,), reinit_prob=0.05)
    buf.data.fill_(5.0)  # stored rows are 5, fresh ones lie in [-1, 1]
    n = 20000
    x0, idx = buf.sample(n, generator=torch.Generator().manual_seed(0))
    fresh = (x0 != 5.0).all(1)
    assert ((x0 == 5.0).all(1) | fresh).all()
    assert (x0[fresh].abs() <= 1).all()
    k = fresh.sum().item()
    sd = math.sqrt(n * 0.05 * 0.95)
    assert abs(k - n * 0.05) < 5 * sd, k
    assert idx.min() >= 0 and idx.max() < 100


def test_class_split_buffer():
    buf = ReplayBuffer(103, (2,), num_classes=4, reinit_prob=0.0)
    assert buf.per_class == 25 and buf.data.shape == (100, 2)
    buf.data.copy_(buf.labels.float()[:, None].expand(100, 2))  # class k's rows hold k
    y = torch.randint(0, 4, (500,), generator=torch.Generator().manual_seed(0))
    x0, idx = buf.sample(500, y=y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(idx // 25, y)
    assert torch.equal(x0[:, 0], y.float())
    # all 25 rows of a class get used
    assert len(set(idx[y == 0].tolist())) == 25
    with pytest.raises(ValueError, match="needs labels"):
        buf.sample(4)


def test_class_split_buffer_gaussian_init():
    x = torch.cat([torch.full((50, 2), -0.5), torch.full((50, 2), 0.5)]) + 0.01 * torch.randn(
        100, 2
    )
    y = torch.arange(2).repeat_interleave(50)
    init = GaussianInit.fit(x, y, 2)
    buf = ReplayBuffer(40, (2,), num_classes=2, init=init, reinit_prob=1.0)
    assert (buf.data[:20] < 0).all() and (buf.data[20:] > 0).all()
    yq = torch.tensor([1, 0, 1, 1])
    x0, _ = buf.sample(4, y=yq)  # all re-initialised from the class' Gaussian
    assert torch.equal(x0[:, 0] > 0, yq.bool())


def test_short_run_matches_explicit_chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    sampler = SGLDSampler(n_steps=4, step_size=0.5, noise_std=0.05, sample_shape=(3, 2, 2))
    x = sampler.sample(model, 6, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x0 = UniformInit()(6, (3, 2, 2), generator=g)
    ref = sgld_chain(model, x0, 4, 0.5, 0.05, generator=g)
    torch.testing.assert_close(x, ref)
    assert x.shape == (6, 3, 2, 2)
    with pytest.raises(ValueError, match="sample_shape"):
        SGLDSampler()


def test_proximal_keeps_range_and_clips_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[2].weight.mul_(100.0)  # steep energy: unclipped steps would fly off
    x0 = torch.rand(64, 4) * 2 - 1
    x1 = sgld_chain(model, x0, 1, step_size=1.0, noise_std=0.0, grad_clip=0.01, clamp=(-1, 1))
    assert ((x1 - x0).abs() <= 0.01 + 1e-6).all()
    sampler = SGLDSampler(
        n_steps=10, step_size=1.0, noise_std=0.5, clamp=(-1, 1), grad_clip=0.05, sample_shape=(4,)
    )
    x = sampler.sample(model, 256)
    assert x.min() >= -1 and x.max() <= 1
    assert (x.abs() == 1).any()  # the clamp was active


def test_conditional_sampler_requires_labels():
    model = GaussianMixtureLogits(MEANS, COVS, WEIGHTS)
    sampler = SGLDSampler(n_steps=1, conditional=True, sample_shape=(2,))
    with pytest.raises(ValueError, match="needs labels"):
        sampler.sample(model, 4)
    assert sampler.sample(model, 4, y=torch.tensor([0, 1, 0, 1])).shape == (4, 2)


def test_gaussian_init_moments():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.2, -0.1, 0.0], [-0.3, 0.1, 0.25]])
    a = torch.tensor([[0.20, 0.0, 0.0], [0.05, 0.10, 0.0], [-0.02, 0.03, 0.08]])
    covs = torch.stack([a @ a.T, (0.8 * a) @ (0.8 * a).T])
    n = 20000
    y = torch.arange(2).repeat_interleave(n)
    chol = torch.linalg.cholesky(covs.double())
    z = torch.randn(2 * n, 3, dtype=torch.float64, generator=g)
    data = (means.double()[y] + (chol[y] @ z[:, :, None]).squeeze(-1)).float().view(2 * n, 1, 3)
    init = GaussianInit.fit(data, y, 2, ridge=1e-6, clamp=None)
    assert init.sample_shape == (1, 3)
    torch.testing.assert_close(init.prior, torch.tensor([0.5, 0.5]))
    for k in range(2):
        fitted_cov = init.chol[k].double() @ init.chol[k].double().T
        assert_moments(data[y == k].view(n, 3), init.mean[k].double(), fitted_cov, z=5.0)
        yk = torch.full((n,), k)
        s = init(n, (1, 3), y=yk, generator=g)
        assert s.shape == (n, 1, 3)
        assert_moments(s.view(n, 3), init.mean[k].double(), fitted_cov, z=5.0)
        assert_moments(s.view(n, 3), means[k].double(), covs[k].double(), z=6.0)
    # default clamp keeps samples in [-1, 1]; y=None draws classes from the prior
    wide = GaussianInit.fit(data * 10, y, 2)
    s = wide(5000, generator=g)
    assert s.min() >= -1 and s.max() <= 1 and (s.abs() == 1).any()


def test_gaussian_init_errors():
    with pytest.raises(ValueError, match="class 1 has 1"):
        GaussianInit.fit(torch.zeros(3, 2), torch.tensor([0, 0, 1]), 2)
    init = GaussianInit.fit(torch.randn(10, 2), torch.arange(10) % 2, 2)
    with pytest.raises(ValueError, match="shape"):
        init(4, (3,))


def test_state_dict_roundtrip_weights_only():
    data = torch.randn(40, 2).clamp(-1, 1)
    init = GaussianInit.fit(data, torch.arange(40) % 2, 2)
    buf = ReplayBuffer(20, (2,), num_classes=2, init=init)
    s = SGLDSampler(
        n_steps=3,
        step_size=0.1,
        noise_std=0.02,
        clamp=(-1, 1),
        grad_clip=0.1,
        buffer=buf,
        conditional=True,
    )
    f = io.BytesIO()
    torch.save(s.state_dict(), f)
    f.seek(0)
    state = torch.load(f, weights_only=True)
    buf2 = ReplayBuffer(20, (2,), num_classes=2)
    s2 = SGLDSampler(buffer=buf2)
    s2.load_state_dict(state)
    assert torch.equal(buf2.data, buf.data)
    assert (s2.n_steps, s2.step_size, s2.noise_std, s2.clamp, s2.grad_clip, s2.conditional) == (
        3,
        0.1,
        0.02,
        (-1.0, 1.0),
        0.1,
        True,
    )
    assert isinstance(s2.init, GaussianInit) and buf2.init is s2.init
    torch.testing.assert_close(s2.init.chol, init.chol)
    with pytest.raises(ValueError, match="does not match"):
        ReplayBuffer(30, (2,), num_classes=2).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="replay buffer"):
        SGLDSampler(sample_shape=(2,)).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError):
        UniformInit(1, -1)
    with pytest.raises(ValueError):
        ReplayBuffer(10, (2,), reinit_prob=1.5)
    with pytest.raises(ValueError):
        ReplayBuffer(3, (2,), num_classes=4)
    with pytest.raises(ValueError):
        SGLDSampler(n_steps=-1, sample_shape=(2,))
    with pytest.raises(ValueError):
        sgld_chain(nn.Linear(2, 2), torch.zeros(1, 2), -1)


def test_chain_uses_ops_energy_with_labels():
    """The conditional chain's step equals x - s * d(-f(x)[y])/dx."""
    torch.manual_seed(1)
    model = nn.Linear(3, 4)
    x0 = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    x1 = sgld_chain(model, x0, 1, step_size=0.2, noise_std=0.0, y=y)
    xr = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ops.energy(model(xr), y).sum(), [xr])
    torch.testing.assert_close(x1, x0 - 0.2 * g)
    torch.testing.assert_close(g, -model.weight[y].detach())


def test_no_host_sync_ops_in_sampling():
    """Sampling (buffer draw, re-init, chain, write-back) issues no op that syncs on CUDA.

    ``.item()``, ``bool(tensor)``, ``.tolist()`` all go through ``aten._local_scalar_dense``;
    ``nonzero`` / ``masked_select`` / ``unique`` need the result size on the host.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    data = torch.rand(40, 1, 4, 4) * 2 - 1
    init = GaussianInit.fit(data, torch.arange(40) % 4, 4, ridge=1e-2)
    buf = ReplayBuffer(40, (1, 4, 4), num_classes=4, init=init, reinit_prob=0.5)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(48, 4)
    )
    cond = SGLDSampler(n_steps=2, buffer=buf, conditional=True, clamp=(-1, 1), grad_clip=0.01)
    plain = SGLDSampler(n_steps=2, buffer=ReplayBuffer(10, (1, 4, 4)))
    short = SGLDSampler(n_steps=2, init=init)
    g = torch.Generator().manual_seed(0)
    with Spy() as spy:
        cond.sample(model, 4, y=torch.tensor([0, 1, 2, 3]), generator=g)
        plain.sample(model, 4, generator=g)
        short.sample(model, 4, generator=g)
    assert "sgld_step_" in spy.ops and "energy" in spy.ops
    forbidden = {
        "_local_scalar_dense",
        "item",
        "nonzero",
        "masked_select",
        "is_nonzero",
        "equal",
        "_unique2",
        "unique_dim",
    }
    assert not (spy.ops & forbidden), spy.ops & forbidden


def test_initialisers_are_importable_from_replay_and_sampler():
    from jem_ext import inits, replay, sampler

    for name in ("INITS", "Initializer", "UniformInit", "GaussianInit"):
        assert getattr(replay, name) is getattr(inits, name)
        assert getattr(sampler, name) is getattr(inits, name)


@pytest.mark.cuda
def test_cuda_conditional_chain_defers_bad_labels_without_a_sync():
    model = nn.Linear(3, 4).cuda()
    x0 = torch.randn(6, 3, device="cuda")
    y = torch.tensor([0, 1, 9, 3, 0, 1], device="cuda")
    ops.raise_label_errors("cuda")
    sgld_chain(model, x0.clone(), 1, y=torch.zeros_like(y))  # lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = sgld_chain(model, x0.clone(), 3, y=y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isnan(x[2]).all() and not torch.isnan(x[[0, 1, 3, 4, 5]]).any()
    with pytest.raises(RuntimeError, match=r"^energy: label y\[2\] = 9 is out of range for 4"):
        ops.raise_label_errors("cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_sample_from_noise_with_a_bad_label_raises_on_every_device(device):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).to(device)
    with pytest.raises(RuntimeError, match=r"^energy: label y\[1\] = 3 is out of range for 3"):
        sample_from_noise(model, 2, (1, 2, 2), 2, y=torch.tensor([0, 3]))
