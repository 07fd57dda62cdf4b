"""``python -m jem_ext.train``: check every input before writing anything, then train."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import data as jdata
from ..checkpoint import CheckpointError, load_checkpoint, weights_mismatch
from ..models import meta_model
from . import distributed
from .config import ConfigError, check_identity, parse_command_line
from .folder import RunFolder
from .guard import TrainingDiverged
from .loop import train
from .setup import fresh_out, load_data, model_kwargs

_TRAINING_KEYS = {"model": dict, "optimizer": dict, "rng": dict, "iteration": int, "epoch": int}


def _load_resume_state(run_dir: str) -> dict[str, Any]:
    ckpt = Path(run_dir) / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt)
    for key, kind in _TRAINING_KEYS.items():
        if key not in state:
            raise CheckpointError(
                f"checkpoint {ckpt}: missing key {key!r} (not a training checkpoint)"
            )
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(
                f"checkpoint {ckpt}: {key!r} should be a {kind.__name__}, got "
                f"{type(state[key]).__name__}"
            )
    return state


def _check_model(
    cfg: dict[str, Any], datasets: dict[str, jdata.ImageData], resume_state: dict[str, Any] | None
) -> None:
    """Check the model flags (and a resumed checkpoint's weights) without allocating a model."""
    train_d = datasets["train"]
    spec = {
        "name": cfg["model"],
        "num_classes": train_d.num_classes,
        "in_shape": list(train_d.shape),
        "kwargs": model_kwargs(cfg),
    }
    try:
        model = meta_model(spec)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    if resume_state is not None:
        diff = weights_mismatch(model, resume_state["model"])
        if diff is not None:
            raise CheckpointError(
                f"--resume: checkpoint does not match the config's model (first difference: {diff})"
            )


@dataclass
class Prepared:
    """A checked command line: config, resume state, loaded data and the claimed run folder."""

    cfg: dict[str, Any]
    resume_state: dict[str, Any] | None
    datasets: dict[str, jdata.ImageData]
    folder: RunFolder | None  # None on the processes of a distributed job other than rank 0
    overrides: dict[str, Any] | None


def _claim(cfg: dict[str, Any]) -> RunFolder:
    """Claim the run folder now, so a second run with the same folder is refused at once."""
    if cfg["resume"] is not None:
        return RunFolder.claim_existing(cfg["out"])
    if cfg["out"] is None:
        cfg["out"] = fresh_out(cfg)
    return RunFolder.claim_new(cfg["out"])


def _claim_once(cfg: dict[str, Any], dist: distributed.Dist) -> RunFolder | None:
    """Claim the run folder on rank 0 only; the other processes learn its path (or error)."""
    folder = None

    def claim() -> str:
        nonlocal folder
        folder = _claim(cfg)
        return cfg["out"]

    cfg["out"] = distributed.on_main(claim, dist)
    return folder


def prepare(argv: list[str] | None = None) -> Prepared:
    """Parse and check everything (config, data, checkpoint) before any file is written.

    Under torchrun the process joins the job right after the config is read (see
    :mod:`.distributed`). The run folder is claimed next (by rank 0) and given back (removed, if
    this claim created it) when a later check fails.

    Raises:
        ConfigError, DataError, CheckpointError, LaunchError.
    """
    invocation = parse_command_line(argv)
    cfg = invocation.cfg
    folder = _claim_once(cfg, distributed.init_from_env(cfg))
    try:
        resume_state = None if cfg["resume"] is None else _load_resume_state(cfg["resume"])
        datasets = load_data(cfg)
        check_identity(cfg, datasets, resume_state)
        _check_model(cfg, datasets, resume_state)
        if cfg["labels_per_class"] is not None:
            jdata.labeled_mask(datasets["train"].y, cfg["labels_per_class"], seed=cfg["seed"])
    except BaseException:
        if folder is not None:
            folder.release(remove=True)
        raise
    overrides = invocation.overrides() if cfg["resume"] is not None else None
    return Prepared(cfg, resume_state, datasets, folder, overrides)


def _interrupted(folder: RunFolder | None) -> str:
    """The message after Ctrl-C: how to continue, when there is something to continue."""
    if folder is None:
        return "interrupted before training started; nothing was written"
    if (folder.path / "checkpoints" / "last.pt").is_file():
        return f"interrupted; continue with: python -m jem_ext.train --resume {folder.path}"
    return "interrupted before the first checkpoint; nothing to resume"


def _summary_line(summary: dict[str, Any]) -> str:
    best = summary["best_val_accuracy"]
    best_text = "none" if best is None else f"{best:.4f}"
    stopped = f"stopped early, {summary['stop_reason']}; " if summary.get("stop_reason") else ""
    if summary.get("energy_split_at") is not None:
        stopped += (
            f"energies split from iteration {summary['energy_split_at']} (the chains lost "
            "the data, see metrics.jsonl); "
        )
    return (
        f"{summary['dataset']}/{summary['objective']}: test accuracy "
        f"{summary['test_accuracy']:.4f}, val accuracy {summary['val_accuracy']:.4f} "
        f"(best {best_text}), {summary['iterations']} iterations in "
        f"{summary['seconds']:.1f} s, {summary['recoveries']} recoveries; {stopped}"
        f"run folder {summary['run_dir']}"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 diverged or a distributed
    job lost a process, 2 bad input)."""
    prepared = None
    try:
        prepared = prepare(argv)
        job = distributed.current()
        if job.parallel:
            distributed.print_main(distributed.describe(job, prepared.cfg), job)
        summary = train(
            prepared.cfg,
            resume_state=prepared.resume_state,
            datasets=prepared.datasets,
            resume_overrides=prepared.overrides,
        )
    except (ConfigError, jdata.DataError, CheckpointError, distributed.LaunchError) as err:
        # before training starts (a resume state that does not fit: nothing written yet)
        _release(prepared, keep_run=False)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        _release(prepared, keep_run=True)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        _release(prepared, keep_run=True)
        job = distributed.current()
        if not distributed.is_communication_failure(err, job):
            raise
        print(
            distributed.fail_message(err, job, prepared.cfg["dist_timeout"] if prepared else 0),
            file=sys.stderr,
        )
        distributed.abandon(1)
    except KeyboardInterrupt:
        if prepared is not None and prepared.folder is None:
            return 130  # rank 0 of the job says how to continue
        message = _interrupted(prepared.folder if prepared else None)
        _release(prepared, keep_run=message.startswith("interrupted; continue"))
        print(f"\n{message}", file=sys.stderr)
        return 130
    except BaseException:
        _release(prepared, keep_run=True)
        raise
    finally:
        distributed.shutdown()
    _release(prepared, keep_run=True)
    if prepared.folder is not None:  # the process that holds the run folder
        print(_summary_line(summary))
    return 0


def _release(prepared: Prepared | None, keep_run: bool) -> None:
    if prepared is not None and prepared.folder is not None:
        prepared.folder.release(remove=not keep_run)
