"""The evaluation's inputs: checkpoints and their models, the test data, the OOD sets.

Each loader turns a bad input into one :class:`~jem_ext.eval.settings.EvalError` line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    replay_buffer_samples,
    resolve_checkpoint,
)
from ..data import DataError, data_fingerprint, fingerprint_changes, load_dataset
from .settings import EvalError, EvalSettings

__all__ = [
    "EvalData",
    "Loaded",
    "load_data",
    "load_model",
    "load_eval_data",
    "training_data",
    "data_warnings",
]


@dataclass
class Loaded:
    """A checkpoint and its rebuilt model."""

    path: Path
    state: dict[str, Any]
    model: nn.Module
    label: str
    in_shape: tuple[int, ...]
    num_classes: int

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.state.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def is_image(self) -> bool:
        """Whether samples are images (1 or 3 channels) that grids and Inception can show."""
        return len(self.in_shape) == 3 and self.in_shape[0] in (1, 3)

    def buffer_samples(self) -> torch.Tensor | None:
        """The replay buffer saved with the checkpoint, or None."""
        return replay_buffer_samples(self.state)


@dataclass
class EvalData:
    """The test images and labels (a seeded subset), the extra OOD sets, and the fingerprint of
    the whole test split (see :func:`jem_ext.data.data_fingerprint`)."""

    dataset: str
    x: torch.Tensor
    y: torch.Tensor
    ood_extra: dict[str, torch.Tensor]
    fingerprint: dict[str, Any] | None = None


def load_model(
    path: str, device: str, what: str, label: str | None = None, factory: str | None = None
) -> Loaded:
    """Resolve, load and rebuild a checkpoint (raises :class:`EvalError`); a model from a
    factory is rebuilt by the ``factory`` the user named (a checkpoint never imports code)."""
    try:
        file = Path(os.path.abspath(resolve_checkpoint(path)))
        state = load_checkpoint(file, map_location="cpu")
        flag = "--compare-model" if what == "--compare" else "--model"
        model = model_from_checkpoint(state, device=device, factory=factory, flag=flag)
    except CheckpointError as err:
        raise EvalError(f"{what}: {err}") from None
    spec = state["model_spec"]
    model.requires_grad_(False)
    cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
    if label is None:
        label = str(cfg.get("objective") or file.parent.parent.name or file.stem)
    return Loaded(
        path=file,
        state=state,
        model=model,
        label=label,
        in_shape=tuple(int(s) for s in spec["in_shape"]),
        num_classes=int(spec["num_classes"]),
    )


def load_data(name: str, root: str | None, what: str, seed: int = 0):
    """The test split of data set ``name`` (raises :class:`EvalError`); ``seed`` draws the
    points of the toy sets, as in training."""
    try:
        return load_dataset(name, root, "test", seed=seed)
    except DataError as err:
        raise EvalError(f"{what}: {err}") from None


def check_shape(data, loaded: Loaded, what: str) -> None:
    """The data's sample shape must match the model's."""
    if tuple(data.shape) != loaded.in_shape:
        raise EvalError(
            f"{what}: samples of {data.name!r} have shape {tuple(data.shape)} but the model of "
            f"{loaded.path} expects {loaded.in_shape}"
        )


def subset(data, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of at most ``n`` samples (all of them when n is None)."""
    if n is None or len(data) <= n:
        return data.x, data.y
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:n].sort().values
    return data.x[idx], data.y[idx]


def load_compare(settings: EvalSettings, main: Loaded) -> Loaded:
    """The ``--compare`` model; it must take the same inputs and classes as the main one."""
    other = load_model(
        settings.job.compare,
        settings.data.device,
        "--compare",
        settings.job.compare_label,
        settings.job.compare_model,
    )
    if (other.in_shape, other.num_classes) != (main.in_shape, main.num_classes):
        raise EvalError(
            f"--compare {other.path}: its model takes {other.in_shape} with "
            f"{other.num_classes} classes, but the --checkpoint model takes "
            f"{main.in_shape} with {main.num_classes} classes"
        )
    if other.label == main.label:
        other.label += " (compare)"
    return other


def load_eval_data(settings: EvalSettings, main: Loaded) -> EvalData:
    """The test subset of the checkpoint's (or ``--dataset``'s) data and the ``--ood`` sets."""
    dataset = settings.data.dataset or main.config.get("dataset")
    if not dataset:
        raise EvalError(f"--checkpoint {main.path}: its config names no 'dataset'; pass --dataset")
    root = (
        settings.data.data_root
        if settings.data.data_root is not None
        else main.config.get("data_root")
    )
    # A toy set is drawn from the run's seed: the checkpoint's own data set is its test split.
    seed = main.config.get("seed", 0) if dataset == main.config.get("dataset") else 0
    data = load_data(dataset, root, f"data set {dataset!r}", seed=seed)
    check_shape(data, main, f"data set {dataset!r}")
    if data.num_classes != main.num_classes:
        raise EvalError(
            f"data set {dataset!r} has {data.num_classes} classes but the model of "
            f"{main.path} has {main.num_classes} outputs"
        )
    x, y = subset(data, settings.data.max_samples, settings.data.seed)
    extra = {}
    for name, folder in settings.ood.sets:
        d = load_data(name, folder, f"--ood {name}")
        check_shape(d, main, f"--ood {name}")
        extra[name] = subset(d, settings.data.max_samples, settings.data.seed)[0]
    fingerprint = data_fingerprint({"test": data})
    return EvalData(dataset=dataset, x=x, y=y, ood_extra=extra, fingerprint=fingerprint)


def training_data(m: Loaded, evaluated: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint records about its training data, and whether the evaluated data are
    those: ``matches`` is True (same fingerprint), False (``differences`` says how) or None
    (unknown: the run recorded no fingerprint)."""
    cfg = m.config
    recorded = cfg.get("data_fingerprint")
    recorded = recorded if isinstance(recorded, dict) else None
    info: dict[str, Any] = {
        "dataset": cfg.get("dataset"),
        "data_root": cfg.get("data_root"),
        "fingerprint": recorded,
        "matches": None,
        "differences": [],
    }
    if evaluated is None:
        return info
    if cfg.get("dataset") and cfg["dataset"] != evaluated["dataset"]:
        info["differences"] = [f"trained on data set {cfg['dataset']!r}"]
    elif recorded is not None and recorded.get("scheme") == evaluated.get("scheme"):
        info["differences"] = fingerprint_changes(recorded, evaluated)
    else:
        return info
    info["matches"] = not info["differences"]
    return info


def _run_folder_id(m: Loaded) -> str | None:
    """The run id in the config.json of the run folder holding the checkpoint, if any."""
    if m.path.parent.name != "checkpoints":
        return None
    try:
        recorded = json.loads((m.path.parent.parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    run_id = recorded.get("run_id") if isinstance(recorded, dict) else None
    return run_id if isinstance(run_id, str) else None


def data_warnings(models: list[Loaded], data: EvalData) -> list[str]:
    """One line per model evaluated on data that differ from its training data, or stored in
    the run folder of another run, and one when the two models were trained on different
    data."""
    out = []
    for m, what in zip(models, ("--checkpoint", "--compare")):
        folder_id, own_id = _run_folder_id(m), m.config.get("run_id")
        if folder_id and own_id and folder_id != own_id:
            out.append(
                f"{what} {m.path}: the checkpoint belongs to another run than its run folder "
                f"(run_id {own_id}, the folder's config.json says {folder_id})"
            )
        info = training_data(m, data.fingerprint)
        if info["matches"] is False:
            out.append(
                f"{what} {m.path}: the evaluated {data.dataset} test data differ from its "
                f"training data ({'; '.join(info['differences'])}); its figures may not "
                "measure what they seem to"
            )
    if len(models) == 2:
        main, other = (m.config for m in models)
        a, b = main.get("data_fingerprint"), other.get("data_fingerprint")
        if main.get("dataset") != other.get("dataset"):
            diff = [f"{other.get('dataset')!r}, not {main.get('dataset')!r}"]
        elif isinstance(a, dict) and isinstance(b, dict) and a.get("scheme") == b.get("scheme"):
            diff = fingerprint_changes(a, b)
        else:
            diff = []
        if diff:
            out.append(
                f"--compare {models[1].path}: trained on other data than --checkpoint "
                f"({'; '.join(diff)}); the two models' figures may not be comparable"
            )
    return out
