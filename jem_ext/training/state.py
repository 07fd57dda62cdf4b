"""The run state: where a training run is, saved in every checkpoint and restored on resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class RunState:
    """Progress of a run, beyond the model, optimiser, sampler and RNG states.

    Attributes:
        iteration: iterations trained so far (over all epochs).
        epoch: epochs completed.
        pos: batches of the current epoch already trained on (a resume skips them).
        lr_scale: product of the divergence guard's learning-rate factors.
        recoveries: recoveries from divergence so far.
        best_val_accuracy: best validation accuracy so far (-1 before the first evaluation).
        seconds: training time so far, over every resume.
        reseeds: how many times the sampler was rebuilt with a fresh seed after a recovery.
        split_streak: iterations in a row with the energies at the split bound (guard.SplitWatch).
        split_at: iteration at which a split of the energies was reported (-1: none).
    """

    iteration: int = 0
    epoch: int = 0
    pos: int = 0
    lr_scale: float = 1.0
    recoveries: int = 0
    best_val_accuracy: float = -1.0
    seconds: float = 0.0
    reseeds: int = 0
    split_streak: int = 0
    split_at: int = -1

    def to_dict(self) -> dict[str, Any]:
        """The state as a plain dict (the checkpoint's ``progress`` entry)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> RunState:
        """The state saved in a training checkpoint (older checkpoints may lack ``progress``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        saved = ckpt.get("progress") or {}
        state = cls(**{k: v for k, v in saved.items() if k in names})
        state.iteration = int(ckpt["iteration"])
        state.epoch = int(ckpt["epoch"])
        state.best_val_accuracy = float(ckpt.get("best_val_accuracy", -1.0))
        return state
