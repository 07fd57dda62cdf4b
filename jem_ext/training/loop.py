"""The training loop: epochs of :func:`~jem_ext.training.step.train_step`, and what surrounds it.

Reading order: :func:`train` (set up, run the epochs, summarise) -> :func:`train_one_epoch`
(per iteration: budget, learning rate, batch, step, guard, bookkeeping; returns the epoch's
metrics) -> :func:`end_of_epoch` (:func:`validate`, best/last checkpoints).

The run (:class:`~.setup.Run`) is what is trained; what acts on it -- the divergence guard and
split watch, which judge, and the checkpoint saver, metrics log and progress line, which write --
travel beside it in :class:`Hooks`. The guard returns a :class:`~.guard.Verdict` and
:func:`recover` carries it out.

A run ends "completed" (every epoch trained), "budget" (``max_minutes`` or ``max_iters``
reached: last.pt holds the position inside the epoch, so ``--resume`` with a larger budget
continues) or "diverged".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .. import data as jdata
from ..sampler import sample_from_noise
from . import collectives, distributed
from .distributed import Dist
from .folder import check_intact
from .guard import (
    DivergenceGuard,
    SplitWatch,
    TrainingDiverged,
    Verdict,
    recovery_note,
    split_message,
    stop_message,
)
from .options import BudgetOptions, ObjectiveOptions, OptimOptions
from .resume import checkpoint_state
from .runconfig import RunConfig
from .runlog import (
    MetricsLog,
    Progress,
    finite_or_none,
    save_samples,
)
from .saver import CheckpointSaver
from .setup import Run, make_sampler, sampler_seed
from .step import Batch, Objective, train_step
from .tensorboard import NullTensorBoard, energy_histograms


def learning_rate(opt: OptimOptions, iteration: int, epoch: int, scale: float = 1.0) -> float:
    """Learning rate at ``iteration`` (0-based) in ``epoch``: warm-up, step decay, recovery
    scale (a pure function of its arguments)."""
    lr = opt.lr * scale
    if opt.warmup_iters > 0:
        lr *= min(1.0, (iteration + 1) / opt.warmup_iters)
    lr *= step_decay(opt.decay_rate, opt.decay_epochs, epoch)
    return lr


def step_decay(rate: float, epochs: Sequence[int], epoch: int) -> float:
    """``rate`` to the number of ``epochs`` reached by ``epoch``: a step schedule's factor."""
    return rate ** sum(1 for e in epochs if epoch >= e)


def loss_weights(schedule: ObjectiveOptions, objective: Objective, epoch: int) -> Objective:
    """The objective of ``epoch``: ``objective`` with the p(x) weight's step decay
    (``schedule``'s) applied."""
    factor = step_decay(schedule.w_px_decay_rate, schedule.w_px_decay_epochs, epoch)
    return objective if factor == 1.0 else replace(objective, w_px=objective.w_px * factor)


def epoch_order_generator(seed: int, epoch: int) -> torch.Generator:
    """The data-order generator of one epoch: a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (2**63))


def accuracy(
    model: torch.nn.Module, data: jdata.ImageData, dist: Dist = distributed.SINGLE
) -> float:
    """Classification accuracy of ``model`` on ``data`` (shared out over a job's processes)."""
    return collectives.accuracy(model, data, dist)


def _batch(run: Run, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Batch:
    """The step's batch: augmented inputs, labels, the usable-label mask, and the batch before
    augmentation when the p(x) term does not use the augmented one."""
    x_px = None
    if run.data.augment is not None:
        if not run.data.px_augment:
            x_px = x
        x = run.data.augment(x, generator=run.generators["augment"])
    labeled = None if run.data.labeled is None else run.data.labeled[idx]
    return Batch(x, y, labeled, x_px)


def title(cfg: RunConfig) -> str:
    """``dataset/objective``: how the progress line names a run."""
    return f"{cfg.data.dataset}/{cfg.objective.name}"


class BudgetReached(Exception):
    """The run has used its ``max_minutes`` or ``max_iters``; the message says which."""


def budget_reason(budget: BudgetOptions, iteration: int, seconds: float) -> str | None:
    """Why a run at ``iteration`` after ``seconds`` of training must stop, or None."""
    if budget.max_iters is not None and iteration >= budget.max_iters:
        return f"reached --max-iters {budget.max_iters} ({iteration} iterations)"
    if budget.max_minutes is not None and seconds >= 60.0 * budget.max_minutes:
        return f"reached --max-minutes {budget.max_minutes:g} ({seconds / 60.0:.2f} minutes)"
    return None


@dataclass(frozen=True)
class Hooks:
    """What acts on a run while it trains, beside the run itself.

    Attributes:
        guard: judges each iteration's loss terms (divergence).
        split_watch: watches the energies of data and samples part.
        saver: writes the checkpoints and keeps the last good state.
        log: the metrics log (``metrics.jsonl``; its rows also go to TensorBoard).
        progress: the progress line.
        tensorboard: TensorBoard's writer (``--tensorboard``), or its null twin.
    """

    guard: DivergenceGuard
    split_watch: SplitWatch
    saver: CheckpointSaver
    log: MetricsLog
    progress: Progress
    tensorboard: NullTensorBoard = field(default_factory=NullTensorBoard)


def train_one_epoch(run: Run, hooks: Hooks) -> dict[str, float]:
    """Train the run's current epoch from its position ``run.state.pos``.

    Returns:
        The epoch's metrics: ``iterations`` trained by this call, ``recoveries`` made, and the
        mean of each loss term over the iterations that did not diverge (this process's
        values).

    Raises:
        BudgetReached: before an iteration the budget no longer allows.
        TrainingDiverged: a divergence past ``max_recoveries``.
    """
    cfg, st, epoch = run.cfg, run.state, run.state.epoch
    objective = loss_weights(cfg.objective, run.objective, epoch)
    batches = jdata.batches(
        run.data.train_on_device,
        cfg.optim.batch_size,
        shuffle=True,
        generator=epoch_order_generator(cfg.optim.seed, epoch),
        rank=run.dist.rank,
        world_size=run.dist.world_size,
    )
    totals, every = EpochTotals(), cfg.folder.log_every  # metrics rows (and histograms) due
    for pos, (x, y, idx) in enumerate(batches):
        if pos < st.pos:
            continue  # resuming inside the epoch: skip batches already trained on
        check_budget(run)
        it = st.iteration
        lr = set_learning_rate(run, it, epoch)
        # the step; its terms are host floats (the iteration's one sync point)
        batch = _batch(run, x, y, idx)
        terms, x_q = train_step(run.ctx, batch, objective)
        if x_q is not None:
            run.last_samples = x_q
        reason = collectives.agree_on_divergence(hooks.guard.check(terms), run.dist)
        if reason is not None:
            recover(run, hooks, hooks.guard.verdict(st, reason))
        st.iteration, st.pos, st.seconds = it + 1, pos + 1, run.elapsed()
        if reason is None:
            watch_split(run, hooks, terms, objective.w_px)
        totals.add(None if reason is not None else terms)
        after_iteration(run, hooks, terms if reason is None else None, epoch, lr, objective.w_px)
        if reason is None and hooks.tensorboard.enabled and st.iteration % every == 0:
            energy_histograms(hooks.tensorboard, run.ctx.model_for_chain, batch.x, x_q, it + 1)
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


def check_budget(run: Run) -> None:
    """Raise :class:`BudgetReached` when the budget allows no further iteration (every process
    together when the budget is a time)."""
    budget = run.cfg.budget
    reason = budget_reason(budget, run.state.iteration, run.elapsed())
    if budget.max_minutes is not None:  # clocks differ between processes: stop together
        reason = collectives.agree_on_divergence(reason, run.dist)
    if reason is not None:
        raise BudgetReached(reason)


def set_learning_rate(run: Run, iteration: int, epoch: int) -> float:
    """Set (and return) the learning rate of ``iteration``."""
    lr = learning_rate(run.cfg.optim, iteration, epoch, run.state.lr_scale)
    for group in run.ctx.optimizer.param_groups:
        group["lr"] = lr
    return lr


def recover(run: Run, hooks: Hooks, verdict: Verdict) -> None:
    """Carry out the guard's verdict on a diverged iteration: restore the last good model and
    optimiser states, lower the learning rate, rebuild the sampler from a fresh seed, and log
    the event; or log the stop and raise.

    Raises:
        TrainingDiverged: the verdict is to stop.
    """
    st, it = run.state, run.state.iteration
    row = {
        "event": "recovery",
        "iteration": it,
        "epoch": st.epoch,
        "reason": verdict.reason,
        "recoveries": st.recoveries,  # recoveries made: the stop below is not one
        "seconds": run.elapsed(),
    }
    if verdict.stop:
        row["event"] = "stopped"
        hooks.log.write(row)
        raise TrainingDiverged(
            stop_message(it, verdict.reason, st.recoveries, hooks.saver.last_path)
        )
    st.recoveries = verdict.recoveries
    row["recoveries"] = st.recoveries
    hooks.saver.restore_last_good(run.ctx.model_for_chain, run.ctx.optimizer)
    st.lr_scale = verdict.lr_scale
    st.reseeds += 1
    run.generators["sampler"].manual_seed(
        sampler_seed(run.cfg.optim.seed, st.reseeds, run.dist.rank)
    )
    run.ctx.sampler = make_sampler(
        run.cfg, run.data.train, run.device, generator=run.generators["sampler"], dist=run.dist
    )
    row["lr_scale"] = st.lr_scale
    hooks.log.write(row)
    hooks.progress.note(recovery_note(verdict, hooks.guard.max_recoveries, it))


def watch_split(run: Run, hooks: Hooks, terms: dict[str, float], w_px: float) -> None:
    """Log and note a split of the energies the first time the split watch sees one."""
    row = hooks.split_watch.check(run.state, terms, w_px)
    if row is not None:
        hooks.log.write(row)
        hooks.progress.note(
            split_message(row["iteration"], row["energy_data"], row["energy_sample"])
        )


def after_iteration(
    run: Run,
    hooks: Hooks,
    terms: dict[str, float] | None,
    epoch: int,
    lr: float,
    w_px: float | None = None,
) -> None:
    """Bookkeeping after an iteration (``terms`` None: it diverged): metrics row (with the
    learning rate and the p(x) weight ``w_px``), progress, sample grid, resume point."""
    every, st, done = run.cfg.folder, run.state, run.state.iteration
    log_due = terms is not None and done % every.log_every == 0
    sample_due = bool(every.sample_every) and done % every.sample_every == 0
    ckpt_due = (
        bool(every.ckpt_every) and done % every.ckpt_every == 0 and st.pos < run.steps_per_epoch
    )
    if log_due or sample_due or ckpt_due:
        check_folder(run)  # once for the iteration's writes: it is a collective in a job
    if log_due:
        row = {"iteration": done, "epoch": epoch}
        mean = collectives.mean_terms(terms, run.dist)
        row.update({k: finite_or_none(v) for k, v in mean.items()})
        row["lr"] = lr
        if w_px is not None and run.cfg.generative:
            row["w_px"] = w_px
        hooks.log.write({**row, "seconds": st.seconds})
    hooks.progress.step(terms)
    if sample_due:
        write_samples(run, f"{done:07d}", hooks.tensorboard)
    if ckpt_due:
        hooks.saver.save_last(checkpoint_state(run))


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
    check_folder(run)
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


def write_samples(run: Run, tag: str, tensorboard: NullTensorBoard | None = None) -> None:
    """Save the latest SGLD samples (or, without any, chains from noise) as ``samples_<tag>``
    (and show them in TensorBoard)."""
    cfg, x = run.cfg, run.last_samples
    if not run.dist.is_main:
        return
    if x is None:  # CE runs, or nothing sampled yet
        chain = cfg.chain.spec()
        x = sample_from_noise(
            run.ctx.model_for_chain,
            GRID_CHAINS,
            run.data.train.shape,
            spec=chain.with_steps(max(1, chain.n_steps)),
            seed=cfg.optim.seed * 7 + run.state.iteration,
        )
    path = run.out / "samples" / f"samples_{tag}.png"
    save_samples(x, path, run.data.train)
    if tensorboard is not None:
        tensorboard.image_file("samples", path, run.state.iteration)


GRID_CHAINS = 64  # chains drawn for a sample grid when the run has no samples of its own


def fit(run: Run, hooks: Hooks) -> tuple[str, str | None]:
    """Train the remaining epochs; returns ``(status, reason)``: ("completed", None),
    ("budget", what was reached) after saving last.pt, or ("diverged", the error)."""
    try:
        while run.state.epoch < run.cfg.optim.epochs:
            train_one_epoch(run, hooks)
            end_of_epoch(run, hooks)
    except TrainingDiverged as err:
        return "diverged", str(err)
    except BudgetReached as reached:
        run.state.seconds = run.elapsed()
        check_folder(run)
        hooks.saver.save_last(checkpoint_state(run))
        return "budget", str(reached)
    return "completed", None


def check_folder(run: Run) -> None:
    """Stop (every process) when the run folder was removed or replaced since it was opened:
    called before each write, so the run never recreates a folder it cannot resume from.

    Raises:
        RunFolderLost
    """

    def check() -> None:
        if run.folder_id is not None:  # None: not opened yet
            check_intact(run.out, run.folder_id)

    distributed.on_main(check, run.dist)
