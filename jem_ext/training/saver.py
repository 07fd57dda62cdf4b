"""Checkpointing of a run: ``checkpoints/last.pt`` and ``best.pt``, the last good state, resume.

:class:`CheckpointSaver` owns the run's checkpoint files (written atomically by
:func:`jem_ext.checkpoint.save_checkpoint`) and the in-memory copy of the last saved model and
optimiser states that the divergence guard restores.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, capture_rng, new_state, restore_rng, save_checkpoint
from ..models import model_spec
from . import distributed
from .runlog import json_default
from .setup import Run, apply_optimizer_settings, augment_seed, sampler_seed
from .state import RunState

LAST, BEST = "last.pt", "best.pt"


def checkpoint_state(run: Run) -> dict[str, Any]:
    """The checkpoint dict of a run as it is now (see :mod:`jem_ext.checkpoint` for the keys).

    In a distributed job every process calls it; rank 0's dict holds every process's buffer
    shard and RNG states (see :func:`.distributed.gather_checkpoint`).
    """
    model, ctx = run.ctx.model_for_chain, run.ctx
    return distributed.gather_checkpoint(
        new_state(
            model_spec=model_spec(model),
            model=model.state_dict(),
            optimizer=ctx.optimizer.state_dict(),
            sampler=ctx.sampler.state_dict() if ctx.sampler is not None else None,
            rng=capture_rng(run.generators),
            iteration=run.state.iteration,
            epoch=run.state.epoch,
            config=json.loads(json.dumps(run.cfg, default=json_default)),
            best_val_accuracy=run.state.best_val_accuracy,
            progress=run.state.to_dict(),
        ),
        run.dist,
    )


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

    def save_last(self, run: Run) -> None:
        """Write ``last.pt`` (the resume point) and remember its state as the last good one."""
        self._save(run, self.last_path)

    def save_best(self, run: Run) -> None:
        """Write ``best.pt`` (the best validation accuracy so far)."""
        self._save(run, self.best_path)

    def _save(self, run: Run, path: Path) -> None:
        state = checkpoint_state(run)
        if self.write:
            save_checkpoint(path, state)
        self._remember(state["model"], state["optimizer"])

    def _remember(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        self._good = (copy.deepcopy(model_state), copy.deepcopy(optimizer_state))

    @staticmethod
    def _reseed(run: Run, saved_world_size: int) -> None:
        """Fresh generators after a resume with another number of processes."""
        seed, rank, st = run.cfg["seed"], run.dist.rank, run.state
        bases = {"sampler": sampler_seed(seed, st.reseeds), "augment": augment_seed(seed)}
        for name, base in bases.items():
            run.generators[name].manual_seed(
                distributed.generator_seed(base, rank, st.iteration + 1)
            )
        chains = run.cfg["buffer_size"] if getattr(run.ctx.sampler, "buffer", None) else None
        if run.dist.is_main:
            print(distributed.reshard_note(saved_world_size, run.dist, chains), file=sys.stderr)

    def restore_last_good(self, run: Run) -> None:
        """Put the last saved model and optimiser states back into the run."""
        if self._good is None:
            raise RuntimeError("CheckpointSaver: no state saved yet")
        run.ctx.model_for_chain.load_state_dict(self._good[0])
        run.ctx.optimizer.load_state_dict(self._good[1])

    def resume(self, run: Run, ckpt: dict[str, Any]) -> None:
        """Load a training checkpoint into the run (weights, optimiser, sampler, RNG, progress).

        Raises:
            CheckpointError: the checkpoint does not fit the run's config.
        """
        ctx = run.ctx
        try:
            share = distributed.local_share(ckpt, run.dist)
            ctx.model_for_chain.load_state_dict(ckpt["model"])
            ctx.optimizer.load_state_dict(ckpt["optimizer"])
            apply_optimizer_settings(run.cfg, ctx.optimizer)
            if ctx.sampler is not None and share.sampler is not None:
                ctx.sampler.load_state_dict(share.sampler)
            restore_rng(share.rng or ckpt["rng"], run.generators)
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"--resume: the checkpoint does not fit this run's config ({first})"
            ) from None
        run.state = RunState.from_checkpoint(ckpt)
        if share.rng is None:
            self._reseed(run, share.saved_world_size)
        self._remember(ctx.model_for_chain.state_dict(), ctx.optimizer.state_dict())
