"""SAM / adaptive SAM against a hand computation on a separable quadratic."""

from __future__ import annotations

import copy

import pytest
import torch

from jem_ext.sam import SAM

# Loss: sum over parameters of 0.5 * a * w^2 + b * w (element-wise), gradient a * w + b.
A = (torch.tensor([1.0, 3.0, -0.5]), torch.tensor([[2.0, 0.5], [1.5, 4.0]]))
B = (torch.tensor([0.3, -1.0, 2.0]), torch.tensor([[-0.2, 0.7], [0.1, -1.5]]))
W0 = (torch.tensor([0.5, -1.0, 2.0]), torch.tensor([[1.0, -2.0], [0.25, 0.5]]))


def _loss(params):
    return sum((0.5 * a * w.square() + b * w).sum() for w, a, b in zip(params, A, B))


def _grad(ws):
    return [a * w + b for w, a, b in zip(ws, A, B)]


def _params():
    return [torch.nn.Parameter(w.clone().double()) for w in W0]


def _sam_step(opt, params):
    opt.zero_grad()
    _loss(params).backward()

    def closure():
        loss = _loss(params)
        loss.backward()
        return loss

    return opt.step(closure)


def _hand_ascent_grad(ws, rho, adaptive):
    """Gradient at w + e(w), e(w) = rho * T^2 g / ||T g|| (T = |w| or 1), computed by hand."""
    g = _grad(ws)
    t = [w.abs() if adaptive else torch.ones_like(w) for w in ws]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    perturbed = [w + rho * ti**2 * gi / norm for w, ti, gi in zip(ws, t, g)]
    return _grad(perturbed)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sgd_plain_matches_hand_computation(adaptive):
    params, lr, rho = _params(), 0.1, 0.5
    opt = SAM(params, torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)
    ws = [w.double() for w in W0]
    for _ in range(3):
        g1 = _hand_ascent_grad(ws, rho, adaptive)
        ws = [w - lr * g for w, g in zip(ws, g1)]
        _sam_step(opt, params)
        for p, w in zip(params, ws):
            torch.testing.assert_close(p.detach(), w)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sgd_momentum_weight_decay_matches_hand_computation(adaptive):
    params, lr, rho, mom, wd = _params(), 0.05, 0.3, 0.9, 0.01
    opt = SAM(
        params, torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr, momentum=mom, weight_decay=wd
    )
    ws = [w.double() for w in W0]
    bufs = None
    for _ in range(3):
        g1 = _hand_ascent_grad(ws, rho, adaptive)
        d = [g + wd * w for g, w in zip(g1, ws)]  # decay uses the restored weights w
        bufs = d if bufs is None else [mom * b + di for b, di in zip(bufs, d)]
        ws = [w - lr * b for w, b in zip(ws, bufs)]
        _sam_step(opt, params)
        for p, w in zip(params, ws):
            torch.testing.assert_close(p.detach(), w)


@pytest.mark.parametrize("adaptive", [False, True])
def test_adam_gets_the_ascent_point_gradient(adaptive):
    params, rho = _params(), 0.2
    opt = SAM(params, torch.optim.Adam, rho=rho, adaptive=adaptive, lr=0.01, weight_decay=1e-3)
    ref = _params()
    ref_opt = torch.optim.Adam(ref, lr=0.01, weight_decay=1e-3)
    for _ in range(3):
        for r, g in zip(ref, _hand_ascent_grad([r.detach() for r in ref], rho, adaptive)):
            r.grad = g
        ref_opt.step()
        _sam_step(opt, params)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r.detach())


def test_first_step_moves_by_rho_and_second_step_restores():
    params, rho = _params(), 0.7
    opt = SAM(params, torch.optim.SGD, rho=rho, lr=0.0)
    _loss(params).backward()
    before = [p.detach().clone() for p in params]
    opt.first_step()
    dist = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    torch.testing.assert_close(dist, torch.tensor(rho, dtype=torch.float64))
    opt.second_step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_rho_zero_is_the_base_optimizer():
    params, ref = _params(), _params()
    opt = SAM(params, torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    for _ in range(3):
        _sam_step(opt, params)
        ref_opt.zero_grad()
        _loss(ref).backward()
        ref_opt.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach())


def test_param_with_no_grad_is_left_alone():
    params = _params()
    frozen = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = SAM([*params, frozen], torch.optim.SGD, rho=0.5, lr=0.1)
    _sam_step(opt, params)
    assert torch.equal(frozen.detach(), torch.ones(2, dtype=torch.float64))


def test_lr_written_to_param_groups_reaches_the_base_optimizer():
    params = _params()
    opt = SAM(params, torch.optim.SGD, rho=0.0, lr=1.0)
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    _sam_step(opt, params)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adam, {})])
def test_state_dict_round_trip_resumes_exactly(base, kw):
    params = _params()
    opt = SAM(params, base, rho=0.5, adaptive=True, lr=0.01, **kw)
    for _ in range(2):
        _sam_step(opt, params)
    state = copy.deepcopy(opt.state_dict())
    assert state["state"], "the base optimiser's state (momentum / moments) must be saved"
    assert state["param_groups"][0]["rho"] == 0.5 and state["param_groups"][0]["adaptive"]

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = SAM(resumed_params, base, rho=0.1, adaptive=False, lr=0.5, **kw)
    resumed.load_state_dict(state)
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.param_groups[0]["rho"] == 0.5 and resumed.param_groups[0]["lr"] == 0.01
    for _ in range(2):
        _sam_step(opt, params)
        _sam_step(resumed, resumed_params)
    for p, r in zip(params, resumed_params):
        assert torch.equal(p.detach(), r.detach())


def test_misuse_is_reported():
    params = _params()
    with pytest.raises(ValueError, match="rho"):
        SAM(params, torch.optim.SGD, rho=-1.0, lr=0.1)
    opt = SAM(params, torch.optim.SGD, rho=0.5, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    _loss(params).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="ascent point"):
        opt.state_dict()
