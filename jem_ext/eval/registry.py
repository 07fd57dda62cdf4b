"""The evaluation tasks, one :class:`TaskEntry` each, in :data:`REGISTRY`.

An entry says everything the rest of the evaluation needs to know of a task: how to run it on
one model (``run``, returning a result whose ``to_json()`` is the model's part of report.json),
what it checks and loads once before any task runs (``prepare``), its report.md section
(``section``, from :mod:`jem_ext.eval.sections`) and its PNG figures (``figures``). The task
names (:data:`TASKS`: ``--tasks`` and its default), the driver (:mod:`jem_ext.eval.report`), the
report.md sections and the figures all follow from the table, in its order; a new task is one
entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import save_image_grid
from . import plots, sections
from .fid import FIDResult, prepare_fid, run_fid
from .generation import chain_init, generate, grid_file, load_judge, run_generation
from .inputs import EvalData, Loaded
from .options import REGISTRY, TASKS
from .settings import EvalSettings, SGLDSettings
from .tasks import logits_of, run_accuracy, run_calibration, run_ood, run_robustness

__all__ = ["REGISTRY", "TASKS", "Figure", "Inputs", "ModelResults", "TaskEntry"]

# A PNG to write: its file name and the function that draws it to a path.
Figure = tuple[str, Callable[[Path], None]]


@dataclass
class Inputs:
    """Everything the tasks read: the models, the data, the SGLD settings and what each task
    prepared (by task name: e.g. the IS/FID network)."""

    settings: EvalSettings
    models: list[Loaded]  # [main] or [main, compare]
    data: EvalData
    sgld: SGLDSettings
    prepared: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why it cannot run
    chain: Callable[..., torch.Tensor] | None = None  # the generation chains' function
    warnings: list[str] = field(default_factory=list)  # data that differ (report.json)


@dataclass
class ModelResults:
    """One model's results, by task name (absent: not run)."""

    model: Loaded
    compare: bool = False
    logits: torch.Tensor | None = field(default=None, repr=False)
    parts: dict[str, Any] = field(default_factory=dict)
    seconds_by_task: dict[str, float] = field(default_factory=dict)

    def get(self, task: str) -> Any:
        """The result of ``task``, or None when it was not run."""
        return self.parts.get(task)

    def test_logits(self, inp: Inputs) -> torch.Tensor:
        """The model's logits on the test images, computed once."""
        if self.logits is None:
            self.logits = logits_of(
                self.model.model, inp.data.x, inp.settings, f"{self.model.label}: logits"
            )
        return self.logits

    def to_json(self) -> dict[str, Any]:
        m = self.model
        out: dict[str, Any] = {
            "label": m.label,
            "checkpoint": str(m.path),
            "objective": m.config.get("objective"),
            "iteration": m.state.get("iteration"),
            "best_val_accuracy": m.state.get("best_val_accuracy"),
        }
        for name, part in self.parts.items():
            out.update(REGISTRY[name].to_json(part, self.compare))
        out["seconds_by_task"] = self.seconds_by_task
        return out


def _plain_json(result: Any, compare: bool) -> dict[str, Any]:
    return result.to_json()


@dataclass(frozen=True)
class TaskEntry:
    """One evaluation task.

    Attributes:
        name: the task's name in ``--tasks`` and report.json's ``"tasks"``.
        run: the task on one model, ``(results, inputs) -> result``; ``results`` holds the
            model, its test logits (:meth:`ModelResults.test_logits`) and the results of the
            tasks before it.
        section: its report.md section ``(report, results, images) -> lines`` (None: none).
        figures: its PNGs ``(results of every model, inputs) -> [(file name, draw)]``.
        prepare: run once before any task, ``(settings, main model) -> (value, skip reason)``:
            loads or checks what the task needs (raising :class:`EvalError` on bad input);
            the value is ``inputs.prepared[name]``; a skip reason goes to report.json's
            ``"skipped"``.
        to_json: the result's part of a model's report.json dict, ``(result, compare)``.
    """

    name: str
    run: Callable[[ModelResults, Inputs], Any]
    section: Callable[[dict, list[dict], bool], list[str]] | None = None
    figures: Callable[[list[ModelResults], Inputs], list[Figure]] | None = None
    prepare: Callable[[EvalSettings, Loaded], tuple[Any, str | None]] | None = None
    to_json: Callable[[Any, bool], dict[str, Any]] = _plain_json


# ------------------------------------------------------------------- how each task runs


def _accuracy(res: ModelResults, inp: Inputs) -> Any:
    return run_accuracy(res.model, inp.data, inp.settings, inp.sgld, res.test_logits(inp))


def _calibration(res: ModelResults, inp: Inputs) -> Any:
    return run_calibration(inp.data, res.test_logits(inp))


def _ood(res: ModelResults, inp: Inputs) -> Any:
    return run_ood(res.model, inp.data, inp.settings)


def _generation(res: ModelResults, inp: Inputs) -> Any:
    s = inp.settings
    judge = inp.prepared.get("generation")
    return run_generation(res.model, inp.data, s, inp.sgld, res.test_logits(inp), inp.chain, judge)


def _prepare_generation(settings: EvalSettings, main: Loaded) -> tuple[Any, str | None]:
    """The --judge classifier (None without one)."""
    return load_judge(settings, main), None


def _fresh_samples(res: ModelResults, inp: Inputs) -> torch.Tensor:
    """The generation task's unconditional samples, or the same chains run afresh."""
    if res.get("generation") is not None:
        return res.get("generation").samples
    s, m = inp.settings, res.model
    return generate(
        m.model,
        s.generation.gen_n,
        m.in_shape,
        s.generation.gen_steps,
        inp.sgld,
        s,
        seed=s.data.seed + 2,
        desc=f"{m.label}: SGLD for FID",
        chain=inp.chain,
        init=chain_init(m, s.generation.gen_init),
    )


def _fid(res: ModelResults, inp: Inputs) -> Any:
    net = inp.prepared.get("fid")
    if net is None:
        return FIDResult(skipped=inp.skipped.get("fid"))
    return run_fid(res.model, inp.data, inp.settings, net, _fresh_samples(res, inp))


def _robustness(res: ModelResults, inp: Inputs) -> Any:
    return run_robustness(res.model, inp.data, inp.settings, inp.sgld)


# ------------------------------------------------------------------------------ figures


def _reliability_png(results: list[ModelResults], inp: Inputs) -> list[Figure]:
    cal = {r.model.label: r.get("calibration").stats for r in results}
    title = f"Reliability on {inp.data.dataset} test"
    return [("reliability.png", lambda p: plots.reliability_diagram(cal, p, title=title))]


def _logpx_pngs(results: list[ModelResults], inp: Inputs) -> list[Figure]:
    out: list[Figure] = []
    for r, name in zip(results, ["logpx_hist.png", "logpx_hist_compare.png"]):
        logpx, title = r.get("ood").logpx, f"log p(x) under {r.model.label}"
        out.append((name, lambda p, d=logpx, t=title: plots.logpx_histograms(d, p, title=t)))
    return out


def _grid_pngs(results: list[ModelResults], inp: Inputs) -> list[Figure]:
    return [
        (grid_file(kind, r.compare), lambda p, x=x, nrow=nrow: save_image_grid(x, p, nrow=nrow))
        for r in results
        for kind, (x, nrow) in r.get("generation").grids().items()
    ]


def _robustness_pngs(results: list[ModelResults], inp: Inputs) -> list[Figure]:
    k = inp.settings.robustness.robust_refine_steps
    out: list[Figure] = []
    for norm in inp.settings.robustness.norms:
        curves = {
            r.model.label: [tuple(c) for c in r.get("robustness").curves[norm]] for r in results
        }
        out.append(
            (
                f"robustness_{norm}.png",
                lambda p, c=curves, n=norm: plots.robustness_curve(
                    c, p, title=f"PGD {n}, K = {k} SGLD steps", xlabel=f"eps ({n})"
                ),
            )
        )
    return out


# -------------------------------------------------------------------------------- table

# The table itself lives in jem_ext.eval.options (below the tasks, so that --tasks can name
# them); this is where the entries are.
REGISTRY.update(
    (e.name, e)
    for e in (
        TaskEntry("accuracy", _accuracy, section=sections.accuracy_section),
        TaskEntry(
            "calibration",
            _calibration,
            section=sections.accuracy_section,
            figures=_reliability_png,
        ),
        TaskEntry("ood", _ood, section=sections.ood_section, figures=_logpx_pngs),
        TaskEntry(
            "generation",
            _generation,
            section=sections.generation_section,
            figures=_grid_pngs,
            prepare=_prepare_generation,
            to_json=lambda result, compare: result.to_json(compare),
        ),
        TaskEntry("fid", _fid, section=sections.fid_section, prepare=prepare_fid),
        TaskEntry(
            "robustness", _robustness, section=sections.robustness_section, figures=_robustness_pngs
        ),
    )
)
