"""Batched data augmentation (reflect-pad random crop, horizontal flip, Gaussian noise) and the
check that a data set's images are large enough for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .image_data import DataError, ImageData

__all__ = ["Augment", "check_augment"]


@dataclass(frozen=True)
class Augment:
    """Batched data augmentation: reflect-pad random crop, horizontal flip, Gaussian noise.

    Args:
        pad: reflect-pad each side by this many pixels, then crop back to the input size at a
            random offset (``0`` disables cropping).
        flip: flip each image left-right with probability 1/2.
        noise_sigma: add ``noise_sigma * N(0, 1)`` noise to every value (JEM uses 0.03).

    Calling it on ``x`` (``[B, C, H, W]``; any shape if ``pad == 0`` and ``flip`` is False)
    returns a new tensor on ``x``'s device. Random numbers come from ``generator`` when given
    (drawn on the generator's device), so results are reproducible.
    """

    pad: int = 4
    flip: bool = True
    noise_sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.pad < 0 or self.noise_sigma < 0:
            raise ValueError(f"Augment: expected pad >= 0 and noise_sigma >= 0, got {self}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        rand_device = generator.device if generator is not None else x.device
        if self.pad > 0 or self.flip:
            if x.dim() != 4:
                raise ValueError(f"Augment: expected images [B, C, H, W], got {list(x.shape)}")
            x = self._crop_and_flip(x, generator, rand_device)
        if self.noise_sigma > 0:
            noise = torch.randn(x.shape, generator=generator, device=rand_device, dtype=x.dtype)
            x = x + self.noise_sigma * noise.to(x.device)
        return x

    def _crop_and_flip(self, x: Tensor, generator: torch.Generator | None, rand_device) -> Tensor:
        b, _, h, w = x.shape
        p = self.pad
        if p > 0:
            x = F.pad(x, (p, p, p, p), mode="reflect")
        top = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=rand_device)
        left = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=rand_device)
        cols = torch.arange(w, device=rand_device).expand(b, w)
        if self.flip:
            flipped = torch.rand(b, generator=generator, device=rand_device) < 0.5
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        rows = (top[:, None] + torch.arange(h, device=rand_device)).to(x.device)
        cols = (left[:, None] + cols).to(x.device)
        batch = torch.arange(b, device=x.device)
        # Advanced indices around a slice: the result is [B, H, W, C].
        out = x[batch[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()


def check_augment(augment: Augment | None, data: ImageData, root: str | None = None) -> None:
    """Check that ``augment`` can pad ``data``'s images (reflect padding needs more pixels on
    each side than it pads).

    Raises:
        DataError: the images are too small for the padding.
    """
    if augment is None or augment.pad == 0 or len(data.shape) != 3:
        return
    _, h, w = data.shape
    if min(h, w) <= augment.pad:
        where = f"{data.name} {root}" if root else data.name
        need = augment.pad + 1
        raise DataError(
            f"{where}: images are {w}x{h} pixels, but augmentation pads {augment.pad} pixels on "
            f"each side and needs at least {need}x{need}; use larger images or --no-augment"
        )
