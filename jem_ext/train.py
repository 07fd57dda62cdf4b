"""Train a JEM (or its cross-entropy twin) and write a run folder.

Run ``python -m jem_ext.train --help`` for the flags. With no arguments it trains a JEM on the
8x8 scikit-learn digits with :class:`jem_ext.models.SmallCNN` on the CPU in a few minutes.

The run folder (``--out``, default ``runs/<timestamp>-<dataset>-<objective>``) holds::

    config.json        the config the run uses (rewritten by each resume with its overrides;
                       ``--config`` repeats the run)
    metrics.jsonl      one JSON object per logged iteration, eval rows and event rows
                       (recovery, stopped, resume with its overrides)
    checkpoints/       last.pt (every --ckpt-every iterations and at epoch ends), best.pt
    samples/*.png      sample grids (scatter plots for 2-D toy sets)
    summary.json       final figures; a one-line summary is also printed last
    .lock              held (flock) by the training process while it runs: a second run with
                       the same folder is refused

Reproducibility: the data order of epoch ``e`` is a function of ``(seed, epoch)``, and every
random draw comes from generators whose states are checkpointed together with the position
inside the epoch, so ``--resume RUN`` after a crash (even ``kill -9``) continues exactly where
``checkpoints/last.pt`` left off and ends in the same state as an uninterrupted run (the
thread count, which can change float results, is part of the config and kept too).

Divergence guard: a non-finite loss, or ``|loss|`` or ``|energy_data - energy_sample|`` above
``--divergence-threshold``, restores the last good state, multiplies the learning rate by
``--recover-lr-factor``, re-initialises the sampler's replay buffer and logs an event row;
after ``--max-recoveries`` recoveries the run stops with a non-zero exit.

Stopping and failures: Ctrl-C and SIGTERM (``timeout``, a scheduler, torchrun passing its own
SIGTERM on) stop the run the same way: the file being written is abandoned (its temporary
removed), the resume command is printed, and the exit status is 130 or 143. Temporary files
that a run killed outright (SIGKILL) left behind are removed when its folder is claimed again.
A write that fails (no space, a read-only file system) ends the run with one line naming the
file and the cause (exit 1); so does a run folder removed while the run writes it (the run
never recreates part of a folder). A run stopped before its first checkpoint has nothing to
resume: its command, re-run with the same ``--out``, starts it afresh. Under ``torchrun
--max-restarts N`` (``--out`` required), a restarted job continues from ``last.pt`` as
``--resume`` would.

The code lives in :mod:`jem_ext.training`, one concern per module; this module is the command
and re-exports its public names.
"""

from __future__ import annotations

import sys

from .training.cli import main, prepare
from .training.config import (
    ConfigError,
    RunConfig,
    build_parser,
    config_from_args,
    default_config,
)
from .training.guard import DivergenceGuard, TrainingDiverged
from .training.loop import accuracy, learning_rate
from .training.setup import build_run, load_data, make_optimizer, make_sampler
from .training.state import RunState
from .training.step import StepContext, train_step
from .training.trainer import train

__all__ = [
    "ConfigError",
    "DivergenceGuard",
    "RunConfig",
    "RunState",
    "StepContext",
    "TrainingDiverged",
    "accuracy",
    "build_parser",
    "build_run",
    "config_from_args",
    "default_config",
    "learning_rate",
    "load_data",
    "main",
    "make_optimizer",
    "make_sampler",
    "prepare",
    "train",
    "train_step",
]

if __name__ == "__main__":
    sys.exit(main())
