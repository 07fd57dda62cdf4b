"""A run and its checkpoint dict, both ways: :func:`checkpoint_state` makes the dict the
:class:`~jem_ext.training.saver.CheckpointSaver` writes, :func:`resume_run` loads a checkpoint
back into a freshly built run (``--resume``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from ..checkpoint import CheckpointError, capture_rng, new_state, restore_rng
from ..models import model_spec
from . import shards
from .distributed import SINGLE, Dist
from .runconfig import RunConfig
from .runlog import json_default
from .setup import Run, apply_optimizer_settings, augment_seed, sampler_seed
from .state import RunState
from .step import StepContext


def checkpoint_state(run: Run) -> dict[str, Any]:
    """The checkpoint dict of a run as it is now (see :func:`checkpoint_of`)."""
    return checkpoint_of(run.ctx, run.generators, run.state, run.cfg, run.dist)


def checkpoint_of(
    ctx: StepContext,
    generators: dict[str, torch.Generator],
    state: RunState,
    cfg: RunConfig,
    dist: Dist = SINGLE,
) -> dict[str, Any]:
    """The checkpoint dict of the model, optimiser and sampler in ``ctx``, the generators and
    the progress ``state`` of a run of ``cfg`` (see :mod:`jem_ext.checkpoint` for the keys).

    In a distributed job every process calls it; rank 0's dict holds every process's buffer
    shard and RNG states (see :func:`.shards.gather_checkpoint`).
    """
    model = ctx.model_for_chain
    return shards.gather_checkpoint(
        new_state(
            model_spec=model_spec(model),
            model=model.state_dict(),
            optimizer=ctx.optimizer.state_dict(),
            sampler=ctx.sampler.state_dict() if ctx.sampler is not None else None,
            rng=capture_rng(generators),
            iteration=state.iteration,
            epoch=state.epoch,
            config=json.loads(json.dumps(cfg.flat(), default=json_default)),
            best_val_accuracy=state.best_val_accuracy,
            progress=state.to_dict(),
        ),
        dist,
    )


def resume_run(run: Run, ckpt: dict[str, Any]) -> None:
    """Load a training checkpoint into the run (weights, optimiser, sampler, RNG, progress).

    Raises:
        CheckpointError: the checkpoint does not fit the run's config.
    """
    ctx = run.ctx
    try:
        share = shards.local_share(ckpt, run.dist)
        ctx.model_for_chain.load_state_dict(ckpt["model"])
        ctx.optimizer.load_state_dict(ckpt["optimizer"])
        apply_optimizer_settings(run.cfg.optim, ctx.optimizer)
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
        reseed(run, share.saved_world_size)


def reseed(run: Run, saved_world_size: int) -> None:
    """Fresh generators after a resume with another number of processes."""
    seed, rank, st = run.cfg.optim.seed, run.dist.rank, run.state
    bases = {"sampler": sampler_seed(seed, st.reseeds), "augment": augment_seed(seed)}
    for name, base in bases.items():
        run.generators[name].manual_seed(shards.generator_seed(base, rank, st.iteration + 1))
    chains = run.cfg.chain.buffer_size if getattr(run.ctx.sampler, "buffer", None) else None
    if run.dist.is_main:
        print(shards.reshard_note(saved_world_size, run.dist, chains), file=sys.stderr)
