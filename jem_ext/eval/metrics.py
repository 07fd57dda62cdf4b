"""Scalar evaluation metrics: accuracy (:mod:`jem_ext.metrics`, shared with training),
calibration error, AUROC, FID and Inception Score.

Every function accepts numpy arrays or torch tensors (converted to float64 numpy arrays) and
returns plain Python floats (or a small dataclass of numpy arrays for calibration).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.special import rel_entr
from sklearn.metrics import roc_auc_score

from ..metrics import accuracy
from ..metrics import as_numpy as _as_numpy

__all__ = [
    "accuracy",
    "CalibrationResult",
    "expected_calibration_error",
    "auroc",
    "feature_stats",
    "fid_from_stats",
    "fid",
    "inception_score",
]


@dataclass(frozen=True)
class CalibrationResult:
    """Expected calibration error and the per-bin statistics behind it.

    Attributes:
        ece: expected calibration error, a fraction in [0, 1].
        bin_edges: ``[n_bins + 1]`` equally spaced edges on [0, 1].
        counts: ``[n_bins]`` number of samples per bin.
        accuracy: ``[n_bins]`` fraction of correct predictions per bin (NaN for empty bins).
        confidence: ``[n_bins]`` mean max-probability per bin (NaN for empty bins).
    """

    ece: float
    bin_edges: np.ndarray
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray


def expected_calibration_error(probs, labels, n_bins: int = 20) -> CalibrationResult:
    """Expected calibration error of a classifier over equal-width confidence bins.

    With confidence c_i = max_k p(k | x_i), prediction argmax_k p(k | x_i) and bins B_m,

        ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|,

    where acc(B_m) is the fraction of correct predictions in B_m and conf(B_m) the mean
    confidence in B_m; empty bins contribute nothing.

    Bin convention: the edges are ``np.linspace(0, 1, n_bins + 1)`` and bins are right-closed,
    B_m = (edges[m], edges[m+1]], as in Guo et al.'s (2017) widely used ECE code; a confidence
    of exactly 0 (which that code drops) goes
    to the first bin and a confidence of exactly 1 to the last one (values outside [0, 1] are
    clipped into the end bins too).

    Args:
        probs: ``[N, K]`` predicted class probabilities.
        labels: ``[N]`` integer true labels.
        n_bins: number of bins (the JEM paper uses 20).
    """
    probs = _as_numpy(probs)
    labels = _as_numpy(labels, dtype=None)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(
            f"expected probs [N, K] and labels [N], got {probs.shape} and {labels.shape}"
        )
    if probs.shape[0] == 0:
        raise ValueError("expected_calibration_error needs at least one sample")
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")

    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") returns the first edge >= c, so c in (edges[m], edges[m+1]] -> m.
    bin_index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)

    counts = np.bincount(bin_index, minlength=n_bins)
    correct_sum = np.bincount(bin_index, weights=correct, minlength=n_bins)
    confidence_sum = np.bincount(bin_index, weights=confidence, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_accuracy = np.where(counts > 0, correct_sum / counts, np.nan)
        bin_confidence = np.where(counts > 0, confidence_sum / counts, np.nan)

    nonempty = counts > 0
    ece = np.sum(
        counts[nonempty]
        / probs.shape[0]
        * np.abs(bin_accuracy[nonempty] - bin_confidence[nonempty])
    )
    return CalibrationResult(
        ece=float(ece),
        bin_edges=edges,
        counts=counts,
        accuracy=bin_accuracy,
        confidence=bin_confidence,
    )


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve for separating in-distribution from out-of-distribution data.

    In-distribution samples are the positive class, so higher scores must mean "more
    in-distribution" (e.g. log p(x) or max p(y | x)). Equals the Mann-Whitney probability
    P(s_in > s_out) + 0.5 P(s_in = s_out) over all (in, out) pairs; computed with
    :func:`sklearn.metrics.roc_auc_score`.
    """
    scores_in = _as_numpy(scores_in).ravel()
    scores_out = _as_numpy(scores_out).ravel()
    if scores_in.size == 0 or scores_out.size == 0:
        raise ValueError("auroc needs at least one in-distribution and one OOD score")
    labels = np.concatenate([np.ones(scores_in.size), np.zeros(scores_out.size)])
    return float(roc_auc_score(labels, np.concatenate([scores_in, scores_out])))


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``[N, D]`` features."""
    features = _as_numpy(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

        FID = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)),

    computed in float64 with :func:`scipy.linalg.sqrtm`, as in pytorch-fid: when the matrix
    square root is not finite (a singular product), ``eps * I`` is added to both covariances
    before retrying; tiny imaginary parts from round-off are dropped (a ``ValueError`` is
    raised when the diagonal's imaginary part exceeds 1e-3, which signals a real problem).
    """
    mu1, mu2 = np.atleast_1d(_as_numpy(mu1)), np.atleast_1d(_as_numpy(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_numpy(sigma1)), np.atleast_2d(_as_numpy(sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"inconsistent shapes: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
            f"mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(
                f"sqrtm(sigma1 sigma2) has a large imaginary component "
                f"({np.max(np.abs(covmean.imag)):.3g})"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid(features1, features2, eps: float = 1e-6) -> float:
    """FID between two ``[N, D]`` feature sets (Gaussian fits by :func:`feature_stats`)."""
    mu1, sigma1 = feature_stats(features1)
    mu2, sigma2 = feature_stats(features2)
    return fid_from_stats(mu1, sigma1, mu2, sigma2, eps=eps)


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """Inception Score: mean and standard deviation over ``splits`` contiguous chunks of

        IS = exp( E_x KL( p(y | x) || p(y) ) ),   p(y) = mean of p(y | x) over the chunk,

    as in the original improved-GAN code (chunk i holds rows [i N / s, (i + 1) N / s)).
    Terms with p(y | x) = 0 contribute 0 to the KL divergence.

    Args:
        probs: ``[N, K]`` class probabilities p(y | x) of the generated samples.
        splits: number of chunks (10 in the literature).
    """
    probs = _as_numpy(probs)
    if probs.ndim != 2:
        raise ValueError(f"expected probs [N, K], got shape {probs.shape}")
    n = probs.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need 1 <= splits <= N, got splits={splits} and N={n}")
    scores = []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        p_y = part.mean(axis=0, keepdims=True)
        kl = rel_entr(part, p_y).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
