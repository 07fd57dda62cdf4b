"""The metric that training and evaluation share: classification accuracy.

Training validates with it (:func:`jem_ext.training.collectives.accuracy` shares it out over a
job's processes) and the evaluation reports it (:mod:`jem_ext.eval.metrics` re-exports it), so
both read the same figure from the same logits.
"""

from __future__ import annotations

import numpy as np
import torch


def as_numpy(a, dtype=np.float64) -> np.ndarray:
    """Convert a tensor or array-like to a numpy array of ``dtype`` (``None`` keeps it)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


def accuracy(logits, labels) -> float:
    """Fraction of rows whose arg-max logit (or probability) equals the label."""
    logits, labels = as_numpy(logits), as_numpy(labels, dtype=np.int64)
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(1) == labels).mean())
