"""The divergence guard: spot a diverging iteration from its loss terms and recover from it.

An iteration diverges when its loss is not finite, or ``|loss|`` or
``|energy_data - energy_sample|`` exceeds the threshold. Recovery restores the last good
model and optimiser states (so the diverged step's update never survives), scales the learning
rate down, rebuilds the sampler (a fresh replay buffer from a fresh seed) and logs an event
row; past ``max_recoveries`` the run stops with :class:`TrainingDiverged`. The processes of a
distributed job decide together (the loop all-reduces the verdict), so all of them recover
from the same iteration to the same state.

The guard reads the host floats the step returned; it never reads a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .setup import Run, make_sampler, sampler_seed


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
    def from_config(cls, cfg: dict[str, Any]) -> DivergenceGuard:
        return cls(
            cfg["divergence_threshold"],
            cfg["max_recoveries"],
            cfg["recover_lr_factor"],
            check_gap=cfg["objective"] != "ce",
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

    def recover(self, run: Run, reason: str) -> None:
        """Recover the run from a diverged iteration, or stop it.

        Raises:
            TrainingDiverged: more than ``max_recoveries`` recoveries.
        """
        st, it = run.state, run.state.iteration
        st.recoveries += 1
        row = {
            "event": "recovery",
            "iteration": it,
            "epoch": st.epoch,
            "reason": reason,
            "recoveries": st.recoveries,
            "seconds": run.elapsed(),
        }
        if st.recoveries > self.max_recoveries:
            row["event"] = "stopped"
            run.log.write(row)
            raise TrainingDiverged(
                f"training diverged at iteration {it} ({reason}) after {self.max_recoveries} "
                f"recoveries; stopping. The last good checkpoint is {run.saver.last_path}: "
                "lower --lr, raise --sgld-steps or --l2-energy, or try another --seed"
            )
        run.saver.restore_last_good(run)
        st.lr_scale *= self.lr_factor
        st.reseeds += 1
        run.generators["sampler"].manual_seed(
            sampler_seed(run.cfg["seed"], st.reseeds, run.dist.rank)
        )
        run.ctx.sampler = make_sampler(
            run.cfg, run.data.train, run.device, generator=run.generators["sampler"], dist=run.dist
        )
        row["lr_scale"] = st.lr_scale
        run.log.write(row)
        run.progress.note(
            f"recovery {st.recoveries}/{self.max_recoveries} at iteration {it}: "
            f"{reason}; lr x{st.lr_scale:.3g}"
        )
