"""The FID Inception-v3 network and the loading of its weights.

:class:`InceptionV3` reproduces, in plain torch, the network used by the standard FID code
(pytorch-fid): torchvision's ``Inception3`` layout with 1008 output classes, no auxiliary
head, and the "FID" block variants that port TensorFlow's 2015 Inception graph
(``FIDInceptionA``/``C``/``E_1`` average-pool without counting padding, ``FIDInceptionE_2``
max-pools in its pooling branch). Parameter names match torchvision / pytorch-fid, so the
standard FID weights file (``pt_inception-2015-12-05-6726825d.pth``, used by pytorch-fid and
torch-fidelity) loads with :func:`load_inception`; given the same state_dict, the pool features
equal pytorch-fid's (tests/test_inception.py checks this when pytorch-fid is installed).
Nothing is downloaded: the weights file must already be on disk. Batched feature extraction
and the classifier fallback are in :mod:`jem_ext.eval.features`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InceptionV3", "load_inception"]

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that ignores padding, as TensorFlow's Inception does."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Inception block A (35x35 grid); outputs 224 + ``pool_features`` channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17; outputs 480 + ``in_channels`` channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionC(nn.Module):
    """Inception block C (17x17 grid, factorised 7x7 convolutions); outputs 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8; outputs 512 + ``in_channels`` channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = x
        for layer in (
            self.branch7x7x3_1,
            self.branch7x7x3_2,
            self.branch7x7x3_3,
            self.branch7x7x3_4,
        ):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class FIDInceptionE(nn.Module):
    """Inception block E (8x8 grid, expanded filter banks); outputs 2048 channels.

    ``pool="avg"`` is pytorch-fid's ``FIDInceptionE_1`` (average pool ignoring padding) and
    ``pool="max"`` its ``FIDInceptionE_2`` (a bug of TensorFlow's graph kept for fidelity).
    """

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], dim=1)


class InceptionV3(nn.Module):
    """FID Inception-v3: images in [-1, 1] of any size -> (pool features, logits).

    Inputs ``[N, 3, H, W]`` are resized bilinearly (``align_corners=False``) to 299x299 when
    needed, exactly like pytorch-fid; unlike pytorch-fid they are expected already in [-1, 1]
    (JEM's data range), so no rescaling is applied. ``forward`` returns the 2048-d
    average-pool features used by FID and the 1008 logits of the classifier;
    :meth:`score_logits` gives the logits the Inception Score uses. The network is meant for
    inference only (no dropout or auxiliary head); use it in eval mode, as
    :func:`load_inception` returns it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(features [N, 2048], logits [N, 1008])`` for images ``[N, 3, H, W]``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(
                x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
            )
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        features = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return features, self.fc(features)

    def score_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The 1008 logits the Inception Score is computed from: ``features @ fc.weight.T``.

        As in the original Inception Score code (which multiplies the pool features by the
        softmax layer's weight matrix) and torch-fidelity's ``logits_unbiased``: the bias is
        left out and all 1008 outputs of the 2015 graph (ImageNet's 1000 classes and 8 unused
        ones) enter the softmax.
        """
        return features @ self.fc.weight.T


def _describe(keys, limit: int = 5) -> str:
    """A short, sorted listing of at most ``limit`` keys."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The plain state_dict in ``path`` (raises a one-line ValueError when there is none)."""
    if not os.path.isfile(path):
        raise ValueError(f"Inception weights file not found: {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt or foreign file fails with almost any exception type
        # torch's own message spans many lines of advice that does not apply here.
        raise ValueError(
            f"{path!r} is not a state_dict file (torch.load with weights_only=True cannot "
            "read it: a truncated or corrupt file, or a pickle of other objects)"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{path!r} is not a state_dict file (it holds a {type(state).__name__}, not a "
            "mapping of names to tensors)"
        )
    return dict(state)


def _mismatches(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> list[str]:
    """Missing keys, unexpected keys and wrong shapes of ``state`` against ``expected``."""
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    wrong_shape = [
        f"{k}: {tuple(state[k].shape)} instead of {tuple(expected[k].shape)}"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_describe(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_describe(unexpected)})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} wrong shapes ({_describe(wrong_shape)})")
    return problems


def load_inception(path: str | os.PathLike, device: torch.device | str = "cpu") -> InceptionV3:
    """Build :class:`InceptionV3` from a state_dict file, in eval mode, on ``device``.

    The file is the standard FID weights file (pytorch-fid's and torch-fidelity's
    ``pt_inception-2015-12-05-6726825d.pth``) or any state_dict with the same keys. It is read
    with ``torch.load(weights_only=True)`` and must hold exactly the network's keys and shapes
    (BatchNorm ``num_batches_tracked`` buffers may be absent, as in that file). Parameters are
    frozen (``requires_grad=False``).

    Raises:
        ValueError: in one line, naming the problem: the file is missing, is not a state_dict
            file (unreadable, truncated, a pickle of other objects, not a mapping of tensors),
            or has missing keys, unexpected keys or wrong shapes.
    """
    path = os.fspath(path)
    state = _read_state_dict(path)
    model = InceptionV3()
    expected = model.state_dict()
    for key in expected.keys() - state.keys():
        if key.endswith("num_batches_tracked"):
            state[key] = expected[key]
    problems = _mismatches(state, expected)
    if problems:
        raise ValueError(f"{path!r} is not an FID Inception-v3 state_dict: " + "; ".join(problems))
    model.load_state_dict(state)
    model.requires_grad_(False)
    return model.to(device).eval()
