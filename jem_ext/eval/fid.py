"""The fid task: IS of the fresh-chain samples and their FID against the test images (and the
FID of as many replay-buffer samples), in the features of the FID Inception-v3 or of another
classifier (--fid-classifier).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .features import classifier_features, extract
from .generation import buffer_pick
from .inception import InceptionV3, load_inception
from .inputs import EvalData, Loaded, load_model
from .metrics import fid, inception_score
from .settings import EvalError, EvalSettings

__all__ = ["FIDNetwork", "FIDResult", "prepare_fid", "run_fid"]


@dataclass
class FIDNetwork:
    """The network IS and FID are measured with, and its features of the test images."""

    kind: str  # "inception" or "classifier"
    features: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    note: str
    test_features: np.ndarray | None = None

    def of(self, x: torch.Tensor, settings: EvalSettings, desc: str) -> tuple[np.ndarray, ...]:
        return extract(
            self.features,
            x,
            settings.data.batch_size,
            settings.data.device,
            desc,
            settings.display.progress,
        )

    def of_test(self, data: EvalData, settings: EvalSettings) -> np.ndarray:
        """Features of the test images, computed once and shared by both models."""
        if self.test_features is None:
            self.test_features = self.of(data.x, settings, "features test")[0]
        return self.test_features


def _inception_features(net: InceptionV3):
    def features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, _ = net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
        return feats, torch.softmax(net.score_logits(feats).double(), 1)

    return features


def prepare_fid(settings: EvalSettings, main: Loaded) -> tuple[FIDNetwork | None, str | None]:
    """The IS/FID network from --inception-weights or --fid-classifier, or the skip reason."""
    if settings.fid.inception_weights:
        if not main.is_image:
            raise EvalError(f"--inception-weights: samples of shape {main.in_shape} are not images")
        try:
            net = load_inception(settings.fid.inception_weights, settings.data.device)
        except ValueError as err:
            raise EvalError(f"--inception-weights: {err}") from None
        return FIDNetwork(
            "inception",
            _inception_features(net),
            "FID Inception-v3 (pool3 features; IS from the 1008-way logits "
            "without the fc bias, as the original IS code)",
        ), None
    if settings.fid.fid_classifier:
        clf = load_model(settings.fid.fid_classifier, settings.data.device, "--fid-classifier")
        if clf.in_shape != main.in_shape:
            raise EvalError(
                f"--fid-classifier {clf.path}: its model takes {clf.in_shape}, "
                f"the evaluated model {main.in_shape}"
            )
        return FIDNetwork(
            "classifier",
            lambda x: classifier_features(clf.model, x),
            f"features of classifier {clf.path}: NOT comparable with published "
            "Inception-based figures",
        ), None
    return None, (
        "no --inception-weights (FID Inception-v3 state_dict) and no "
        "--fid-classifier given; nothing is downloaded at run time"
    )


@dataclass
class FIDResult:
    """IS of the fresh samples and FID between them and the test images (or why skipped)."""

    skipped: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"fid": {"skipped": self.skipped} if self.skipped else dict(self.figures)}


def run_fid(
    m: Loaded, data: EvalData, settings: EvalSettings, net: FIDNetwork, samples: torch.Tensor
) -> FIDResult:
    """IS of ``samples`` (fresh-chain samples) and their FID against the test images; the same
    FID of as many replay-buffer samples when the checkpoint holds a buffer."""
    f_gen, p_gen = net.of(samples, settings, f"{m.label}: features gen")
    f_test = net.of_test(data, settings)
    buffer = buffer_pick(m, len(samples), settings.data.seed + 4)
    splits = min(10, len(samples))
    is_mean, is_std = inception_score(p_gen, splits=splits)
    out = {
        "network": net.kind,
        "note": net.note,
        "n_generated": len(samples),
        "n_test": len(data.x),
        "feature_dim": int(f_gen.shape[1]),
        "fid": fid(f_gen, f_test),
        "is_mean": is_mean,
        "is_std": is_std,
        "is_splits": splits,
        "comparable_with_published": net.kind == "inception",
    }
    if buffer is not None:
        out["fid_buffer"] = fid(net.of(buffer, settings, f"{m.label}: features buffer")[0], f_test)
        out["n_buffer"] = len(buffer)
    if min(len(samples), len(data.x)) <= f_gen.shape[1]:
        out["warning"] = (
            f"fewer samples than feature dimensions ({f_gen.shape[1]}): the "
            "covariances are singular and the FID is unreliable (use more "
            "--gen-n and test images)"
        )
    return FIDResult(figures=out)
