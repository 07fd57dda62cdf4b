"""The out-of-distribution threshold: given with ``--threshold``, or the ``--ood-quantile``
quantile of ``log p(x)`` over the validation split of the run's own data set."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import data_fingerprint, fingerprint_changes, load_dataset
from ..image_data import DataError
from ..trained import Trained
from .inputs import PROG, ScoreError

__all__ = ["choose_threshold", "ood_threshold"]


def _validation(trained: Trained, need: bool):
    """The validation split of the run's data set, or None (when not ``need``ed)."""
    cfg = trained.config
    dataset, root = cfg.get("dataset"), cfg.get("data_root")
    try:
        if not dataset:
            raise DataError(f"{trained.path}: its config names no data set")
        data = load_dataset(dataset, root, "val", seed=int(cfg.get("seed") or 0))
        if tuple(data.shape) != trained.in_shape:
            raise DataError(
                f"its samples have shape {tuple(data.shape)}, the model takes {trained.in_shape}"
            )
        if data.num_classes != trained.num_classes:
            raise DataError(
                f"it has {data.num_classes} classes, the model {trained.num_classes} outputs"
            )
        if len(data) == 0:
            raise DataError("the split is empty")
    except DataError as err:
        if not need:
            return None
        where = f" (data root {root})" if root else ""
        raise ScoreError(
            f"cannot load the validation split of data set {dataset!r}{where} to set the OOD "
            f"threshold: {err}; pass --threshold VALUE to score without it"
        ) from None
    return data


def _data_warnings(trained: Trained, val) -> list[str]:
    """One line when the validation split loaded here differs from the one the run recorded."""
    changes = fingerprint_changes(
        trained.config.get("data_fingerprint"), data_fingerprint({"val": val})
    )
    if not changes:
        return []
    return [
        f"the validation data differ from the run's ({'; '.join(changes)}); the threshold "
        "may not mean what it seems"
    ]


def ood_threshold(log_px_val: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the validation ``log p(x)``: a share ``1 - quantile`` of the
    validation inputs lie at or above it (linear interpolation between order statistics)."""
    return float(np.quantile(np.asarray(log_px_val, dtype=np.float64), quantile))


def _log_px(trained: Trained, x: torch.Tensor, batch_size: int, progress: bool) -> np.ndarray:
    out = []
    with tqdm(total=len(x), desc="validation", unit="img", disable=not progress) as bar:
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size]
            out.append(trained.log_px(xb, batch_size).double().cpu().numpy())
            bar.update(len(xb))
    return np.concatenate(out)


def choose_threshold(
    trained: Trained, given: float | None, quantile: float, batch_size: int, progress: bool
) -> tuple[float, dict[str, Any], list[str] | None]:
    """``(threshold, its record for OUT.threshold.json, the class names or None)``: the
    ``given`` threshold, else the ``quantile`` of the validation split's ``log p(x)``. A
    validation split that differs from the run's is reported on stderr and in the record."""
    val = _validation(trained, need=given is None)
    names = list(val.classes) if val is not None else None
    if given is not None:
        threshold = float(given)
        record: dict[str, Any] = {"threshold": threshold, "chosen": "given with --threshold"}
    else:
        val_log_px = _log_px(trained, val.x, batch_size, progress)
        threshold = ood_threshold(val_log_px, quantile)
        record = {
            "threshold": threshold,
            "chosen": (
                f"the {quantile} quantile of log p(x) on the validation split of "
                f"{trained.config.get('dataset')!r}: {1 - quantile:.1%} of its images pass"
            ),
            "quantile": quantile,
            "n_validation": len(val),
            "validation_pass_rate": float(np.mean(val_log_px >= threshold)),
        }
    warnings = [] if val is None else _data_warnings(trained, val)
    for line in warnings:
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    record.update(
        data_warnings=warnings,
        dataset=trained.config.get("dataset"),
        data_root=trained.config.get("data_root"),
        checkpoint=str(trained.path),
        rule="ood = log p(x) < threshold; log p(x) = logsumexp_y f(x)[y]",
    )
    return threshold, record, names
