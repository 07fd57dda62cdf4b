"""Evaluate a trained JEM checkpoint (optionally beside a second one) and write a report.

``python -m jem_ext.eval --checkpoint RUN_OR_FILE [--compare OTHER] --out DIR`` runs a list of
tasks on the test split of the data set the checkpoint was trained on and writes

- ``DIR/report.json``: every figure, machine-readable; the second checkpoint's figures (when
  ``--compare`` is given) under the key ``"compare"``, with the same layout;
- ``DIR/report.md``: the same figures as tables (both models side by side) with the PNGs;
- PNG figures: reliability diagram, log p(x) histograms, sample grids, robustness curves.

Tasks (``--tasks``, default: all of them; ``fid`` is skipped, with the reason in the report,
when neither ``--inception-weights`` nor ``--fid-classifier`` is given):

``accuracy``
    test accuracy; with ``--refine-steps K > 0`` also the accuracy after K SGLD steps on
    log p(x) from each input (:class:`~jem_ext.eval.attacks.SGLDRefinedClassifier`).
``calibration``
    expected calibration error with 20 equal-width bins of max p(y|x), reliability diagram.
``ood``
    AUROC of in-distribution test data against each OOD set for three scores: ``logpx``
    (logsumexp_y f(x)[y]), ``maxprob`` (max_y p(y|x)) and ``approx_mass`` (minus the per-sample
    L2 norm of d log p(x) / dx). Built-in OOD sets with the data's shape and as many samples as
    the test set: ``uniform`` (U(-1, 1) pixels), ``gaussian`` (N(0, 1) pixels clamped to
    [-1, 1]), ``constant`` (one U(-1, 1) value for all pixels of an image), ``interp`` (the
    mean (lambda = 0.5, as in the paper's "Interp" set) of two different random test images);
    plus any ``--ood NAME[:FOLDER]`` data set (its test split).
``generation``
    sample grids from fresh SGLD chains started at U(-1, 1) noise (unconditional, and
    class-conditional on E(x, y) = -f(x)[y], one row per class), and from the checkpoint's
    replay buffer when it holds one. The chains use the ``--checkpoint``'s sampler settings
    (step size, noise, clamp, gradient clipping; clamp [-1, 1] when it has none) unless
    ``--sgld-step-size`` / ``--sgld-noise`` are given; the same settings serve both models.
    Also reported: the fraction of class-conditional samples classified as their class and
    the mean log p(x) of the samples and of the test images.
``fid``
    Inception Score of the fresh-chain samples and FID between them and test images, with
    the FID Inception-v3 weights (``--inception-weights``: the standard
    ``pt_inception-2015-12-05-6726825d.pth``; IS from its 1008-way logits without the fc
    bias, as the original IS code and torch-fidelity); otherwise with the penultimate
    features / class probabilities of another classifier (``--fid-classifier``), reported as
    not comparable with published figures.
``robustness``
    accuracy under PGD (L-inf and L2) of the SGLD-refined classifier (K SGLD steps from the
    input averaged over several noisy chains), attacked through the refinement from a random
    start, with steps of 2.5 eps / steps unless ``--pgd-step-size`` is given. The defaults
    (:class:`~jem_ext.eval.options.RobustnessOptions`: test points, PGD steps, K, chains,
    radii) are sized for a CPU and digits; radii are in the [-1, 1] input units (L-inf 0.1
    here is 12.75/255 in [0, 1] pixel units).

Modules: :mod:`~jem_ext.eval.cli` (the command line, generated from the settings' groups in
:mod:`~jem_ext.eval.options`), :mod:`~jem_ext.eval.inputs`
(checkpoints and data), :mod:`~jem_ext.eval.tasks` and :mod:`~jem_ext.eval.generation` (the
tasks, each returning a typed result), :mod:`~jem_ext.eval.registry` (the tasks' table: one
entry per task), :mod:`~jem_ext.eval.writers` (report.json, report.md); this module runs the
registered tasks for each model and assembles the report.

Speed options (``--precision``, ``--channels-last``, ``--compile``, ``--cuda-graph``, as the
trainer's) change how the figures are computed, not what is computed; they are recorded in
report.json's ``"settings"`` (:mod:`~jem_ext.eval.speed`).

Bad input (a foreign or missing checkpoint, data whose sample shape or class count does not
match the model, an unknown task or data set, unreadable Inception weights, a non-finite or
out-of-range number, unusable SGLD settings in the checkpoint) is reported as one line on
stderr with exit status 2, before anything is written. Every output file is written
atomically (temporary file, then :func:`os.replace`), and only once all figures are computed;
report.json is standard JSON (a non-finite figure is written as null).

report.json records each model's training data (``"training_data"``: data set, data root and
the data fingerprint its run recorded, and whether the evaluated test data match it) and the
fingerprint of the evaluated test split (``"data_fingerprint"``). Test data that differ from a
model's training data, or two models trained on different data, are not refused: each gives a
line in ``"warnings"``, also printed on stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from .generation import chain_init
from .inputs import (
    Loaded,
    data_warnings,
    load_compare,
    load_eval_data,
    load_model,
    training_data,
)
from .registry import REGISTRY, Figure, Inputs, ModelResults
from .settings import EvalSettings, resolve_sgld
from .speed import apply_model_options, make_chain
from .writers import write_report

__all__ = ["Inputs", "ModelResults", "run"]


def prepare(settings: EvalSettings) -> Inputs:
    """Load and check every input; raises :class:`EvalError`, writes nothing."""
    main = load_model(
        settings.job.checkpoint,
        settings.data.device,
        "--checkpoint",
        settings.job.label,
        settings.job.model,
    )
    sgld = resolve_sgld(
        main.state.get("sampler"), settings.sgld.sgld_step_size, settings.sgld.sgld_noise
    )
    data = load_eval_data(settings, main)
    models = [main] + ([load_compare(settings, main)] if settings.job.compare else [])
    if {"generation", "fid"} & set(settings.job.task_names):
        for m in models:  # refuses --gen-init gaussian without fitted Gaussians
            chain_init(m, settings.generation.gen_init)
    prepared, skipped = {}, {}
    for task in settings.job.task_names:
        if REGISTRY[task].prepare is not None:
            prepared[task], reason = REGISTRY[task].prepare(settings, main)
            if reason is not None:
                skipped[task] = reason
    for m, what in zip(models, ("--checkpoint", "--compare")):
        apply_model_options(m.model, m.state["model_spec"], settings, what)
    return Inputs(
        settings=settings,
        models=models,
        data=data,
        sgld=sgld,
        prepared=prepared,
        skipped=skipped,
        chain=make_chain(settings),
        warnings=data_warnings(models, data),
    )


def evaluate(model: Loaded, inp: Inputs, compare: bool) -> ModelResults:
    """Every requested task for one model, each from the same global seed."""
    res = ModelResults(model=model, compare=compare)
    for task in inp.settings.job.task_names:
        torch.manual_seed(inp.settings.data.seed)
        t0 = time.time()
        res.parts[task] = REGISTRY[task].run(res, inp)
        res.seconds_by_task[task] = round(time.time() - t0, 2)
    return res


def figures(results: list[ModelResults], inp: Inputs) -> list[Figure]:
    """The PNGs to draw: each task's, in task order."""
    out: list[Figure] = []
    for task in inp.settings.job.task_names:
        draw = REGISTRY[task].figures
        if draw is not None:
            out += draw(results, inp)
    return out


def assemble(results: list[ModelResults], inp: Inputs) -> dict[str, Any]:
    """The report dict: the first model's results, the second's under ``"compare"``."""
    report = results[0].to_json()
    report.update(
        {
            "dataset": inp.data.dataset,
            "split": "test",
            "n_test": len(inp.data.x),
            "tasks": inp.settings.job.task_names,
            "settings": inp.settings.to_json(inp.sgld),
        }
    )
    if inp.skipped:
        report["skipped"] = dict(inp.skipped)
    if len(results) > 1:
        report["compare"] = results[1].to_json()
    report["data_fingerprint"] = inp.data.fingerprint
    for r, part in zip(results, (report, report.get("compare"))):
        part["training_data"] = training_data(r.model, inp.data.fingerprint)
    report["warnings"] = inp.warnings
    return report


def run(settings: EvalSettings) -> dict[str, Any]:
    """Run the evaluation described by ``settings``; returns the report dict.

    All inputs are validated before any computation; the output folder is created and the
    files written (each atomically) only once every figure is computed.

    Raises:
        EvalError: bad input (nothing has been written).
    """
    inp = prepare(settings)
    for warning in inp.warnings:
        print(f"jem_ext.eval: warning: {warning}", file=sys.stderr)
    start = time.time()
    results = [evaluate(m, inp, compare=i > 0) for i, m in enumerate(inp.models)]
    report = assemble(results, inp)
    drawn = figures(results, inp)
    report["seconds"] = round(time.time() - start, 1)
    report["files"] = ["report.json", "report.md"] + [name for name, _ in drawn]
    write_report(Path(settings.job.out), report, drawn)
    return report
