"""Tests of jem_ext.objectives.jem_loss against hand-written float64 formulas (JEM.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jem_ext.objectives import jem_loss


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(seed=1, b=7, m=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (b,), generator=g)
    x_q = torch.randn(m, 4, generator=g, dtype=torch.float64)
    y_q = torch.randint(0, 3, (m,), generator=g)
    return x, y, x_q, y_q


def reference_loss(model, x, y, x_q, y_q, objective, labeled, w_px, w_pyx, l2):
    """The formulas of JEM.md in plain torch."""
    logits = model(x)
    lab = torch.ones(len(y), dtype=torch.bool) if labeled is None else labeled
    ce = F.cross_entropy(logits[lab], y[lab]) if lab.any() else logits.sum() * 0
    if objective == "ce":
        return w_pyx * ce
    if objective == "jem":
        e_d = -torch.logsumexp(logits, 1)
        e_q = -torch.logsumexp(model(x_q), 1)
        loss = w_pyx * ce + w_px * (e_d.mean() - e_q.mean())
    else:  # factored: E(x, y) = -f(x)[y] on labeled data and on (x_q, y_q)
        e_d = -logits[lab].gather(1, y[lab, None]).squeeze(1)
        e_q = -model(x_q).gather(1, y_q[:, None]).squeeze(1)
        loss = w_px * (e_d.mean() - e_q.mean())
    return loss + l2 * ((e_d**2).mean() + (e_q**2).mean())


@pytest.mark.parametrize("objective", ["jem", "factored", "ce"])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("w_px,w_pyx,l2", [(1.0, 1.0, 0.0), (0.7, 1.3, 0.1)])
def test_gradients_match_formulas(objective, use_mask, w_px, w_pyx, l2):
    model = tiny_model()
    x, y, x_q, y_q = batch()
    labeled = torch.tensor([1, 0, 1, 1, 0, 1, 0], dtype=torch.bool) if use_mask else None
    y_in = torch.where(labeled, y, -1) if use_mask else y  # unlabeled rows carry junk labels
    loss, terms = jem_loss(
        model,
        x,
        y_in,
        x_q,
        labeled=labeled,
        objective=objective,
        w_px=w_px,
        w_pyx=w_pyx,
        l2_energy=l2,
        y_q=y_q,
    )
    ref = reference_loss(model, x, y, x_q, y_q, objective, labeled, w_px, w_pyx, l2)
    params = list(model.parameters())
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert terms["loss"] == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)


def test_terms_values():
    model = tiny_model()
    x, y, x_q, y_q = batch()
    labeled = torch.tensor([1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    _, t = jem_loss(model, x, y, x_q, labeled=labeled)
    with torch.no_grad():
        logits = model(x)
        e_d = -torch.logsumexp(logits, 1)
        e_q = -torch.logsumexp(model(x_q), 1)
        acc = (logits.argmax(1) == y)[labeled].double().mean()
        ce = F.cross_entropy(logits[labeled], y[labeled])
    assert t["ce"] == pytest.approx(ce.item(), rel=1e-10)
    assert t["energy_data"] == pytest.approx(e_d.mean().item(), rel=1e-10)
    assert t["energy_sample"] == pytest.approx(e_q.mean().item(), rel=1e-10)
    assert t["px"] == pytest.approx((e_d.mean() - e_q.mean()).item(), rel=1e-10)
    assert t["accuracy"] == pytest.approx(acc.item())
    assert all(isinstance(v, float) for v in t.values())


def test_factored_terms_use_class_energy():
    model = tiny_model()
    x, y, x_q, y_q = batch()
    _, t = jem_loss(model, x, y, x_q, objective="factored", y_q=y_q)
    with torch.no_grad():
        e_d = -model(x).gather(1, y[:, None]).mean()
        e_q = -model(x_q).gather(1, y_q[:, None]).mean()
    assert t["energy_data"] == pytest.approx(e_d.item(), rel=1e-10)
    assert t["energy_sample"] == pytest.approx(e_q.item(), rel=1e-10)
    # y_q defaults to y (samples drawn for the batch's labels)
    x_q2 = x_q[:3].repeat(3, 1)[:7]
    loss_a, _ = jem_loss(model, x, y, x_q2, objective="factored")
    loss_b, _ = jem_loss(model, x, y, x_q2, objective="factored", y_q=y)
    assert loss_a.item() == loss_b.item()


def test_ce_ignores_samples():
    model = tiny_model()
    x, y, x_q, _ = batch()
    a, ta = jem_loss(model, x, y, None, objective="ce")
    b, tb = jem_loss(model, x, y, torch.full_like(x_q, math.nan), objective="ce")
    assert a.item() == b.item() == pytest.approx(F.cross_entropy(model(x), y).item())
    assert math.isnan(ta["px"]) and math.isnan(ta["energy_sample"])


def test_labeled_mask_restricts_ce():
    model = tiny_model()
    x, y, x_q, _ = batch()
    labeled = torch.tensor([0, 0, 1, 0, 0, 0, 1], dtype=torch.bool)
    y_junk = y.clone()
    y_junk[~labeled] = (y[~labeled] + 1) % 3  # wrong labels on unlabeled rows change nothing
    a, ta = jem_loss(model, x, y, x_q, labeled=labeled, objective="ce")
    b, tb = jem_loss(model, x, y_junk, x_q, labeled=labeled, objective="ce")
    assert a.item() == b.item()
    assert ta["ce"] == pytest.approx(F.cross_entropy(model(x)[labeled], y[labeled]).item())
    # nothing labeled: CE is 0 (no NaN in the loss), accuracy is NaN
    none = torch.zeros(7, dtype=torch.bool)
    c, tc = jem_loss(model, x, y, x_q, labeled=none)
    assert math.isfinite(c.item()) and tc["ce"] == 0.0 and math.isnan(tc["accuracy"])


def test_bad_arguments():
    model = tiny_model()
    x, y, x_q, _ = batch()
    with pytest.raises(ValueError, match="objective"):
        jem_loss(model, x, y, x_q, objective="nope")
    with pytest.raises(ValueError, match="needs samples"):
        jem_loss(model, x, y, None)
    with pytest.raises(ValueError, match="y must have shape"):
        jem_loss(model, x, y[:3], x_q)
    with pytest.raises(ValueError, match="y_q"):
        jem_loss(model, x, y, x_q, objective="factored", y_q=y[:2])
    with pytest.raises(ValueError, match="labeled"):
        jem_loss(model, x, y, x_q, labeled=torch.ones(3, dtype=torch.bool))
    # w_px = 0 needs no samples
    loss, _ = jem_loss(model, x, y, None, w_px=0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("objective", ["jem", "factored", "ce"])
def test_bad_label_raises_the_same_message_on_every_device(device, objective):
    # The CPU kernels raise at once; on CUDA the label record travels with the
    # loss terms' one host read and raises there, before any parameter update.
    model = tiny_model().to(device)
    x, y, x_q, y_q = (t.to(device) for t in batch())
    y[2] = 3
    if device == "cuda":
        from jem_ext import ops

        ops.raise_label_errors(device)
    with pytest.raises(RuntimeError) as err:
        jem_loss(model, x, y, x_q, objective=objective, y_q=y_q)
    assert str(err.value) == "energy_ce: label y[2] = 3 is out of range for 3 classes"


@pytest.mark.cuda
def test_cuda_bad_sample_label_raises_at_the_terms_read():
    from jem_ext import ops

    model = tiny_model().cuda()
    x, y, x_q, y_q = (t.cuda() for t in batch())
    y_q[4] = -2
    ops.raise_label_errors("cuda")
    with pytest.raises(RuntimeError) as err:
        jem_loss(model, x, y, x_q, objective="factored", y_q=y_q)
    assert str(err.value) == "energy: label y[4] = -2 is out of range for 3 classes"


def test_factored_needs_samples_even_with_zero_weight():
    # p(x | y) is the factored objective's only term: without samples there is no loss.
    model = tiny_model()
    x, y, _, _ = batch()
    with pytest.raises(ValueError, match="'factored' with w_px=0.0 needs samples x_q"):
        jem_loss(model, x, y, None, objective="factored", w_px=0.0)


def test_factored_loss_does_not_depend_on_the_cross_entropy_batch():
    # The factored loss has no cross-entropy term at all: a non-finite CE batch x leaves the
    # loss and its gradient, both from the generative batch x_px, as they are.
    model = tiny_model()
    x, y, x_q, y_q = batch()
    x_bad = x.clone()
    x_bad[0] = math.nan
    x_px = x + 0.25
    got, terms = jem_loss(model, x_bad, y, x_q, objective="factored", y_q=y_q, x_px=x_px)
    grads = torch.autograd.grad(got, list(model.parameters()))
    want, _ = jem_loss(model, x_px, y, x_q, objective="factored", y_q=y_q)
    assert math.isnan(terms["ce"]) and math.isfinite(terms["loss"])
    assert torch.equal(got, want)
    for g, w in zip(grads, torch.autograd.grad(want, list(model.parameters())), strict=True):
        assert torch.equal(g, w)
