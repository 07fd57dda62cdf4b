"""Checkpointing of a run: ``checkpoints/last.pt`` and ``best.pt``, and the last good state.

:class:`CheckpointSaver` owns the run's checkpoint files (written atomically by
:func:`jem_ext.checkpoint.save_checkpoint`) and the in-memory copy of the last saved model and
optimiser states that a recovery from divergence restores. It takes the checkpoint dicts it
writes (:func:`jem_ext.training.resume.checkpoint_state` makes them from a run) and knows
nothing of the run itself.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from ..checkpoint import save_checkpoint

CHECKPOINTS = "checkpoints"  # the run folder's checkpoint folder
LAST, BEST = "last.pt", "best.pt"


def last_checkpoint(run_dir: str | Path) -> Path:
    """The resume point of the run in ``run_dir``."""
    return Path(run_dir) / CHECKPOINTS / LAST


class CheckpointSaver:
    """Writes a run's checkpoints and keeps the last good state for recovery.

    Args:
        folder: the run's ``checkpoints/`` folder (created on the first save).
        write: whether this process writes the files (rank 0 of a distributed job); the others
            still take part in gathering the state and keep the last good state in memory.
    """

    def __init__(self, folder: Path, write: bool = True) -> None:
        self.folder = Path(folder)
        self.write = write
        self._good: tuple[dict[str, Any], dict[str, Any]] | None = None

    @property
    def last_path(self) -> Path:
        return self.folder / LAST

    @property
    def best_path(self) -> Path:
        return self.folder / BEST

    def save_last(self, state: dict[str, Any]) -> None:
        """Write the checkpoint dict ``state`` as ``last.pt`` (the resume point) and remember
        its model and optimiser states as the last good ones."""
        self._save(state, self.last_path)

    def save_best(self, state: dict[str, Any]) -> None:
        """Write the checkpoint dict ``state`` as ``best.pt`` (the best validation accuracy so
        far)."""
        self._save(state, self.best_path)

    def _save(self, state: dict[str, Any], path: Path) -> None:
        if self.write:
            save_checkpoint(path, state)
        self.remember(state["model"], state["optimizer"])

    def remember(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        """Keep (copies of) these states as the last good ones (a resume's starting point)."""
        self._good = (copy.deepcopy(model_state), copy.deepcopy(optimizer_state))

    def restore_last_good(self, model: nn.Module, optimizer: Optimizer) -> None:
        """Put the last saved model and optimiser states back into ``model`` and ``optimizer``."""
        if self._good is None:
            raise RuntimeError("CheckpointSaver: no state saved yet")
        model.load_state_dict(self._good[0])
        optimizer.load_state_dict(self._good[1])
