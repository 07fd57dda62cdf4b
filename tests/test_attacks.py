"""PGD against closed-form worst cases and the SGLD-refined classifier's differentiability."""

import pytest
import torch
from torch import nn

from jem_ext.chain import ChainSpec
from jem_ext.eval.attacks import SGLDRefinedClassifier, pgd_attack, robust_accuracy

D = 12


class BinaryLinear(nn.Module):
    """Logits [0, w.x + b]: the signed margin (2y - 1)(w.x + b) is linear in x."""

    def __init__(self, generator):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, generator=generator, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))

    def margin(self, x, y):
        return (2 * y - 1) * (x @ self.w + self.b)

    def forward(self, x):
        z = x @ self.w + self.b
        return torch.stack([torch.zeros_like(z), z], dim=1)


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    model = BinaryLinear(g)
    x = torch.randn(64, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (64,), generator=g)
    return model, x, y


@pytest.mark.parametrize("random_start", [False, True])
def test_linf_pgd_reaches_closed_form_worst_case(setup, random_start):
    model, x, y = setup
    eps = 0.3
    x_adv = pgd_attack(
        model,
        x,
        y,
        "linf",
        eps,
        steps=5,
        step_size=eps,
        clamp=None,
        random_start=random_start,
        generator=torch.Generator().manual_seed(1),
    )
    # worst case: every coordinate moves by eps against the margin, x - eps (2y - 1) sign(w)
    expected = x - eps * (2 * y - 1).unsqueeze(1) * model.w.sign()
    torch.testing.assert_close(x_adv, expected.detach())
    drop = model.margin(x, y) - model.margin(x_adv, y)
    torch.testing.assert_close(drop, (eps * model.w.abs().sum()).expand(64).detach())
    assert (x_adv - x).abs().max() <= eps + 1e-12


def test_l2_pgd_reaches_closed_form_worst_case(setup):
    model, x, y = setup
    eps = 0.5
    x_adv = pgd_attack(
        model, x, y, "l2", eps, steps=1, step_size=eps, clamp=None, random_start=False
    )
    drop = model.margin(x, y) - model.margin(x_adv, y)
    torch.testing.assert_close(drop, (eps * model.w.norm()).expand(64).detach())


def test_l2_pgd_random_start_converges_and_stays_in_ball(setup):
    model, x, y = setup
    eps = 0.5
    x_adv = pgd_attack(
        model,
        x,
        y,
        "l2",
        eps,
        steps=100,
        step_size=0.1,
        clamp=None,
        generator=torch.Generator().manual_seed(2),
    )
    drop = model.margin(x, y) - model.margin(x_adv, y)
    torch.testing.assert_close(
        drop, (eps * model.w.norm()).expand(64).detach(), rtol=1e-3, atol=1e-3
    )
    assert (x_adv - x).norm(dim=1).max() <= eps + 1e-9


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_perturbation_within_eps_and_data_range(norm):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.rand(16, 3, 4, 4) * 2 - 1
    y = torch.randint(0, 5, (16,))
    eps = 0.25
    for random_start in (False, True):
        x_adv = pgd_attack(
            model, x, y, norm, eps, steps=7, step_size=0.1, random_start=random_start
        )
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert size.max() <= eps + 1e-6
        assert x_adv.min() >= -1 and x_adv.max() <= 1
    assert model[1].weight.grad is None  # only the input is differentiated


def test_eps_zero_returns_input_and_clean_accuracy(setup):
    model, x, y = setup
    assert torch.equal(pgd_attack(model, x, y, "linf", 0.0, steps=3, step_size=0.1), x)
    clean = (model(x).argmax(1) == y).double().mean().item()
    curve = robust_accuracy(
        model,
        x,
        y,
        "l2",
        [0.0, 0.5, 2.0],
        steps=10,
        step_size=lambda e: 2.5 * e / 10,
        batch_size=20,
        clamp=None,
        random_start=False,
        progress=False,
    )
    assert [e for e, _ in curve] == [0.0, 0.5, 2.0]
    assert curve[0][1] == pytest.approx(clean)
    accuracies = [a for _, a in curve]
    assert accuracies == sorted(accuracies, reverse=True)
    # against a linear model the attack succeeds exactly when the margin is below eps ||w||
    expected = (model.margin(x, y) > 0.5 * model.w.norm()).double().mean().item()
    assert curve[1][1] == pytest.approx(expected)


def _tiny_classifier():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def test_sgld_refined_zero_steps_is_plain_classifier():
    f = _tiny_classifier()
    x = torch.randn(5, 4, dtype=torch.float64)
    wrapped = SGLDRefinedClassifier(f, n_steps=0, n_chains=3)
    torch.testing.assert_close(wrapped(x), f(x))


def test_sgld_refined_steps_follow_the_update_rule():
    f = _tiny_classifier()
    x = torch.randn(5, 4, dtype=torch.float64)
    wrapped = SGLDRefinedClassifier(f, n_steps=2, step_size=0.3, noise_std=0.0)
    x_k = x.clone()
    for _ in range(2):
        x_k.requires_grad_(True)
        g = torch.autograd.grad(torch.logsumexp(f(x_k), 1).sum(), x_k)[0]
        x_k = (x_k + 0.3 * g).detach()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), f(x_k))


def test_sgld_refined_with_a_chain_spec_clips_and_clamps_like_the_sampler():
    """Given the resolved chain (a proximal one here), the refinement clips each gradient and
    clamps each state as the sampler's chains do; without one it does neither."""
    f = _tiny_classifier()
    x = 3 * torch.randn(5, 4, dtype=torch.float64)
    chain = ChainSpec(2, step_size=0.3, noise_std=0.0, clamp=(-1.0, 1.0), grad_clip=0.05)
    wrapped = SGLDRefinedClassifier(f, chain=chain)
    assert (wrapped.n_steps, wrapped.step_size, wrapped.noise_std) == (2, 0.3, 0.0)
    x_k = x.clone()
    for _ in range(2):
        x_k.requires_grad_(True)
        g = torch.autograd.grad(torch.logsumexp(f(x_k), 1).sum(), x_k)[0]
        x_k = (x_k + 0.3 * g.clamp(-0.05, 0.05)).clamp(-1.0, 1.0).detach()
    with torch.no_grad():
        torch.testing.assert_close(wrapped.refine(x), x_k)
        unclamped = SGLDRefinedClassifier(f, n_steps=2, step_size=0.3, noise_std=0.0)
        assert unclamped.refine(x).abs().max() > 1.0


def test_sgld_refined_gradients_flow_through_refinement():
    f = _tiny_classifier()
    wrapped = SGLDRefinedClassifier(f, n_steps=3, step_size=0.5, noise_std=0.0, n_chains=2)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(wrapped, (x,))
    # the refinement changes the input gradient (it is not the gradient of f at x_K alone)
    (g_through,) = torch.autograd.grad(wrapped(x)[:, 0].sum(), x)
    x_k = wrapped.refine(x).detach().requires_grad_(True)
    (g_last,) = torch.autograd.grad(f(x_k)[:, 0].sum(), x_k)
    assert not torch.allclose(g_through, g_last)


def test_sgld_refined_keeps_classifier_in_eval_mode():
    f = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    wrapped = SGLDRefinedClassifier(f, n_steps=1).train()
    assert wrapped.training and not f.training


def test_pgd_attacks_through_stochastic_refinement():
    torch.manual_seed(5)
    f = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 16), nn.ELU(), nn.Linear(16, 4))
    wrapped = SGLDRefinedClassifier(
        f, n_steps=2, step_size=0.1, noise_std=0.01, sigma=0.05, n_chains=2
    )
    x = torch.rand(6, 2, 3, 3) * 2 - 1
    y = torch.randint(0, 4, (6,))
    x_adv = pgd_attack(wrapped, x, y, "linf", 0.1, steps=3, step_size=0.05, eot_samples=2)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.1 + 1e-6
    deterministic = SGLDRefinedClassifier(f, n_steps=2, step_size=0.1, noise_std=0.0)
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(deterministic(x_adv), y) > loss(deterministic(x), y)
