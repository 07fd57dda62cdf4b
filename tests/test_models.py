"""Tests for jem_ext.models: shapes, norms, parameter count, input gradients, spec round trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from jem_ext.models import (
    MLP,
    NORMS,
    SmallCNN,
    WideResNet,
    build_from_spec,
    build_model,
    meta_model,
    model_spec,
)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 8)])
def test_wideresnet_shapes(norm, in_channels, size):
    model = WideResNet(depth=10, widen_factor=1, num_classes=7, in_channels=in_channels, norm=norm)
    x = torch.randn(4, in_channels, size, size)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (4, 7) and torch.isfinite(out).all()


def test_wideresnet_structure_and_size():
    model = WideResNet(depth=28, widen_factor=10, num_classes=10)
    assert len(model.blocks) == 12
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert abs(_n_params(model) - 36.5e6) < 0.1e6  # the usual WRN-28-10 figure
    with pytest.raises(ValueError, match="depth = 6n \\+ 4"):
        WideResNet(depth=27)


def test_wideresnet_dropout_only_in_train_mode():
    model = WideResNet(depth=10, widen_factor=1, dropout=0.5)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("in_channels,size", [(1, 8), (3, 32)])
def test_small_cnn_shapes(norm, in_channels, size):
    model = SmallCNN(in_channels, num_classes=10, image_size=size, norm=norm, dropout=0.1)
    x = torch.randn(5, in_channels, size, size)
    for train in (True, False):
        model.train(train)
        assert model(x).shape == (5, 10)


def test_small_cnn_downsamples_to_4x4():
    model = SmallCNN(in_channels=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [1, 2, 2, 2, 1]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128, 128]
    assert _n_params(SmallCNN()) < 100_000


@pytest.mark.parametrize("act", ["swish", "lrelu"])
def test_mlp_shapes(act):
    model = MLP(in_dim=2, num_classes=3, hidden=16, depth=2, act=act)
    assert model(torch.randn(7, 2)).shape == (7, 3)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3
    with pytest.raises(ValueError, match="act expected one of"):
        MLP(act="relu6")


@pytest.mark.parametrize(
    "name,in_shape,kwargs",
    [
        ("wrn", (3, 16, 16), {"depth": 10, "widen_factor": 1}),
        ("small_cnn", (1, 8, 8), {}),
        ("mlp", (2,), {"hidden": 32}),
    ],
)
def test_input_gradient_exists(name, in_shape, kwargs):
    model = build_model(name, 4, in_shape, **kwargs).eval()
    x = torch.randn(3, *in_shape, requires_grad=True)
    energy = -model(x).logsumexp(dim=1).sum()
    (grad,) = torch.autograd.grad(energy, x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name,in_shape,kwargs",
    [
        ("wrn", (3, 32, 32), {"depth": 16, "widen_factor": 2, "norm": "layer", "leak": 0.1}),
        ("small_cnn", (3, 32, 32), {"width": 8, "norm": "batch"}),
        ("mlp", (2,), {"hidden": 8, "depth": 2, "act": "lrelu"}),
    ],
)
def test_spec_round_trip(name, in_shape, kwargs):
    model = build_model(name, 5, in_shape, **kwargs).eval()
    spec = json.loads(json.dumps(model_spec(model)))
    assert spec == {"name": name, "num_classes": 5, "in_shape": list(in_shape), "kwargs": kwargs}
    clone = build_from_spec(spec).eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, *in_shape)
    assert torch.equal(model(x), clone(x))
    assert model_spec(clone) == spec


def test_build_model_derives_shapes():
    model = build_model("small_cnn", 10, (1, 8, 8))
    assert isinstance(model, SmallCNN) and model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    wrn = build_model("wrn", 100, (1, 28, 28), depth=10, widen_factor=1)
    assert wrn.conv1.in_channels == 1 and wrn.linear.out_features == 100
    assert build_model("mlp", 3, (2,)).net[0].in_features == 2


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*wrn, small_cnn, mlp"):
        build_model("resnet", 10, (3, 32, 32))
    with pytest.raises(ValueError, match=r"wrn: expected in_shape \(C, H, W\)"):
        build_model("wrn", 10, (2,))
    with pytest.raises(ValueError, match="JSON-serialisable"):
        build_model("mlp", 2, (2,), hidden=torch.tensor(3))
    with pytest.raises(ValueError, match="norm: expected one of"):
        build_model("small_cnn", 10, (1, 8, 8), norm="group")
    with pytest.raises(ValueError, match="no jem_spec"):
        model_spec(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="missing \\['in_shape'\\]"):
        build_from_spec({"name": "mlp", "num_classes": 2})


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("mlp", {"hidden": 0}, "hidden >= 1"),
        ("mlp", {"depth": -4}, "depth >= 1"),
        ("small_cnn", {"width": 0}, "width >= 1"),
        ("wrn", {"widen_factor": -1}, "widen_factor >= 1"),
        ("small_cnn", {"dropout": 1.5}, "dropout in"),
        ("mlp", {"hidden": 10**8, "depth": 2}, "parameters, more than"),
    ],
)
def test_out_of_range_arguments_are_refused_before_building(name, kwargs, message):
    shape = (2,) if name == "mlp" else (3, 8, 8)
    with pytest.raises(ValueError, match=message):
        build_model(name, 3, shape, **kwargs)


def test_meta_model_allocates_nothing_and_keeps_the_rng():
    state = torch.get_rng_state()
    model = meta_model(
        {
            "name": "wrn",
            "num_classes": 10,
            "in_shape": [3, 32, 32],
            "kwargs": {"depth": 16, "widen_factor": 8},
        }
    )
    assert all(p.device.type == "meta" for p in model.parameters())
    assert torch.equal(state, torch.get_rng_state())


def test_wrn_names_are_importable_from_models():
    from jem_ext import models, wrn

    for name in ("NORMS", "WideBasic", "WideResNet"):
        assert getattr(models, name) is getattr(wrn, name)
