"""FID Inception-v3: shapes, state_dict round trip, clear loading errors, feature helpers."""

import numpy as np
import pytest
import torch
from torch import nn

from jem_ext.eval.inception import InceptionV3, classifier_features, extract, load_inception


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


def test_corrupt_file_error(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"this is not a torch checkpoint" * 10)
    with pytest.raises(ValueError, match="could not be read"):
        load_inception(path)


def test_non_state_dict_errors(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        load_inception(tmp_path / "list.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not weights-only
    with pytest.raises(ValueError, match="could not be read"):
        load_inception(tmp_path / "module.pt")


def test_foreign_state_dict_error_lists_keys(tmp_path):
    torch.save(nn.Linear(2048, 10).state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(ValueError) as err:
        load_inception(tmp_path / "foreign.pt")
    message = str(err.value)
    assert "missing keys" in message and "Conv2d_1a_3x3.bn.bias" in message
    assert "unexpected keys" in message and "weight" in message


def test_wrong_shape_error(saved_inception, tmp_path):
    _, path = saved_inception
    state = torch.load(path, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)
    state["fc.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "imagenet1000.pt")
    with pytest.raises(ValueError, match=r"2 wrong shapes .*fc\.bias: \(1000,\) instead of"):
        load_inception(tmp_path / "imagenet1000.pt")


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
    features, probs = extract(lambda b: classifier_features(model, b), x, batch_size=4,
                              progress=False)
    assert isinstance(features, np.ndarray) and features.shape == (11, 16)
    np.testing.assert_allclose(probs, torch.softmax(model(x), 1).detach().numpy(), rtol=1e-5)
    logits = extract(model, x.numpy(), batch_size=5, progress=False)
    assert isinstance(logits, np.ndarray) and logits.shape == (11, 5)
