"""The ``train`` stage: seconds per training iteration and the projected recipe hours."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from ..objectives import Objective
from ..training.step import Batch, train_step
from .chain import _context
from .config import RECIPE, Option, Sizes
from .timing import _within, time_call


def stage_train(
    device: torch.device, sizes: Sizes, options: tuple[Option, ...], deadline: float = math.inf
) -> dict[str, Any]:
    """Seconds per training iteration and the projected hours of the full recipe."""
    iters = math.ceil(RECIPE["images"] / RECIPE["batch"]) * RECIPE["epochs"]
    out: dict[str, Any] = {"recipe": {**RECIPE, "iterations": iters}}
    for option in options:
        out[option.name] = _within(deadline, partial(_train_option, option, sizes, device, iters))
    return out


def _train_option(option: Option, sizes: Sizes, device: torch.device, iters: int) -> dict[str, Any]:
    ctx = _context(option, sizes, device)
    x = torch.rand(sizes.batch, *sizes.image, device=device) * 2 - 1
    batch = Batch(x, torch.randint(0, 10, (sizes.batch,), device=device))
    weights = Objective(l2_energy=0.1)
    timing = time_call(lambda: train_step(ctx, batch, weights), device, sizes.reps, warmup=2)
    return {**timing, "projected_hours": timing["median_s"] * iters / 3600}
