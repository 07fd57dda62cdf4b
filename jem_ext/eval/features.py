"""Batched feature extraction (IS/FID) and the penultimate features of any classifier (the
fallback network when no Inception weights are given)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["classifier_features", "extract"]


def _last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` in ``model.modules()`` order (the classification head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to take features from")
    return linears[-1]


@torch.no_grad()
def classifier_features(
    model: nn.Module, x: torch.Tensor, head: nn.Linear | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and class probabilities of a classifier, for FID/IS fallbacks.

    ``model(x)`` must return logits. The features are the input of the classification head,
    captured with a forward hook; ``head`` defaults to the last ``nn.Linear`` registered in
    ``model`` (pass it explicitly when that is not the layer producing the logits).

    Returns:
        ``(features [N, D], probs [N, K])`` with ``probs = softmax(model(x))``.
    """
    head = _last_linear(model) if head is None else head
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"the head layer ran {len(captured)} times in one forward pass")
    return torch.flatten(captured[0], 1), torch.softmax(logits, dim=1)


@torch.no_grad()
def extract(
    net_fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
    x: torch.Tensor | np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
    desc: str = "features",
    progress: bool = True,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Apply ``net_fn`` to ``x`` in batches (no gradients) and gather the outputs on the CPU.

    Each batch is moved to ``device`` before the call. ``net_fn`` returns a tensor or a tuple
    of tensors with the batch as first dimension; the result mirrors it as numpy arrays
    concatenated over the batches (e.g. ``extract(inception, x, 50)`` gives
    ``(features [N, 2048], logits [N, 1008])``). A tqdm bar labelled ``desc`` counts samples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x = torch.as_tensor(x)
    chunks: list[tuple[torch.Tensor, ...]] = []
    single = False
    with tqdm(total=len(x), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(x), batch_size):
            out = net_fn(x[start : start + batch_size].to(device))
            single = isinstance(out, torch.Tensor)
            chunks.append(tuple(t.detach().cpu() for t in ((out,) if single else out)))
            bar.update(min(batch_size, len(x) - start))
    if not chunks:
        raise ValueError("extract needs at least one sample")
    result = tuple(torch.cat(parts).numpy() for parts in zip(*chunks))
    return result[0] if single else result
