"""Two facts about any ``nn.Module`` the package runs: where it lives, and running it in eval
mode for a while."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode inside the block; its train/eval mode is restored after it,
    exceptions included."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
