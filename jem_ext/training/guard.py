"""The divergence guard: spot a diverging iteration from its loss terms and recover from it;
and the split watch: report when the energies of data and samples settle apart.

An iteration diverges when its loss is not finite, or ``|loss|`` or
``|energy_data - energy_sample|`` exceeds the threshold. The guard only judges: its
:class:`Verdict` says whether to recover and at which learning-rate scale, and the loop acts on
it (:func:`jem_ext.training.loop.recover`): it restores the last good model and optimiser states
(so the diverged step's update never survives), scales the learning rate down, rebuilds the
sampler (a fresh replay buffer from a fresh seed) and logs an event row; past
``max_recoveries`` the run stops with :class:`TrainingDiverged`. The processes of a
distributed job decide together (the loop all-reduces the verdict), so all of them recover
from the same iteration to the same state.

A split is a different failure, which leaves the loss finite and the accuracy high: the SGLD
chains lose the data, and the energies of data and samples part until the L2 energy penalty
holds them at -+w_px / (2 l2_energy) (benchmarks/out/digits_study/FINDINGS.md). The p(x) term
then only separates data from chain samples: the model stops generating, and SGLD-based uses
(refinement, robustness) fail. :class:`SplitWatch` reports it once, when the gap has stayed
near that bound for ``SPLIT_PATIENCE`` iterations (it returns the event row, which the loop
logs); training goes on.

Both read the host floats the step returned and the run's progress counters; they never read a
tensor, and they write nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .options import GuardOptions
from .state import RunState

# A gap |energy_data - energy_sample| of at least this fraction of the penalty's bound
# w_px / l2_energy, held for SPLIT_PATIENCE iterations in a row, is a split.
SPLIT_FRACTION = 0.8
SPLIT_PATIENCE = 100


class TrainingDiverged(RuntimeError):
    """Training diverged more than ``--max-recoveries`` times."""


@dataclass(frozen=True)
class DivergenceGuard:
    """Detects divergence and recovers (see the module docstring).

    Attributes:
        threshold: largest acceptable ``|loss|`` and ``|energy_data - energy_sample|``.
        max_recoveries: recoveries allowed before the run stops.
        lr_factor: learning-rate factor applied at each recovery.
        check_gap: whether the energy gap is checked (not for the CE objective).
    """

    threshold: float
    max_recoveries: int
    lr_factor: float
    check_gap: bool = True

    @classmethod
    def from_config(cls, guard: GuardOptions, generative: bool) -> DivergenceGuard:
        """The guard of the run's options (the energy gap checked when it samples)."""
        return cls(
            guard.divergence_threshold,
            guard.max_recoveries,
            guard.recover_lr_factor,
            check_gap=generative,
        )

    def check(self, terms: dict[str, float]) -> str | None:
        """Why the iteration with these loss terms diverged, or None when it did not."""
        value = terms["loss"]
        if not math.isfinite(value):
            return f"non-finite loss ({value})"
        if abs(value) > self.threshold:
            return f"|loss| = {abs(value):.3g} > {self.threshold:g}"
        ed, es = terms.get("energy_data"), terms.get("energy_sample")
        if self.check_gap and ed is not None and es is not None:
            gap = abs(ed - es)
            if not math.isfinite(gap) or gap > self.threshold:
                return f"energy gap |energy_data - energy_sample| = {gap:.3g} > {self.threshold:g}"
        return None

    def verdict(self, state: RunState, reason: str) -> Verdict:
        """What to do about the diverged iteration of a run at ``state`` (which it leaves as
        it is): recover at a lower learning rate, or stop past ``max_recoveries``."""
        if state.recoveries >= self.max_recoveries:
            return Verdict(reason, stop=True, recoveries=state.recoveries, lr_scale=state.lr_scale)
        return Verdict(
            reason,
            stop=False,
            recoveries=state.recoveries + 1,
            lr_scale=state.lr_scale * self.lr_factor,
        )


@dataclass(frozen=True)
class Verdict:
    """The guard's decision on a diverged iteration.

    Attributes:
        reason: why the iteration diverged (:meth:`DivergenceGuard.check`).
        stop: the run stops (no recovery left).
        recoveries: recoveries made once the loop has acted (unchanged when stopping).
        lr_scale: the learning-rate scale from now on.
    """

    reason: str
    stop: bool
    recoveries: int
    lr_scale: float


def stop_message(iteration: int, reason: str, recoveries: int, last_checkpoint: object) -> str:
    """The error of a run stopped by the guard, with the checkpoint to go back to."""
    return (
        f"training diverged at iteration {iteration} ({reason}) after {recoveries} "
        f"recover{'y' if recoveries == 1 else 'ies'}; stopping. The last good "
        f"checkpoint is {last_checkpoint}: "
        "lower --lr, raise --sgld-steps or --l2-energy, or try another --seed"
    )


def recovery_note(verdict: Verdict, max_recoveries: int, iteration: int) -> str:
    """The progress line of a recovery."""
    return (
        f"recovery {verdict.recoveries}/{max_recoveries} at iteration {iteration}: "
        f"{verdict.reason}; lr x{verdict.lr_scale:.3g}"
    )


@dataclass(frozen=True)
class SplitWatch:
    """Reports a split of the energies (see the module docstring); off without an L2 penalty
    (no bound to settle at) and for the CE objective."""

    l2_energy: float
    active: bool

    @classmethod
    def from_config(cls, l2_energy: float, generative: bool) -> SplitWatch:
        """The watch of a run with this L2 penalty (active when it samples and has one)."""
        return cls(l2_energy, active=generative and l2_energy > 0)

    def bound(self, w_px: float) -> float:
        """The gap at which the contrastive term and the L2 penalty balance."""
        return w_px / self.l2_energy

    def check(self, state: RunState, terms: dict[str, float], w_px: float) -> dict[str, Any] | None:
        """Count the iterations in a row at the bound (in ``state``); the first time they
        reach ``SPLIT_PATIENCE``, mark the split in ``state`` and return its event row (the
        loop logs it and notes :func:`split_message`); None otherwise."""
        ed, es = terms.get("energy_data"), terms.get("energy_sample")
        if not self.active or w_px <= 0 or ed is None or es is None:
            return None
        st = state
        bound = self.bound(w_px)
        st.split_streak = st.split_streak + 1 if abs(ed - es) >= SPLIT_FRACTION * bound else 0
        if st.split_streak < SPLIT_PATIENCE or st.split_at >= 0:
            return None
        st.split_at = st.iteration
        return {
            "event": "energy_split",
            "iteration": st.iteration,
            "epoch": st.epoch,
            "energy_data": ed,
            "energy_sample": es,
            "bound": bound,
        }


def split_message(iteration: int, energy_data: float, energy_sample: float) -> str:
    """What a split means and what to try, in one line."""
    return (
        f"energies split since iteration {iteration} (data {energy_data:.3g}, samples "
        f"{energy_sample:.3g}, at the L2 penalty's bound): the SGLD chains no longer reach the "
        "data, so the model stops generating; try a lower --lr, more --sgld-steps or a later "
        "--w-px-decay-epochs"
    )
