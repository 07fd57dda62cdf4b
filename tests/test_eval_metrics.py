"""Metrics against independent computations, and the plots writing valid PNGs."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.stats import ortho_group

from jem_ext.eval.metrics import (
    auroc,
    expected_calibration_error,
    feature_stats,
    fid,
    fid_from_stats,
    inception_score,
)
from jem_ext.eval.plots import logpx_histograms, reliability_diagram, robustness_curve

# ----------------------------------------------------------------------------- ECE


def test_ece_hand_worked_case():
    probs = np.array(
        [
            [0.90, 0.05, 0.05],  # label 0: conf 0.90, correct -> bin (0.8, 1.0]
            [0.70, 0.20, 0.10],  # label 1: conf 0.70, wrong   -> bin (0.6, 0.8]
            [0.10, 0.85, 0.05],  # label 1: conf 0.85, correct -> bin (0.8, 1.0]
            [0.50, 0.30, 0.20],  # label 0: conf 0.50, correct -> bin (0.4, 0.6]
            [0.40, 0.35, 0.25],  # label 2: conf 0.40, wrong   -> bin (0.2, 0.4] (right-closed)
            [1.00, 0.00, 0.00],  # label 0: conf 1.00, correct -> bin (0.8, 1.0]
        ]
    )
    labels = np.array([0, 1, 1, 0, 2, 0])
    res = expected_calibration_error(probs, labels, n_bins=5)
    # bin (0.8, 1]: 3 samples, acc 1, conf (0.9 + 0.85 + 1) / 3 = 0.91666..., gap 0.08333...
    # bin (0.6, 0.8]: 1 sample, acc 0, conf 0.7 -> gap 0.7
    # bin (0.4, 0.6]: 1 sample, acc 1, conf 0.5 -> gap 0.5
    # bin (0.2, 0.4]: 1 sample, acc 0, conf 0.4 -> gap 0.4
    # ECE = 3/6 * 0.083333 + (0.7 + 0.5 + 0.4) / 6 = 0.0416667 + 0.2666667 = 0.3083333
    assert res.ece == pytest.approx(0.3083333333, abs=1e-9)
    np.testing.assert_array_equal(res.counts, [0, 1, 1, 1, 3])
    np.testing.assert_allclose(res.accuracy[1:], [0.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(res.confidence[1:], [0.4, 0.5, 0.7, 2.75 / 3])
    assert np.isnan(res.accuracy[0]) and np.isnan(res.confidence[0])
    np.testing.assert_allclose(res.bin_edges, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_ece_extreme_confidences_land_in_end_bins():
    probs = np.array([[0.0, 0.0], [1.0, 0.0], [0.05, 0.0]])
    res = expected_calibration_error(probs, np.array([0, 0, 1]), n_bins=20)
    assert res.counts[0] == 2  # confidence 0 and 0.05 (right-closed first bin)
    assert res.counts[-1] == 1
    assert res.counts.sum() == 3


def test_ece_matches_loop_over_intervals():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 10)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 10, size=500)
    conf, pred = probs.max(1), probs.argmax(1)
    expected = 0.0
    for lo, hi in zip(np.linspace(0, 1, 21)[:-1], np.linspace(0, 1, 21)[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            expected += in_bin.mean() * abs((pred == labels)[in_bin].mean() - conf[in_bin].mean())
    res = expected_calibration_error(torch.from_numpy(probs), torch.from_numpy(labels))
    assert res.ece == pytest.approx(expected, abs=1e-12)
    assert res.counts.sum() == 500


# ----------------------------------------------------------------------------- AUROC


def _mann_whitney(scores_in, scores_out):
    wins = sum(
        1.0 if a > b else 0.5 if a == b else 0.0
        for a, b in itertools.product(scores_in, scores_out)
    )
    return wins / (len(scores_in) * len(scores_out))


def test_auroc_hand_computed():
    # pairs won by in-distribution: 0.9 beats all 3 (3); 0.8 beats 0.5, 0.3, ties 0.8 (2.5);
    # 0.4 beats 0.3 (1) -> 6.5 / 9
    assert auroc([0.9, 0.8, 0.4], [0.5, 0.3, 0.8]) == pytest.approx(6.5 / 9)
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 0.0


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(-5, 5), min_size=1, max_size=12),
    st.lists(st.integers(-5, 5), min_size=1, max_size=12),
)
def test_auroc_equals_mann_whitney(scores_in, scores_out):
    assert auroc(np.array(scores_in, float), np.array(scores_out, float)) == pytest.approx(
        _mann_whitney(scores_in, scores_out)
    )


# ----------------------------------------------------------------------------- FID


def _gaussian_fid(mu1, a, mu2, b):
    """Closed form for commuting covariances with eigenvalues a and b in a shared basis."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def test_fid_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    got = fid_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(_gaussian_fid(mu1, a, mu2, b), rel=1e-9)


def test_fid_commuting_covariances_and_symmetry():
    rng = np.random.default_rng(2)
    q = ortho_group.rvs(8, random_state=3)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = _gaussian_fid(mu1, a, mu2, b)
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    assert fid_from_stats(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-7)


def test_fid_identical_stats_is_zero():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(200, 16))
    mu, sigma = feature_stats(feats)
    assert fid_from_stats(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert fid(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_features_uses_mean_and_unbiased_covariance():
    rng = np.random.default_rng(5)
    f1, f2 = rng.normal(size=(300, 5)), rng.normal(1.0, 2.0, size=(250, 5))
    expected = fid_from_stats(f1.mean(0), np.cov(f1.T), f2.mean(0), np.cov(f2.T))
    assert fid(torch.from_numpy(f1).float(), f2) == pytest.approx(expected, rel=1e-5)


def test_fid_singular_covariances_are_finite():
    rng = np.random.default_rng(6)
    # 5 samples in 20 dimensions: rank-deficient covariances, singular product
    value = fid(rng.normal(size=(5, 20)), rng.normal(size=(5, 20)))
    assert np.isfinite(value) and value > 0


# ----------------------------------------------------------------------------- IS


def test_inception_score_one_hot_even_classes_is_k():
    k, splits = 7, 10
    labels = np.arange(k * splits * 3) % k  # every split holds each class 3 times
    mean, std = inception_score(np.eye(k)[labels], splits=splits)
    assert mean == pytest.approx(k)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_identical_predictions_is_one():
    probs = np.tile([0.2, 0.5, 0.3], (40, 1))
    mean, std = inception_score(probs, splits=4)
    assert mean == pytest.approx(1.0)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_two_point_mixture():
    # half the samples predict [1, 0], half [0.5, 0.5]: p(y) = [0.75, 0.25];
    # KL([1,0] || p(y)) = log(4/3), KL([.5,.5] || p(y)) = .5 log(.5/.75) + .5 log(.5/.25)
    kl = 0.5 * np.log(4 / 3) + 0.5 * (0.5 * np.log(2 / 3) + 0.5 * np.log(2))
    probs = np.array([[1.0, 0.0], [0.5, 0.5]] * 10)
    mean, _ = inception_score(probs, splits=1)
    assert mean == pytest.approx(np.exp(kl))


# ----------------------------------------------------------------------------- plots


def _assert_png(path):
    """``path`` is a valid PNG and the only file its folder gained (no temporary file left)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    assert [p.name for p in path.parent.iterdir() if p.is_file()] == [path.name]


def test_failed_plot_leaves_no_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def half_write(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_write)
    curves = {"JEM": [(0.0, 0.9), (0.1, 0.5)]}
    with pytest.raises(OSError, match="disk full"):
        robustness_curve(curves, tmp_path / "robust.png", title="L-inf PGD")
    assert list(tmp_path.iterdir()) == []


def test_plots_write_valid_pngs(tmp_path):
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(10) * 0.3, size=300)
    labels = rng.integers(0, 10, size=300)
    results = {
        "JEM": expected_calibration_error(probs, labels),
        "CE twin": expected_calibration_error(np.sqrt(probs), labels),
    }
    (tmp_path / "first").mkdir()
    reliability_diagram(results, tmp_path / "first" / "reliability.png", title="calibration")
    _assert_png(tmp_path / "first" / "reliability.png")

    logpx_histograms(
        {"CIFAR-10": rng.normal(size=500), "SVHN": np.append(rng.normal(2, 1, 500), -np.inf)},
        tmp_path / "sub" / "logpx.png",
        title="log p(x)",
    )
    _assert_png(tmp_path / "sub" / "logpx.png")

    curves = {"JEM K=10": [(0.0, 0.9), (8 / 255, 0.5)], "CE": [(0.0, 0.95), (8 / 255, 0.01)]}
    robustness_curve(curves, tmp_path / "robust.png", title="L-inf PGD")
    _assert_png(tmp_path / "robust.png")
