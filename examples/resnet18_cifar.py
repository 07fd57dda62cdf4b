"""A torchvision ResNet-18 for 32x32 images, trained as a JEM by jem_ext.

Two factories for ``--model PACKAGE.MODULE:FACTORY`` (run from the repository root, or with the
folder that holds ``examples/`` on ``PYTHONPATH``):

    python -m jem_ext.train --model examples.resnet18_cifar:resnet18 \\
        --dataset folder --data-root cifar10 --max-minutes 30
    python -m jem_ext.train --model examples.resnet18_cifar:resnet18_groupnorm ...

Each is called as ``factory(num_classes, in_shape)`` with ``in_shape`` ``(C, H, W)`` and returns
the network, whose logits JEM reads as energies. torchvision's ResNet-18 is made for 224x224
ImageNet images: its 7x7 stride-2 stem and max-pool shrink a 32x32 image to 8x8 before the first
block. The CIFAR form used here (as in He et al.'s CIFAR ResNets) has a 3x3 stride-1 stem and no
max-pool, so the four stages see 32, 16, 8 and 4 pixels.

``resnet18`` keeps torchvision's BatchNorm. In training, BatchNorm normalises each forward by
its own batch, so jem_ext sends data and SGLD samples through separate forwards, and the running
statistics, which the chains (in eval mode) and the evaluation use, mix data and samples; the
trainer prints a note saying so. ``resnet18_groupnorm`` replaces it with GroupNorm (32 groups),
which normalises each image on its own, as JEM prefers.

torchvision is not a dependency of jem_ext: install the build made for your torch
(``pip install torchvision``; torch 2.13 goes with torchvision 0.28).
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18 as tv_resnet18


def _cifar_stem(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace ImageNet's 7x7 stride-2 stem and max-pool by a 3x3 stride-1 convolution."""
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _check(in_shape: tuple[int, ...]) -> int:
    if len(in_shape) != 3:
        raise ValueError(f"ResNet-18 takes images (C, H, W), got samples of shape {in_shape}")
    return in_shape[0]


def resnet18(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """torchvision's ResNet-18 (BatchNorm) with a CIFAR stem, ``num_classes`` logits."""
    return _cifar_stem(tv_resnet18(num_classes=num_classes), _check(in_shape))


def resnet18_groupnorm(num_classes: int, in_shape: tuple[int, ...]) -> nn.Module:
    """torchvision's ResNet-18 with GroupNorm(32) instead of BatchNorm, and a CIFAR stem."""
    model = tv_resnet18(num_classes=num_classes, norm_layer=lambda c: nn.GroupNorm(32, c))
    return _cifar_stem(model, _check(in_shape))
