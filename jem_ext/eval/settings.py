"""What every evaluation task shares: its error type and its typed settings.

:class:`EvalSettings` is one frozen group per ``--help`` section (:mod:`jem_ext.eval.options`,
and the trainer's :class:`jem_ext.accel.SpeedOptions`); the command line
(:mod:`jem_ext.eval.cli`) generates its flags from them and builds it once they are checked.
Code reads attributes: ``settings.robustness.pgd_steps``. The SGLD chain the tasks use is
resolved once, from the flags and the checkpoint's sampler, into a
:class:`~jem_ext.chain.ChainSpec` (``SGLDSettings``); each task sets its own number of steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..accel import SpeedOptions
from ..chain import DEFAULT_CLAMP, ChainSpec
from ..settings import Spec, flat_values, group_from_flat, specs
from .options import (
    BUILTIN_OOD,
    DEFAULT_EPS,
    GEN_INITS,
    NORMS,
    DataOptions,
    DisplayOptions,
    FIDOptions,
    GenerationOptions,
    JobOptions,
    OODOptions,
    RobustnessOptions,
    SGLDOptions,
)

__all__ = [
    "BUILTIN_OOD",
    "DEFAULT_EPS",
    "ECE_BINS",
    "GEN_INITS",
    "NORMS",
    "SCORES",
    "EvalError",
    "EvalSettings",
    "SGLDSettings",
    "resolve_sgld",
]

SCORES = ("logpx", "maxprob", "approx_mass")
ECE_BINS = 20

# The SGLD chain of the evaluation's tasks (refinement, generation, the robust classifier):
# jem_ext.chain's ChainSpec, its clamp always set. JEM's chain (ChainSpec's defaults) applies
# where neither a flag nor the checkpoint's sampler gives a setting.
SGLDSettings = ChainSpec


class EvalError(Exception):
    """Bad input to the evaluation (reported as one line on stderr, exit status 2)."""


def check_chain(chain: ChainSpec, source: str) -> None:
    """Raise :class:`EvalError` (naming ``source``) unless the chain's settings are usable."""
    assert chain.clamp is not None  # resolve_sgld always sets it
    values = {
        "step size": chain.step_size,
        "noise": chain.noise_std,
        "clamp low": chain.clamp[0],
        "clamp high": chain.clamp[1],
    }
    if chain.grad_clip is not None:
        values["gradient clip"] = chain.grad_clip
    for name, v in values.items():
        if not math.isfinite(v):
            raise EvalError(f"{source}: SGLD {name} must be a finite number, got {v}")
    for name in ("step size", "noise", "gradient clip"):
        if values.get(name, 0.0) < 0:
            raise EvalError(f"{source}: SGLD {name} must be >= 0, got {values[name]}")
    if chain.clamp[0] > chain.clamp[1]:
        raise EvalError(f"{source}: SGLD clamp {chain.clamp} has low > high")


def resolve_sgld(
    sampler: dict[str, Any] | None, step_size: float | None, noise_std: float | None
) -> SGLDSettings:
    """The chains' settings: the flags where given, else the checkpoint's sampler, else JEM's.

    The clamp and the gradient clip always come from the sampler (clamp [-1, 1] without one).
    Raises :class:`EvalError` naming the source of an unusable value (e.g. a negative noise).
    """
    sampler = sampler if isinstance(sampler, dict) else {}
    jem = ChainSpec()
    for flag, value in (("--sgld-step-size", step_size), ("--sgld-noise", noise_std)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise EvalError(f"{flag}: expected a finite number >= 0, got {value}")
    if step_size is None:
        step_size = float(sampler.get("step_size") or jem.step_size)
    if noise_std is None:
        noise = sampler.get("noise_std")
        noise_std = jem.noise_std if noise is None else float(noise)
    clamp, grad_clip = sampler.get("clamp"), sampler.get("grad_clip")
    n_steps = sampler.get("n_steps")
    chain = ChainSpec(
        n_steps=jem.n_steps if not isinstance(n_steps, int) else n_steps,
        step_size=float(step_size),
        noise_std=float(noise_std),
        clamp=DEFAULT_CLAMP if clamp is None else (clamp[0], clamp[1]),
        grad_clip=None if grad_clip is None else float(grad_clip),
    )
    check_chain(chain, "--checkpoint's sampler settings")
    return chain


@dataclass(frozen=True)
class EvalSettings:
    """The checked settings of one evaluation, one group per ``--help`` section. Build it with
    :func:`jem_ext.eval.cli.parse_settings` (the command line) or :meth:`from_flat`."""

    job: JobOptions
    data: DataOptions
    sgld: SGLDOptions
    ood: OODOptions
    generation: GenerationOptions
    fid: FIDOptions
    robustness: RobustnessOptions
    display: DisplayOptions
    speed: SpeedOptions

    @classmethod
    def from_flat(cls, values: Mapping[str, Any] | None = None, **more: Any) -> EvalSettings:
        """The settings of a flat dict of flag values by ``dest`` (``batch_size=3``), every
        other setting at its default; paths made absolute. The values are taken as given:
        the command line checks them first (:func:`jem_ext.eval.cli.parse_settings`)."""
        flat = {**default_values(), **(values or {}), **more}
        unknown = sorted(set(flat) - set(all_specs()))
        if unknown:
            raise KeyError(f"EvalSettings: unknown settings {unknown}")
        for key, s in all_specs().items():
            if s.path and flat[key] is not None:  # report.json records absolute paths
                flat[key] = os.path.abspath(flat[key])
        return cls(**{f.name: group_from_flat(g, flat) for f, g in zip(_fields(), groups())})

    def to_json(self, sgld: SGLDSettings) -> dict[str, Any]:
        """The settings as report.json's ``"settings"`` (every flag, in ``--help`` order),
        the structured ones parsed, with the SGLD settings in use."""
        out: dict[str, Any] = {}
        for f in _fields():
            out.update(flat_values(getattr(self, f.name)))
        out.update(
            tasks=",".join(self.job.task_names),
            sgld_step_size=sgld.step_size,
            sgld_noise=sgld.noise_std,
            ood=[f"{n}:{f}" if f else n for n, f in self.ood.sets],
            pgd_norms=",".join(self.robustness.norms),
            pgd_eps=self.robustness.eps,
            gen_clamp=list(sgld.clamp),
            gen_grad_clip=sgld.grad_clip,
        )
        return out


def _fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(EvalSettings))


def groups() -> list[type]:
    """The group classes of :class:`EvalSettings`, in ``--help`` order."""
    hints = typing.get_type_hints(EvalSettings)
    return [hints[f.name] for f in _fields()]


def all_specs() -> dict[str, Spec]:
    """Every evaluation setting by its ``dest``, in ``--help`` order."""
    return {s.dest: s for g in groups() for _, s in specs(g)}


def default_values() -> dict[str, Any]:
    """Every setting's default by its ``dest`` (lists as lists, as argparse gives them)."""
    return {
        k: list(s.default) if isinstance(s.default, list) else s.default
        for k, s in all_specs().items()
    }
