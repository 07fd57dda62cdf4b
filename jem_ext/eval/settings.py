"""What every evaluation task shares: its error type and its typed settings.

The command line (:mod:`jem_ext.eval.cli`) turns flags into an :class:`EvalSettings`; the SGLD
chain the tasks use is resolved once, from the flags and the checkpoint's sampler, into a
:class:`~jem_ext.sampler.ChainSpec` (``SGLDSettings``); each task sets its own number of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..sampler import (
    DEFAULT_CLAMP,
    DEFAULT_N_STEPS,
    DEFAULT_NOISE_STD,
    DEFAULT_STEP_SIZE,
    ChainSpec,
)

__all__ = [
    "BUILTIN_OOD",
    "DEFAULT_EPS",
    "ECE_BINS",
    "NORMS",
    "SCORES",
    "EvalError",
    "EvalSettings",
    "SGLDSettings",
    "resolve_sgld",
]

BUILTIN_OOD = ("uniform", "gaussian", "constant", "interp")
GEN_INITS = ("uniform", "gaussian")  # where --gen-init starts the fresh generation chains
SCORES = ("logpx", "maxprob", "approx_mass")
NORMS = ("linf", "l2")
DEFAULT_EPS = {"linf": [0.0, 0.05, 0.1, 0.2, 0.3], "l2": [0.0, 0.25, 0.5, 1.0, 2.0]}
ECE_BINS = 20

# The SGLD chain of the evaluation's tasks (refinement, generation, the robust classifier):
# jem_ext.sampler's ChainSpec, its clamp always set. JEM's settings (jem_ext.sampler's) apply
# where neither a flag nor the checkpoint's sampler gives one.
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
    for flag, value in (("--sgld-step-size", step_size), ("--sgld-noise", noise_std)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise EvalError(f"{flag}: expected a finite number >= 0, got {value}")
    if step_size is None:
        step_size = float(sampler.get("step_size") or DEFAULT_STEP_SIZE)
    if noise_std is None:
        noise = sampler.get("noise_std")
        noise_std = DEFAULT_NOISE_STD if noise is None else float(noise)
    clamp, grad_clip = sampler.get("clamp"), sampler.get("grad_clip")
    n_steps = sampler.get("n_steps")
    chain = ChainSpec(
        n_steps=DEFAULT_N_STEPS if not isinstance(n_steps, int) else n_steps,
        step_size=float(step_size),
        noise_std=float(noise_std),
        clamp=DEFAULT_CLAMP if clamp is None else (clamp[0], clamp[1]),
        grad_clip=None if grad_clip is None else float(grad_clip),
    )
    check_chain(chain, "--checkpoint's sampler settings")
    return chain


@dataclass
class EvalSettings:
    """Validated settings of one evaluation (the flags, parsed and checked)."""

    checkpoint: str
    out: str
    tasks: list[str]
    compare: str | None = None
    label: str | None = None
    compare_label: str | None = None
    model: str | None = None
    compare_model: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    batch_size: int = 100
    device: str = "cpu"
    max_samples: int | None = None
    seed: int = 0
    sgld_step_size: float | None = None
    sgld_noise: float | None = None
    refine_steps: int = 0
    ood: list[tuple[str, str | None]] | None = None
    gen_steps: int = 100
    gen_n: int = 100
    gen_init: str = "uniform"
    judge: str | None = None
    inception_weights: str | None = None
    fid_classifier: str | None = None
    pgd_norms: list[str] | None = None
    pgd_eps: dict[str, list[float]] | None = None
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    robust_refine_steps: int = 5
    robust_chains: int = 2
    robust_sigma: float = 0.0
    robust_n: int = 100
    no_progress: bool = False
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graph: bool = False

    @property
    def progress(self) -> bool:
        return not self.no_progress

    def to_json(self, sgld: SGLDSettings) -> dict[str, Any]:
        """The settings as report.json's ``"settings"``, with the SGLD settings in use."""
        out = dict(vars(self))
        out.update(
            sgld_step_size=sgld.step_size,
            sgld_noise=sgld.noise_std,
            gen_clamp=list(sgld.clamp),
            gen_grad_clip=sgld.grad_clip,
        )
        out["tasks"] = ",".join(self.tasks)
        out["pgd_norms"] = ",".join(self.pgd_norms or [])
        out["ood"] = [f"{n}:{f}" if f else n for n, f in self.ood or []]
        return out
