"""The training loop: epochs of :func:`~jem_ext.training.step.train_step`, and what surrounds it.

Reading order: :func:`fit` (the remaining epochs) -> :func:`train_one_epoch` (per iteration:
budget, learning rate, batch, step, guard, bookkeeping; returns the epoch's metrics) ->
:func:`end_of_epoch` (:func:`validate`, best/last checkpoints).

:func:`train_one_epoch` and :func:`validate` take what they read and advance as arguments (the
model, optimiser and sampler in a :class:`~.step.StepContext`, the data, the config, the
progress) and return their metrics, as timm's do. What acts on a run -- the divergence guard
and split watch, which judge, and the checkpoint saver, metrics log, progress line, sample
grids and folder check, which write -- travels beside it in :class:`Hooks`. The guard returns
a :class:`~.guard.Verdict` and :func:`recover` carries it out.

A run ends "completed" (every epoch trained), "budget" (``max_minutes`` or ``max_iters``
reached: last.pt holds the position inside the epoch, so ``--resume`` with a larger budget
continues) or "diverged".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .. import data as jdata
from ..objectives import Objective
from . import collectives, distributed
from .distributed import Dist
from .folder import IntactFolder
from .guard import (
    DivergenceGuard,
    SplitWatch,
    TrainingDiverged,
    Verdict,
    recovery_note,
    split_message,
    stop_message,
)
from .resume import checkpoint_of, checkpoint_state
from .runconfig import RunConfig
from .runlog import MetricsLog, Progress, SampleGrids, finite_or_none
from .saver import CheckpointSaver
from .schedule import budget_reason, epoch_order_generator, learning_rate, loss_weights
from .setup import Run, RunData, make_sampler, sampler_seed
from .state import RunState
from .step import Batch, StepContext, train_step
from .tensorboard import NullTensorBoard, energy_histograms

__all__ = [
    "BudgetReached",
    "Hooks",
    "accuracy",
    "budget_reason",
    "end_of_epoch",
    "epoch_order_generator",
    "fit",
    "learning_rate",
    "loss_weights",
    "recover",
    "train_one_epoch",
    "validate",
]


def accuracy(
    model: torch.nn.Module, data: jdata.ImageData, dist: Dist = distributed.SINGLE
) -> float:
    """Classification accuracy of ``model`` on ``data`` (shared out over a job's processes)."""
    return collectives.accuracy(model, data, dist)


def _batch(
    data: RunData, generator: torch.Generator, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
) -> Batch:
    """The step's batch: augmented inputs (``generator`` draws the augmentation), labels, the
    usable-label mask, and the batch before augmentation when the p(x) term does not use the
    augmented one."""
    x_px = None
    if data.augment is not None:
        if not data.px_augment:
            x_px = x
        x = data.augment(x, generator=generator)
    labeled = None if data.labeled is None else data.labeled[idx]
    return Batch(x, y, labeled, x_px)


def title(cfg: RunConfig) -> str:
    """``dataset/objective``: how the progress line names a run."""
    return f"{cfg.data.dataset}/{cfg.objective.name}"


class BudgetReached(Exception):
    """The run has used its ``max_minutes`` or ``max_iters``; the message says which."""


@dataclass(frozen=True)
class Hooks:
    """What acts on a run while it trains, beside the run itself.

    Attributes:
        guard: judges each iteration's loss terms (divergence).
        split_watch: watches the energies of data and samples part.
        saver: writes the checkpoints and keeps the last good state.
        log: the metrics log (``metrics.jsonl``; its rows also go to TensorBoard).
        progress: the progress line.
        grids: the sample grids (they keep the latest samples).
        clock: the run's training seconds so far, over every resume.
        folder: the check, before each write, that the run folder is still there.
        tensorboard: TensorBoard's writer (``--tensorboard``), or its null twin.
    """

    guard: DivergenceGuard
    split_watch: SplitWatch
    saver: CheckpointSaver
    log: MetricsLog
    progress: Progress
    grids: SampleGrids
    clock: Callable[[], float]
    folder: IntactFolder = field(default_factory=IntactFolder)
    tensorboard: NullTensorBoard = field(default_factory=NullTensorBoard)


def train_one_epoch(
    ctx: StepContext,
    data: RunData,
    objective: Objective,
    cfg: RunConfig,
    state: RunState,
    generators: dict[str, torch.Generator],
    hooks: Hooks,
    dist: Dist = distributed.SINGLE,
) -> dict[str, float]:
    """Train the epoch ``state.epoch`` of a run of ``cfg`` from ``state.pos``, advancing
    ``state``.

    Explicit arguments, not the whole :class:`~.setup.Run`, because they are exactly what an
    epoch reads and changes -- the model, optimiser and sampler (``ctx``), the data, the
    objective before its schedule, the config, the progress, the generators (the
    augmentation's; the sampler's, reseeded by a recovery; all saved in checkpoints) and the
    job -- while the run folder, the clock and the writers are reached only through ``hooks``.

    Returns:
        The epoch's metrics: ``iterations`` trained by this call, ``recoveries`` made, and the
        mean of each loss term over the iterations that did not diverge (this process's
        values).

    Raises:
        BudgetReached: before an iteration the budget no longer allows.
        TrainingDiverged: a divergence past ``max_recoveries``.
    """
    epoch = state.epoch
    objective = loss_weights(cfg.objective, objective, epoch)
    batches = jdata.batches(
        data.train_on_device,
        cfg.optim.batch_size,
        shuffle=True,
        generator=epoch_order_generator(cfg.optim.seed, epoch),
        rank=dist.rank,
        world_size=dist.world_size,
    )
    steps = data.steps_per_epoch(cfg.optim.batch_size, dist.world_size)
    totals, every = EpochTotals(), cfg.folder.log_every  # metrics rows (and histograms) due
    for pos, (x, y, idx) in enumerate(batches):
        if pos < state.pos:
            continue  # resuming inside the epoch: skip batches already trained on
        check_budget(cfg, state, hooks.clock(), dist)
        it = state.iteration
        lr = set_learning_rate(ctx.optimizer, cfg, state, epoch)
        # the step; its terms are host floats (the iteration's one sync point)
        batch = _batch(data, generators["augment"], x, y, idx)
        terms, x_q = train_step(ctx, batch, objective)
        if x_q is not None:
            hooks.grids.latest = x_q
        reason = collectives.agree_on_divergence(hooks.guard.check(terms), dist)
        if reason is not None:
            recover(hooks.guard.verdict(state, reason), ctx, data, cfg, state, hooks, dist)
        state.iteration, state.pos, state.seconds = it + 1, pos + 1, hooks.clock()
        good = terms if reason is None else None  # None: the iteration diverged
        if good is not None:
            watch_split(hooks, state, good, objective.w_px)
        totals.add(good)
        # bookkeeping: metrics row, progress, sample grid, resume point
        due = writes_due(cfg, state, steps, logged=good is not None)
        if any(due):
            hooks.folder.check()  # once for the iteration's writes: a collective in a job
        if due.log:
            w_px = objective.w_px if cfg.generative else None
            hooks.log.write(metrics_row(state, epoch, good, lr, w_px, dist))
        hooks.progress.step(good)
        if due.samples:
            hooks.grids.write(f"{state.iteration:07d}", ctx.model_for_chain, state.iteration)
        if due.checkpoint:
            hooks.saver.save_last(checkpoint_of(ctx, generators, state, cfg, dist))
        if good is not None and hooks.tensorboard.enabled and state.iteration % every == 0:
            energy_histograms(hooks.tensorboard, ctx.model_for_chain, batch.x, x_q, it + 1)
    return totals.metrics()


class EpochTotals:
    """Sums of an epoch's loss terms, for :func:`train_one_epoch`'s metrics."""

    def __init__(self) -> None:
        self.iterations, self.recoveries, self.good = 0, 0, 0
        self.sums: dict[str, float] = {}

    def add(self, terms: dict[str, float] | None) -> None:
        """Count one iteration; ``terms`` None: it diverged (and was recovered from)."""
        self.iterations += 1
        if terms is None:
            self.recoveries += 1
            return
        self.good += 1
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def metrics(self) -> dict[str, float]:
        means = {k: v / self.good for k, v in self.sums.items()}
        return {"iterations": self.iterations, "recoveries": self.recoveries, **means}


def check_budget(cfg: RunConfig, state: RunState, seconds: float, dist: Dist) -> None:
    """Raise :class:`BudgetReached` when the budget allows no further iteration (every process
    together when the budget is a time)."""
    budget = cfg.budget
    reason = budget_reason(budget, state.iteration, seconds)
    if budget.max_minutes is not None:  # clocks differ between processes: stop together
        reason = collectives.agree_on_divergence(reason, dist)
    if reason is not None:
        raise BudgetReached(reason)


def set_learning_rate(
    optimizer: torch.optim.Optimizer, cfg: RunConfig, state: RunState, epoch: int
) -> float:
    """Set (and return) the learning rate of the run's next iteration."""
    lr = learning_rate(cfg.optim, state.iteration, epoch, state.lr_scale)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def recover(
    verdict: Verdict,
    ctx: StepContext,
    data: RunData,
    cfg: RunConfig,
    state: RunState,
    hooks: Hooks,
    dist: Dist = distributed.SINGLE,
) -> None:
    """Carry out the guard's verdict on a diverged iteration: restore the last good model and
    optimiser states, lower the learning rate, rebuild the sampler from a fresh seed of its
    generator (``ctx.generator``), and log the event; or log the stop and raise.

    Raises:
        TrainingDiverged: the verdict is to stop.
    """
    it = state.iteration
    row = {
        "event": "recovery",
        "iteration": it,
        "epoch": state.epoch,
        "reason": verdict.reason,
        "recoveries": state.recoveries,  # recoveries made: the stop below is not one
        "seconds": hooks.clock(),
    }
    if verdict.stop:
        row["event"] = "stopped"
        hooks.log.write(row)
        raise TrainingDiverged(
            stop_message(it, verdict.reason, state.recoveries, hooks.saver.last_path)
        )
    state.recoveries = verdict.recoveries
    row["recoveries"] = state.recoveries
    hooks.saver.restore_last_good(ctx.model_for_chain, ctx.optimizer)
    state.lr_scale = verdict.lr_scale
    state.reseeds += 1
    ctx.generator.manual_seed(sampler_seed(cfg.optim.seed, state.reseeds, dist.rank))
    ctx.sampler = make_sampler(cfg, data.train, data.device, generator=ctx.generator, dist=dist)
    row["lr_scale"] = state.lr_scale
    hooks.log.write(row)
    hooks.progress.note(recovery_note(verdict, hooks.guard.max_recoveries, it))


def watch_split(hooks: Hooks, state: RunState, terms: dict[str, float], w_px: float) -> None:
    """Log and note a split of the energies the first time the split watch sees one."""
    row = hooks.split_watch.check(state, terms, w_px)
    if row is not None:
        hooks.log.write(row)
        hooks.progress.note(
            split_message(row["iteration"], row["energy_data"], row["energy_sample"])
        )


class Due(NamedTuple):
    """The writes due after an iteration."""

    log: bool
    samples: bool
    checkpoint: bool


def writes_due(cfg: RunConfig, state: RunState, steps: int, logged: bool) -> Due:
    """The writes due after the iteration that brought the run to ``state`` (``steps``
    iterations per epoch): a metrics row (``logged``: the iteration did not diverge), a sample
    grid, a mid-epoch last.pt (an epoch's end saves its own)."""
    every, done = cfg.folder, state.iteration
    return Due(
        log=logged and done % every.log_every == 0,
        samples=bool(every.sample_every) and done % every.sample_every == 0,
        checkpoint=bool(every.ckpt_every) and done % every.ckpt_every == 0 and state.pos < steps,
    )


def metrics_row(
    state: RunState,
    epoch: int,
    terms: dict[str, float],
    lr: float,
    w_px: float | None,
    dist: Dist,
) -> dict[str, float | None]:
    """The metrics row of the iteration that brought the run to ``state``: the loss terms
    averaged over the job's processes, the learning rate, the p(x) weight (None: not logged)
    and the training seconds."""
    row: dict[str, float | None] = {"iteration": state.iteration, "epoch": epoch}
    mean = collectives.mean_terms(terms, dist)
    row.update({k: finite_or_none(v) for k, v in mean.items()})
    row["lr"] = lr
    if w_px is not None:
        row["w_px"] = w_px
    return {**row, "seconds": state.seconds}


def validate(model: torch.nn.Module, data: jdata.ImageData, dist: Dist) -> dict[str, float]:
    """The validation metrics of ``model`` on ``data``: ``accuracy`` (shared out over a job's
    processes)."""
    return {"accuracy": accuracy(model, data, dist)}


def end_of_epoch(run: Run, hooks: Hooks) -> dict[str, float]:
    """Close the epoch: validate when due (best.pt on a new best), then save last.pt.

    Returns:
        The validation metrics (:func:`validate`), empty when validation was not due.
    """
    cfg, st = run.cfg, run.state
    st.epoch, st.pos = st.epoch + 1, 0
    hooks.folder.check()
    metrics: dict[str, float] = {}
    if st.epoch % cfg.folder.eval_every == 0 or st.epoch == cfg.optim.epochs:
        metrics = validate(run.ctx.model_for_chain, run.data.val, run.dist)
        val_acc = metrics["accuracy"]
        hooks.log.write(
            {
                "iteration": st.iteration,
                "epoch": st.epoch,
                "val_accuracy": val_acc,
                "seconds": run.elapsed(),
            }
        )
        if val_acc > st.best_val_accuracy:
            st.best_val_accuracy = val_acc
            hooks.saver.save_best(checkpoint_state(run))
        hooks.progress.describe(f"{title(cfg)} val {val_acc:.3f}")
    hooks.saver.save_last(checkpoint_state(run))
    return metrics


def fit(run: Run, hooks: Hooks) -> tuple[str, str | None]:
    """Train the remaining epochs; returns ``(status, reason)``: ("completed", None),
    ("budget", what was reached) after saving last.pt, or ("diverged", the error)."""
    try:
        while run.state.epoch < run.cfg.optim.epochs:
            train_one_epoch(
                run.ctx,
                run.data,
                run.objective,
                run.cfg,
                run.state,
                run.generators,
                hooks,
                run.dist,
            )
            end_of_epoch(run, hooks)
    except TrainingDiverged as err:
        return "diverged", str(err)
    except BudgetReached as reached:
        run.state.seconds = run.elapsed()
        hooks.folder.check()
        hooks.saver.save_last(checkpoint_state(run))
        return "budget", str(reached)
    return "completed", None
