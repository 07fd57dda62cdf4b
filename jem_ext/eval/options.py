"""Every evaluation setting, once: the groups of :class:`~jem_ext.eval.settings.EvalSettings`.

Each field is a :func:`jem_ext.settings.setting` (name, type, default, range or choices, help
text, flag) and each group one ``--help`` section; the speed group is the trainer's own
:class:`jem_ext.accel.SpeedOptions`. The parser, the defaults and the checks of
``python -m jem_ext.eval`` are generated from these classes (:mod:`jem_ext.eval.cli`); a new
flag is one field here, in its group.

A field holds the flag's value as given (paths made absolute); the groups read the structured
ones (``--tasks``, ``--pgd-norms``, ``--pgd-eps``, ``--ood``) through properties. An evaluation
setting's ``check`` returns the whole error line (:mod:`jem_ext.eval.checks`).

The task table (:data:`REGISTRY`) is kept here, below the tasks, so that ``--tasks`` can name
them; :mod:`jem_ext.eval.registry` fills it, one entry per task.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._cli import check_device
from ..chain import DEFAULT_NOISE_STD, DEFAULT_STEP_SIZE
from ..settings import GREATER_THAN_ZERO, NON_NEGATIVE, POSITIVE, Range, setting
from .checks import (
    BUILTIN_OOD,
    DEFAULT_EPS,
    NORMS,
    csv_items,
    eps_problem,
    eps_values,
    factory_problem,
    norms_problem,
    ood_problem,
    out_problem,
)

__all__ = [
    "BUILTIN_OOD",
    "DEFAULT_EPS",
    "GEN_INITS",
    "NORMS",
    "REGISTRY",
    "TASKS",
    "DataOptions",
    "DisplayOptions",
    "FIDOptions",
    "GenerationOptions",
    "JobOptions",
    "OODOptions",
    "RobustnessOptions",
    "SGLDOptions",
]

GEN_INITS = ("uniform", "gaussian")  # where --gen-init starts the fresh generation chains

# The evaluation tasks by name, in the table's order (jem_ext.eval.registry's entries).
REGISTRY: dict[str, Any] = {}


class _TaskNames(Sequence[str]):
    """The registered task names, in the table's order (a live view of :data:`REGISTRY`)."""

    def __getitem__(self, i):  # type: ignore[override]
        return list(REGISTRY)[i]

    def __len__(self) -> int:
        return len(REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(list(REGISTRY))

    def __repr__(self) -> str:
        return repr(tuple(REGISTRY))


TASKS: Sequence[str] = _TaskNames()


# ------------------------------------------------------------------------------- checks


def _tasks_problem(text: str) -> str | None:
    tasks = csv_items(text)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        return (
            f"--tasks: unknown task(s) {', '.join(unknown) or '(none given)'}; "
            f"expected a comma list of {', '.join(TASKS)}"
        )
    return None


# ------------------------------------------------------------------------------- groups


def _path(default: None, help: str, **spec: Any) -> Any:
    return setting(default, help, kind="str", path=True, **spec)


@dataclass(frozen=True)
class JobOptions:
    """What is evaluated (one checkpoint, or two side by side), by which tasks, and where the
    report goes."""

    GROUP = "checkpoints, tasks and output"
    checkpoint: str = _path(
        None,
        "checkpoint file (.pt) or run folder (uses checkpoints/best.pt, else checkpoints/last.pt)",
        required=True,
    )
    out: str = _path(
        None,
        "output folder (created; existing report files are replaced)",
        required=True,
        check=out_problem,
    )
    tasks: str | None = setting(
        None,
        lambda: "comma-separated tasks among " + ", ".join(TASKS) + " (default: all of them)",
        kind="str",
        check=_tasks_problem,
    )
    compare: str | None = _path(
        None,
        "second checkpoint or run folder evaluated on the same data; its figures go under "
        "'compare' in report.json and beside the first everywhere",
    )
    label: str | None = setting(
        None,
        "name of the first model in tables and plots (default: its objective from the run "
        "config, e.g. 'jem')",
        kind="str",
    )
    compare_label: str | None = setting(
        None, "name of the --compare model (default: its objective, e.g. 'ce')", kind="str"
    )
    model: str | None = setting(
        None,
        "the model factory of a --checkpoint run trained with --model PACKAGE.MODULE:FACTORY "
        "(needed for such a run: a checkpoint never imports code by itself; the name must be "
        "the one the run recorded)",
        kind="str",
        metavar="PACKAGE.MODULE:FACTORY",
        check=factory_problem("--model"),
    )
    compare_model: str | None = setting(
        None,
        "the model factory of the --compare run, when it was trained with one",
        kind="str",
        metavar="PACKAGE.MODULE:FACTORY",
        check=factory_problem("--compare-model"),
    )

    @property
    def task_names(self) -> list[str]:
        """The tasks to run, in the table's order (every task without ``--tasks``)."""
        chosen = list(TASKS) if self.tasks is None else csv_items(self.tasks)
        return [t for t in TASKS if t in chosen]


@dataclass(frozen=True)
class DataOptions:
    """The test data, how it is batched, where it runs and the seed of every random choice."""

    GROUP = "data"
    dataset: str | None = setting(
        None,
        "evaluate on this data set (default: the checkpoint's config['dataset'])",
        kind="str",
    )
    data_root: str | None = _path(
        None, "folder of the data set files (default: the checkpoint's config['data_root'])"
    )
    batch_size: int = setting(100, "batch size of every pass", range=POSITIVE)
    device: str = setting(
        "cuda" if torch.cuda.is_available() else "cpu",
        "torch device",
        kind="str",
        check=check_device,
    )
    max_samples: int | None = setting(
        None,
        "use a random subset (fixed by --seed) of at most this many test images (and of each "
        "--ood set) (default: all of them)",
        kind="int",
        range=Range(2),
    )
    seed: int = setting(0, "seed of every random choice")


@dataclass(frozen=True)
class SGLDOptions:
    """The SGLD chains of every task (refinement, generation, the robust classifier): what is
    not given comes from the checkpoint's sampler, else from JEM's chain
    (:class:`jem_ext.chain.ChainSpec`)."""

    GROUP = "SGLD chains"
    sgld_step_size: float | None = setting(
        None,
        "SGLD step size on d log p(x)/dx for refinement, generation and the robust "
        "classifier, used for both models (default: the --checkpoint's sampler setting, else "
        f"JEM's {DEFAULT_STEP_SIZE})",
        kind="float",
        range=NON_NEGATIVE,
    )
    sgld_noise: float | None = setting(
        None,
        "SGLD noise standard deviation, >= 0 (default: the --checkpoint's sampler setting, "
        f"else JEM's {DEFAULT_NOISE_STD})",
        kind="float",
        range=NON_NEGATIVE,
    )
    refine_steps: int = setting(
        0,
        "accuracy task: also report the accuracy after K SGLD refinement steps (0: skip)",
        range=NON_NEGATIVE,
    )


@dataclass(frozen=True)
class OODOptions:
    """Out-of-distribution sets besides the built-in ones."""

    GROUP = "out-of-distribution detection"
    ood: tuple[str, ...] = setting(
        [],
        "extra OOD data set (any name load_dataset knows, e.g. svhn:/data/svhn or "
        "folder:/path/to/images); its test split is used; repeatable",
        kind="str_list",
        metavar="NAME[:FOLDER]",
        check=ood_problem,
    )

    @property
    def sets(self) -> list[tuple[str, str | None]]:
        """``(name, absolute folder or None)`` of each ``--ood`` set."""
        out = []
        for spec in self.ood:
            name, _, folder = spec.partition(":")
            out.append((name, os.path.abspath(folder) if folder else None))
        return out


@dataclass(frozen=True)
class GenerationOptions:
    """The generation task's fresh chains and its second classifier."""

    GROUP = "generation"
    gen_steps: int = setting(
        100, "SGLD steps of the fresh generation chains (from --gen-init)", range=NON_NEGATIVE
    )
    gen_n: int = setting(
        100,
        "number of fresh unconditional samples (grid, IS and FID); the conditional grid has "
        "max(1, gen_n // classes) samples per class",
        range=POSITIVE,
    )
    gen_init: str = setting(
        "uniform",
        "where the fresh generation chains start: U(-1,1) noise, or the per-class Gaussians "
        "the run fitted to its training data (runs trained with --init gaussian)",
        kind="str",
        choices=GEN_INITS,
    )
    judge: str | None = _path(
        None,
        "generation task: a second classifier (a run folder or checkpoint, e.g. the "
        "cross-entropy twin) that also classifies the class-conditional samples; its rate is "
        "reported beside the model's own, which the chains climb and so easily satisfy",
        metavar="RUN",
    )


@dataclass(frozen=True)
class FIDOptions:
    """The network of the IS/FID task."""

    GROUP = "IS/FID"
    inception_weights: str | None = _path(
        None,
        "FID Inception-v3 state_dict (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) for "
        "the fid task",
    )
    fid_classifier: str | None = _path(
        None,
        "checkpoint whose classifier replaces Inception for IS/FID when --inception-weights "
        "is not given (figures not comparable with papers)",
    )


@dataclass(frozen=True)
class RobustnessOptions:
    """PGD attacks on the SGLD-refined classifier (JEM's robustness experiment)."""

    GROUP = "robustness (PGD)"
    pgd_norms: str = setting(
        "linf,l2", "comma-separated PGD norms (linf, l2)", kind="str", check=norms_problem
    )
    pgd_eps: tuple[str, ...] = setting(
        [],
        "PGD radii in the model's [-1, 1] input units, e.g. 'linf=0,0.1,0.2' or 'l2=0,0.5,1'; "
        "without 'NORM=' the list applies to every norm; repeatable (default: "
        + "; ".join(f"{k}={','.join(map(str, v))}" for k, v in DEFAULT_EPS.items())
        + ")",
        kind="str_list",
        metavar="[NORM=]E1,E2,...",
        check=eps_problem,
    )
    pgd_steps: int = setting(10, "PGD steps per attack", range=NON_NEGATIVE)
    pgd_step_size: float | None = setting(
        None,
        "PGD step length (default: 2.5 * eps / steps, as Madry et al.)",
        kind="float",
        range=GREATER_THAN_ZERO,
    )
    robust_refine_steps: int = setting(
        5, "K: SGLD refinement steps of the attacked classifier (0: plain)", range=NON_NEGATIVE
    )
    robust_chains: int = setting(
        2, "noisy SGLD chains averaged by the attacked classifier", range=POSITIVE
    )
    robust_sigma: float = setting(
        0.0,
        "std of the Gaussian noise added to the input to start each chain",
        range=NON_NEGATIVE,
    )
    robust_n: int = setting(100, "number of test points attacked", range=POSITIVE)

    @property
    def norms(self) -> list[str]:
        """The ``--pgd-norms``, in the order given."""
        return csv_items(self.pgd_norms)

    @property
    def eps(self) -> dict[str, list[float]]:
        """The radii of each norm: the defaults, replaced by each ``--pgd-eps`` in turn."""
        norms = self.norms
        eps = {n: list(DEFAULT_EPS[n]) for n in norms}
        for spec in self.pgd_eps:
            target, values = eps_values(spec)
            for n in [target] if target else norms:
                if n in eps:
                    eps[n] = sorted(set(values))
        return eps


@dataclass(frozen=True)
class DisplayOptions:
    """What is shown while the evaluation runs."""

    GROUP = "display"
    no_progress: bool = setting(False, "hide the tqdm progress bars")

    @property
    def progress(self) -> bool:
        return not self.no_progress
