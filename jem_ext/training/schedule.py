"""The run's schedules as pure functions: the learning rate, the p(x) weight's decay, each
epoch's data order and the budget.

Each is a function of its arguments only (the config groups it reads and the position in the
run), so the loop (:mod:`.loop`) and its tests call them alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..objectives import Objective
from .options import BudgetOptions, ObjectiveOptions, OptimOptions


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


def budget_reason(budget: BudgetOptions, iteration: int, seconds: float) -> str | None:
    """Why a run at ``iteration`` after ``seconds`` of training must stop, or None."""
    if budget.max_iters is not None and iteration >= budget.max_iters:
        return f"reached --max-iters {budget.max_iters} ({iteration} iterations)"
    if budget.max_minutes is not None and seconds >= 60.0 * budget.max_minutes:
        return f"reached --max-minutes {budget.max_minutes:g} ({seconds / 60.0:.2f} minutes)"
    return None
