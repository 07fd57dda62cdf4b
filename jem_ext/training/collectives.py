"""What the processes of a data-parallel run (see :mod:`.distributed`) compute together at
each iteration; each function is the single-process value when there is one process.

- The loss's forward passes go through the DistributedDataParallel wrapper. Communication per
  iteration: one all-reduce of the gradients and one of the divergence guard's flag.
- The divergence guard decides together: if any process sees divergence, all restore the same
  last good state (:func:`agree_on_divergence`).
- Metrics rows average the loss terms over the processes (:func:`mean_terms`). Validation and
  test accuracy are reduced: each process predicts its share of the evaluation batches and
  the correct counts are summed, so the figure is the one a single process computes for the
  same weights (:func:`accuracy`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import data as jdata
from .. import metrics
from ..models import predict_logits
from .distributed import SINGLE, Dist

EVAL_BATCH = 500  # rows per prediction batch; shards are whole batches, so logits match


def _tensor(values: list[float] | list[int], dtype: torch.dtype, d: Dist) -> Tensor:
    device = torch.device("cuda", d.local_rank) if d.backend == "nccl" else None
    return torch.tensor(values, dtype=dtype, device=device)


def agree_on_divergence(reason: str | None, d: Dist) -> str | None:
    """Every process's verdict on the iteration: the first diverged process's reason, or None.

    One all-reduce of a flag; the reason's text travels only when some process diverged.
    """
    if not d.parallel:
        return reason
    flag = _tensor([0 if reason is None else 1], torch.int64, d)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return None
    reasons: list[Any] = [None] * d.world_size
    dist.all_gather_object(reasons, reason)
    rank = next(r for r, text in enumerate(reasons) if text is not None)
    return f"process {rank}: {reasons[rank]}"


def mean_terms(terms: dict[str, float], d: Dist) -> dict[str, float]:
    """The loss terms averaged over the processes (each process's own terms when single)."""
    if not d.parallel:
        return terms
    keys = sorted(terms)
    values = _tensor([terms[k] for k in keys], torch.float64, d)
    dist.all_reduce(values)
    return dict(zip(keys, (values / d.world_size).tolist()))


def accuracy(model: nn.Module, data: jdata.ImageData, d: Dist = SINGLE) -> float:
    """Classification accuracy of ``model`` on ``data``, shared out over the processes.

    Process ``r`` predicts evaluation batches ``r, r + N, ...`` (whole batches, so every logit
    is the one a single process computes) and the correct counts are summed.
    """
    if not d.parallel:
        return metrics.accuracy(predict_logits(model, data.x, EVAL_BATCH), data.y)
    correct = 0
    for start in range(d.rank * EVAL_BATCH, len(data), d.world_size * EVAL_BATCH):
        logits = predict_logits(model, data.x[start : start + EVAL_BATCH], EVAL_BATCH)
        labels = data.y[start : start + EVAL_BATCH].cpu()
        correct += int((logits.argmax(1) == labels).sum())
    counts = _tensor([correct], torch.int64, d)
    dist.all_reduce(counts)
    return int(counts.item()) / len(data) if len(data) else float("nan")
