"""The wide residual network of JEM (``wideresnet.py`` of wgrathwohl/JEM) and the named 2-D
normalisation layers it and the other classifiers share.

:class:`WideResNet` stacks pre-activation wide residual blocks (:class:`WideBasic`) with
LeakyReLU(0.2) and no normalisation by default (JEM finds BatchNorm harmful for SGLD sampling).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["NORMS", "WideBasic", "WideResNet"]

NORMS = (None, "batch", "instance", "layer")


def _norm2d(channels: int, norm: str | None) -> nn.Module:
    """A 2-D normalisation layer by name (identity for None)."""
    if norm is None:
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")


class WideBasic(nn.Module):
    """Pre-activation wide residual block: norm, lrelu, conv3x3, dropout, norm, lrelu, conv3x3.

    As in the JEM reference, the stride sits on the second convolution and the shortcut is a
    strided 1x1 convolution whenever the shape changes.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        norm: str | None = None,
        dropout: float = 0.0,
        leak: float = 0.2,
    ) -> None:
        super().__init__()
        self.norm1 = _norm2d(in_planes, norm)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm2 = _norm2d(planes, norm)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1)
        self.act = nn.LeakyReLU(leak)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride)
            if stride != 1 or in_planes != planes
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(self.conv1(self.act(self.norm1(x))))
        out = self.conv2(self.act(self.norm2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-k (Zagoruyko & Komodakis 2016) as used by JEM.

    A 3x3 conv to 16 channels, three groups of ``(depth - 4) / 6`` :class:`WideBasic` blocks of
    widths ``16k, 32k, 64k`` with strides 1, 2, 2, then norm + LeakyReLU, global average pooling
    and a linear head. WRN-28-10 with 10 classes has about 36.5M parameters. Any input of at
    least 8x8 pixels works.

    Args:
        depth: total depth, ``6n + 4``.
        widen_factor: width multiplier ``k``.
        num_classes: number of logits.
        in_channels: image channels.
        norm: None (default, JEM), "batch", "instance" or "layer" (GroupNorm with one group).
        dropout: dropout rate between the two convolutions of each block.
        leak: LeakyReLU negative slope.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str | None = None,
        dropout: float = 0.0,
        leak: float = 0.2,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet: expected depth = 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1)
        blocks: list[nn.Module] = []
        in_planes = 16
        for width, stride in zip(widths, (1, 2, 2)):
            for i in range(n):
                blocks.append(
                    WideBasic(in_planes, width, stride if i == 0 else 1, norm, dropout, leak)
                )
                in_planes = width
        self.blocks = nn.Sequential(*blocks)
        self.norm = _norm2d(in_planes, norm)
        self.act = nn.LeakyReLU(leak)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm(self.blocks(self.conv1(x))))
        return self.linear(out.mean(dim=(2, 3)))
