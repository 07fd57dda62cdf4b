"""A training run from start to end: :func:`train` builds the run, opens its folder, fits it
(:func:`~.loop.fit`, the epochs) and writes its summary (:func:`summarise`)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from .. import data as jdata
from .._io import atomic_write_text
from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..factory import is_factory
from . import shards
from .config import config_from_mapping
from .curves import write_curves
from .folder import IntactFolder, folder_identity
from .guard import DivergenceGuard, SplitWatch, TrainingDiverged
from .loop import Hooks, accuracy, fit, title
from .resume import checkpoint_state, resume_run
from .runconfig import RunConfig
from .runlog import MetricsLog, Progress, SampleGrids, json_default, truncate_metrics
from .saver import CHECKPOINTS, CheckpointSaver
from .setup import Run, build_run, fresh_out
from .tensorboard import NullTensorBoard, open_tensorboard


def _open_run_folder(run: Run, resuming: bool) -> None:
    """Write config.json, the config the run uses from now on (``--config`` repeats it); on a
    resume, first cut metrics.jsonl back to the checkpoint."""
    run.out.mkdir(parents=True, exist_ok=True)
    if resuming:
        truncate_metrics(run.out / "metrics.jsonl", run.state.iteration)
    record = {**run.cfg.flat(), **launch_record(run)}
    atomic_write_text(
        run.out / "config.json",
        json.dumps(record, indent=2, sort_keys=True, default=json_default) + "\n",
    )
    (run.out / "samples").mkdir(parents=True, exist_ok=True)
    run.folder_id = folder_identity(run.out)


def launch_record(run: Run) -> dict[str, int]:
    """How the run is launched, for config.json and summary.json (see :mod:`.distributed`)."""
    batch, world = run.cfg.optim.batch_size, run.dist.world_size
    return {
        "world_size": world,
        "global_batch_size": batch,
        "batch_size_per_process": batch // world,
    }


def train(
    cfg: RunConfig | Mapping[str, Any],
    resume_state: dict[str, Any] | None = None,
    datasets: dict[str, jdata.ImageData] | None = None,
    resume_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train according to ``cfg``, writing the run folder ``cfg.folder.out``.

    Args:
        cfg: the run config, or a flat config dict (validated here: missing keys take their
            recipe's values or their defaults). The run folder (``folder.out``, created here)
            defaults to a fresh ``runs/...``.
        resume_state: a checkpoint dict to continue from (``--resume``).
        datasets: already loaded splits (as returned by ``load_data``), else loaded here.
        resume_overrides: the config keys this resume changes (recorded in an event row).

    Returns:
        The summary dict (also written to ``summary.json``).

    Raises:
        DataError, ConfigError, CheckpointError: bad inputs (before the run folder is created).
        TrainingDiverged: more than ``max_recoveries`` divergences (summary.json still written).
    """
    if not isinstance(cfg, RunConfig):
        cfg = config_from_mapping(cfg)
    if cfg.folder.out is None:
        cfg = cfg.replace(out=fresh_out(cfg.data.dataset, cfg.objective.name))
    run = build_run(cfg, datasets)
    main = run.dist.is_main  # the process that writes the run folder
    saver = CheckpointSaver(run.out / CHECKPOINTS, write=main)
    if resume_state is not None:
        resume_run(run, resume_state)
        saver.remember(run.ctx.model_for_chain.state_dict(), run.ctx.optimizer.state_dict())
    if main:
        _open_run_folder(run, resuming=resume_state is not None)
    if resume_state is None:
        saver.save_last(checkpoint_state(run))
    run.started = time.perf_counter() - run.state.seconds
    total = run.steps_per_epoch * cfg.optim.epochs
    with (
        _tensorboard(run, resuming=resume_state is not None) as tb,
        MetricsLog(run.out / "metrics.jsonl", enabled=main, tensorboard=tb) as log,
        Progress(
            total,
            run.state.iteration,
            title(cfg),
            enabled=main and not cfg.folder.no_progress,
        ) as progress,
    ):
        hooks = _hooks(run, saver, log, progress, tb)
        if resume_state is not None:
            log.write(
                {
                    "event": "resume",
                    "iteration": run.state.iteration,
                    "epoch": run.state.epoch,
                    "overrides": resume_overrides or {},
                    "world_size": run.dist.world_size,
                    "checkpoint_world_size": shards.saved_world_size(resume_state),
                }
            )
        status, reason = fit(run, hooks)
        hooks.folder.check()
        if status != "diverged":
            hooks.grids.write("final", run.ctx.model_for_chain, run.state.iteration)
    summary = summarise(run, status, reason)
    if main:
        atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_curves(run.out, status)
    if status == "diverged":
        raise TrainingDiverged(reason)
    return summary


def _hooks(
    run: Run, saver: CheckpointSaver, log: MetricsLog, progress: Progress, tb: NullTensorBoard
) -> Hooks:
    """What acts on ``run`` while it trains (:class:`~.loop.Hooks`), around the writers the
    caller opened."""
    cfg = run.cfg
    return Hooks(
        DivergenceGuard.from_config(cfg.guard, cfg.generative),
        SplitWatch.from_config(cfg.objective.l2_energy, cfg.generative),
        saver,
        log,
        progress,
        SampleGrids(
            run.out / "samples",
            run.data.train,
            cfg.chain.spec(),
            cfg.optim.seed,
            tb,
            run.dist.is_main,
        ),
        run.elapsed,
        IntactFolder(run.out, run.folder_id, run.dist),
        tb,
    )


def _tensorboard(run: Run, resuming: bool) -> NullTensorBoard:
    """The run's TensorBoard writer (``--tensorboard``, the process that writes the run folder);
    a resumed run's drops what the interrupted run logged after the checkpoint."""
    purge = run.state.iteration + 1 if resuming else None
    return open_tensorboard(run.out, run.dist.is_main and run.cfg.folder.tensorboard, purge)


def summarise(run: Run, status: str, reason: str | None) -> dict[str, Any]:
    """The run's final figures (``summary.json``): ``error`` holds a divergence's message,
    ``stop_reason`` the budget a "budget" run reached."""
    model, st = run.ctx.model_for_chain, run.state
    saver = CheckpointSaver(run.out / CHECKPOINTS, write=False)  # the paths of its files
    seconds = run.elapsed()
    test_at_best_val = None  # the test accuracy of best.pt, the best-validation checkpoint
    if run.dist.is_main and saver.best_path.is_file():  # rank 0's machine holds the file
        name = run.cfg.model.name
        factory = name if is_factory(name) else None  # named by this run's own command line
        best = model_from_checkpoint(load_checkpoint(saver.best_path), run.device, factory)
        test_at_best_val = accuracy(best, run.data.test)
    return {
        "status": status,
        "error": reason if status == "diverged" else None,
        "stop_reason": reason if status == "budget" else None,
        "dataset": run.cfg.data.dataset,
        "objective": run.cfg.objective.name,
        "model": run.cfg.model.name,
        "test_accuracy": accuracy(model, run.data.test, run.dist),
        "val_accuracy": accuracy(model, run.data.val, run.dist),
        "best_val_accuracy": st.best_val_accuracy if st.best_val_accuracy >= 0 else None,
        "test_accuracy_at_best_val": test_at_best_val,
        "iterations": st.iteration,
        "epochs": st.epoch,
        "recoveries": st.recoveries,
        "energy_split_at": st.split_at if st.split_at >= 0 else None,
        "seconds": seconds,
        "seconds_per_iteration": seconds / max(1, st.iteration),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(run.device),
        "best_checkpoint": str(saver.best_path) if saver.best_path.is_file() else None,
        "last_checkpoint": str(saver.last_path),
        "run_dir": str(run.out),
        **launch_record(run),
    }
