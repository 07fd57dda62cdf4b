"""``python -m jem_ext.train``: check every input before writing anything, then train."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .. import data as jdata
from ..checkpoint import CheckpointError, load_checkpoint
from ..models import build_model
from .config import ConfigError, config_from_args
from .guard import TrainingDiverged
from .loop import train
from .setup import fresh_out, load_data, model_kwargs

_TRAINING_KEYS = ("model", "optimizer", "rng", "iteration", "epoch")


def _load_resume_state(run_dir: str) -> dict[str, Any]:
    ckpt = Path(run_dir) / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt)
    for key in _TRAINING_KEYS:
        if key not in state:
            raise CheckpointError(
                f"checkpoint {ckpt}: missing key {key!r} (not a training checkpoint)"
            )
    return state


def _check_model(cfg: dict[str, Any], datasets: dict[str, jdata.ImageData],
                 resume_state: dict[str, Any] | None) -> None:
    """Build the model once to surface bad model flags (or a foreign checkpoint) early."""
    train_d = datasets["train"]
    try:
        model = build_model(cfg["model"], train_d.num_classes, train_d.shape,
                            **model_kwargs(cfg))
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    if resume_state is not None:
        try:
            model.load_state_dict(resume_state["model"])
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(
                f"--resume: checkpoint does not match the config's model ({first})"
            ) from None


def _check_out(cfg: dict[str, Any]) -> None:
    """A fresh run needs a new or empty ``--out`` folder."""
    if cfg["out"] is None:
        cfg["out"] = fresh_out(cfg)
    out = Path(cfg["out"])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out {out}: already exists and is not empty (use --resume to continue a run)"
        )


def prepare(argv: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None,
                                                     dict[str, jdata.ImageData]]:
    """Parse and validate everything (config, data, checkpoint) before any file is written.

    Returns:
        ``(config, resume_state or None, datasets)``.

    Raises:
        ConfigError, DataError, CheckpointError.
    """
    cfg = config_from_args(argv)
    resume_state = None if cfg["resume"] is None else _load_resume_state(cfg["resume"])
    datasets = load_data(cfg)
    _check_model(cfg, datasets, resume_state)
    if cfg["labels_per_class"] is not None:
        jdata.labeled_mask(datasets["train"].y, cfg["labels_per_class"], seed=cfg["seed"])
    if cfg["resume"] is None:
        _check_out(cfg)
    return cfg, resume_state, datasets


def _summary_line(summary: dict[str, Any]) -> str:
    best = summary["best_val_accuracy"]
    best_text = "none" if best is None else f"{best:.4f}"
    return (
        f"{summary['dataset']}/{summary['objective']}: test accuracy "
        f"{summary['test_accuracy']:.4f}, val accuracy {summary['val_accuracy']:.4f} "
        f"(best {best_text}), {summary['iterations']} iterations in "
        f"{summary['seconds']:.1f} s, {summary['recoveries']} recoveries; "
        f"run folder {summary['run_dir']}"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 diverged, 2 bad input)."""
    try:
        cfg, resume_state, datasets = prepare(argv)
    except (ConfigError, jdata.DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg, resume_state=resume_state, datasets=datasets)
    except CheckpointError as err:  # a resume state that does not fit (nothing written yet)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python -m jem_ext.train --resume {cfg['out']}",
              file=sys.stderr)
        return 130
    print(_summary_line(summary))
    return 0
