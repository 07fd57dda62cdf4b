"""FID Inception-v3: shapes, state_dict round trip, clear loading errors, feature helpers."""

import importlib
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from jem_ext.eval.features import classifier_features, extract
from jem_ext.eval.inception import InceptionV3, load_inception


@pytest.fixture(scope="module")
def saved_inception(tmp_path_factory):
    """A randomly initialised network and the path of its saved state_dict."""
    torch.manual_seed(0)
    net = InceptionV3().eval()
    path = tmp_path_factory.mktemp("inception") / "random_inception.pt"
    torch.save(net.state_dict(), path)
    return net, path


def test_parameter_count_matches_fid_inception(saved_inception):
    net, _ = saved_inception
    # torchvision's Inception3 without the auxiliary head, with a 1008-way classifier
    assert sum(p.numel() for p in net.parameters()) == 23_850_960


def test_output_shapes_and_round_trip(saved_inception):
    net, path = saved_inception
    loaded = load_inception(path, "cpu")
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    expected = net.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # resized to 299x299 inside
    with torch.no_grad():
        features, logits = loaded(x)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()


def test_missing_num_batches_tracked_is_accepted(saved_inception, tmp_path):
    _, path = saved_inception
    state = torch.load(path, weights_only=True)
    old_style = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old_style, tmp_path / "old.pt")
    assert isinstance(load_inception(tmp_path / "old.pt"), InceptionV3)


def test_missing_file_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_inception(tmp_path / "nope.pt")


def _garbage(tmp_path, saved):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a torch checkpoint" * 10)
    return path


def _truncated(tmp_path, saved):
    path = tmp_path / "truncated.pt"
    path.write_bytes(saved.read_bytes()[:100_000])
    return path


def _pickled_module(tmp_path, saved):
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), path)  # a pickled module: refused by a weights-only load
    return path


def _list(tmp_path, saved):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    return path


@pytest.mark.parametrize("make", [_garbage, _truncated, _pickled_module, _list])
def test_not_a_state_dict_file_is_one_line(saved_inception, tmp_path, make):
    path = make(tmp_path, saved_inception[1])
    with pytest.raises(ValueError) as err:
        load_inception(path)
    message = str(err.value)
    assert "is not a state_dict file" in message
    assert "\n" not in message and "weights_only=False" not in message


def test_foreign_state_dict_error_lists_keys(tmp_path):
    torch.save(nn.Linear(2048, 10).state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(ValueError) as err:
        load_inception(tmp_path / "foreign.pt")
    message = str(err.value)
    assert "missing keys" in message and "Conv2d_1a_3x3.bn.bias" in message
    assert "unexpected keys" in message and "weight" in message
    assert "\n" not in message


def test_wrong_shape_error(saved_inception, tmp_path):
    _, path = saved_inception
    state = torch.load(path, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)
    state["fc.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "imagenet1000.pt")
    with pytest.raises(ValueError, match=r"2 wrong shapes .*fc\.bias: \(1000,\) instead of"):
        load_inception(tmp_path / "imagenet1000.pt")


def test_score_logits_are_fc_without_bias(saved_inception):
    net, _ = saved_inception
    features = torch.randn(4, 2048)
    expected = net.fc(features) - net.fc.bias
    torch.testing.assert_close(net.score_logits(features), expected, rtol=1e-5, atol=1e-5)


def _pytorch_fid_inception():
    """pytorch-fid's inception module, or skip the test when it cannot be imported.

    A CUDA build of torchvision on a CPU-only torch fails while registering fake kernels of
    its C ops (nms, roi_align, ...); the Inception layers use none of them, so that one
    registration module is stubbed out before torchvision is imported again.
    """
    try:
        return importlib.import_module("pytorch_fid.inception")
    except ImportError as err:
        pytest.skip(f"pytorch-fid is not installed ({err})")
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith(("torchvision", "pytorch_fid"))]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
    try:
        return importlib.import_module("pytorch_fid.inception")
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
        pytest.skip(f"pytorch-fid cannot be imported here: {err}")


def test_pool_features_equal_pytorch_fid(monkeypatch):
    """Same random state_dict, same images: the 2048-d features equal pytorch-fid's."""
    pfi = _pytorch_fid_inception()
    torch.manual_seed(3)
    ours = InceptionV3().eval()
    state = ours.state_dict()
    for key, value in state.items():  # running statistics away from (0, 1), so they matter
        if key.endswith("running_mean"):
            value.normal_(0.0, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
    ours.load_state_dict(state)
    # The file pytorch-fid would download holds no num_batches_tracked buffers either.
    weights = {k: v.clone() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: weights)
    theirs = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = torch.rand(3, 3, 40, 40) * 2 - 1  # JEM's [-1, 1]; pytorch-fid takes [0, 1]
    with torch.no_grad():
        expected = theirs((x + 1) / 2)[0].flatten(1)
        features, _ = ours(x)
    assert features.shape == (3, 2048)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.body(x), 1))


def test_classifier_features_are_head_inputs():
    torch.manual_seed(1)
    model = SmallNet()
    x = torch.randn(6, 3, 8, 8)
    features, probs = classifier_features(model, x)
    torch.testing.assert_close(features, torch.flatten(model.body(x), 1))
    torch.testing.assert_close(probs, torch.softmax(model(x), 1))
    assert not model.head._forward_hooks  # the hook is removed


def test_extract_batches_and_mirrors_outputs():
    torch.manual_seed(2)
    model = SmallNet()
    x = torch.randn(11, 3, 8, 8)
    features, probs = extract(
        lambda b: classifier_features(model, b), x, batch_size=4, progress=False
    )
    assert isinstance(features, np.ndarray) and features.shape == (11, 16)
    np.testing.assert_allclose(probs, torch.softmax(model(x), 1).detach().numpy(), rtol=1e-5)
    logits = extract(model, x.numpy(), batch_size=5, progress=False)
    assert isinstance(logits, np.ndarray) and logits.shape == (11, 5)
