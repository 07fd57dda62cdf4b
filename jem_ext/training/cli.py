"""``python -m jem_ext.train``: check every input before writing anything, then train."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import data as jdata
from .. import factory as factories
from .._cli import (
    SIGTERM_STATUS,
    Terminated,
    check_threads,
    interrupt_status,
    terminate_as_interrupt,
    terminated,
)
from .._io import write_failure
from ..checkpoint import CheckpointError, load_checkpoint, weights_mismatch
from ..models import meta_model
from . import distributed
from .config import ConfigError, check_identity, parse_command_line
from .curves import write_curves
from .folder import RunFolder, RunFolderLost
from .guard import TrainingDiverged
from .model_checks import check_factory_model, check_factory_named, note_batch_norm
from .runconfig import RunConfig
from .saver import last_checkpoint
from .setup import fresh_out, load_data, model_kwargs
from .trainer import train

_TRAINING_KEYS = {"model": dict, "optimizer": dict, "rng": dict, "iteration": int, "epoch": int}


def _load_resume_state(run_dir: str) -> dict[str, Any]:
    ckpt = last_checkpoint(run_dir)
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
    cfg: RunConfig, datasets: dict[str, jdata.ImageData], resume_state: dict[str, Any] | None
) -> None:
    """Check the model flags (and a resumed checkpoint's weights) without allocating a model
    (a factory's model is built once, on the CPU, and run on a zero batch)."""
    train_d = datasets["train"]
    name = cfg.model.name
    if factories.is_factory(name):
        weights = None if resume_state is None else resume_state["model"]
        channels_last = cfg.speed.channels_last
        model = check_factory_model(
            name, train_d.num_classes, train_d.shape, channels_last, weights
        )
        note_batch_norm(model, name, cfg.generative)
        return
    spec = {
        "name": cfg.model.name,
        "num_classes": train_d.num_classes,
        "in_shape": list(train_d.shape),
        "kwargs": model_kwargs(cfg.model),
    }
    try:
        model = meta_model(spec)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    note_batch_norm(model, f"{name} --norm {cfg.model.norm}", cfg.generative)
    if resume_state is not None:
        diff = weights_mismatch(model, resume_state["model"])
        if diff is not None:
            raise CheckpointError(
                f"--resume: checkpoint does not match the config's model (first difference: {diff})"
            )


@dataclass
class Prepared:
    """A checked command line: config, resume state, loaded data and the claimed run folder."""

    cfg: RunConfig
    resume_state: dict[str, Any] | None
    datasets: dict[str, jdata.ImageData]
    folder: RunFolder | None  # None on the processes of a distributed job other than rank 0
    overrides: dict[str, Any] | None


def _claim(out: str, resuming: bool) -> RunFolder:
    """Claim the run folder now, so a second run with the same folder is refused at once."""
    return RunFolder.claim_existing(out) if resuming else RunFolder.claim_new(out)


def _claim_once(cfg: RunConfig, dist: distributed.Dist) -> tuple[RunConfig, RunFolder | None]:
    """Claim the run folder on rank 0 only; the other processes learn its path (or error).
    Returns the config with the folder's path, and the claim (None on the other ranks)."""
    folder = None

    def claim() -> str:
        nonlocal folder
        out = cfg.folder.out or fresh_out(cfg.data.dataset, cfg.objective.name)
        folder = _claim(out, resuming=cfg.folder.resume is not None)
        return out

    return cfg.replace(out=distributed.on_main(claim, dist)), folder


def _nothing_to_resume(run_dir: str) -> str:
    return (
        f"--resume {run_dir}: the run stopped before its first checkpoint (no "
        "checkpoints/last.pt), so there is nothing to resume; re-running its command with "
        f"--out {run_dir} starts it afresh"
    )


def _resume_target(argv: list[str]) -> str | None:
    """The value of ``--resume`` on a command line (None without one)."""
    for i, arg in enumerate(argv):
        if arg == "--resume" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--resume="):
            return arg.split("=", 1)[1]
    return None


def _parse(argv: list[str]) -> tuple[Any, bool]:
    """Parse the command line; in a job that torchrun restarted (``--max-restarts``), continue
    the run from its last checkpoint exactly as ``--resume`` would. Returns the invocation and
    whether it is such a restart.

    Raises:
        ConfigError: bad flags, or a job that torchrun may restart without an ``--out``.
    """
    target = _resume_target(argv)
    if target is not None and Path(target).is_dir():
        if not last_checkpoint(target).exists():
            raise ConfigError(_nothing_to_resume(target))
    invocation = parse_command_line(argv)
    cfg = invocation.cfg
    if cfg.folder.resume is not None:
        return invocation, False
    if cfg.folder.out is None and distributed.max_restarts() > 0:
        raise ConfigError(
            "--out: needed when torchrun may restart the job (--max-restarts "
            f"{distributed.max_restarts()}): the restarted processes resume from the run folder"
        )
    out = cfg.folder.out
    if distributed.restart_count() > 0 and last_checkpoint(out).is_file():
        return parse_command_line([*argv, "--resume", out]), True
    return invocation, False


def _check_threads(cfg: RunConfig, explicit: dict[str, Any]) -> None:
    refused = check_threads(cfg.optim.threads)
    if refused is None:
        return
    if "threads" in explicit:
        raise ConfigError(refused)
    folder = cfg.folder
    source = "the resumed run's config.json" if folder.resume else f"--config {folder.config}"
    raise ConfigError(f"{refused} ({source} sets it; give --threads to override)")


def prepare(argv: list[str] | None = None) -> Prepared:
    """Parse and check everything (config, data, checkpoint) before any file is written.

    Under torchrun the process joins the job right after the config is read (see
    :mod:`.distributed`). The run folder is claimed next (by rank 0) and given back (removed, if
    this claim created it) when a later check fails.

    Raises:
        ConfigError, DataError, CheckpointError, LaunchError.
    """
    invocation, restarted = _parse(list(sys.argv[1:] if argv is None else argv))
    cfg = invocation.cfg
    _check_threads(cfg, invocation.explicit)
    cfg, folder = _claim_once(cfg, distributed.init_from_env(cfg))
    try:
        resume = cfg.folder.resume
        resume_state = None if resume is None else _load_resume_state(resume)
        if resume_state is not None:
            spec = resume_state.get("model_spec") or {}
            given = invocation.explicit.get("model")
            check_factory_named(spec.get("name"), given, cfg.folder.out)
        if restarted and distributed.launch_rank() == 0:
            print(
                f"torchrun restarted the job (restart {distributed.restart_count()} of "
                f"{distributed.max_restarts()}): resuming {cfg.folder.out} from its last "
                f"checkpoint (iteration {resume_state['iteration']}), as --resume would",
                file=sys.stderr,
            )
        datasets = load_data(cfg.data, cfg.optim.seed)
        cfg = check_identity(cfg, datasets, resume_state)
        _check_model(cfg, datasets, resume_state)
        if cfg.data.labels_per_class is not None:
            labels = cfg.data.labels_per_class
            jdata.labeled_mask(datasets["train"].y, labels, seed=cfg.optim.seed)
    except BaseException:
        if folder is not None:
            folder.release(remove=True)
        raise
    overrides = invocation.overrides() if cfg.folder.resume is not None else None
    if overrides is not None and factories.is_factory(cfg.model.name):
        overrides.pop("model", None)  # the factory named again, as a resume must: no change
    return Prepared(cfg, resume_state, datasets, folder, overrides)


def _interrupted(folder: RunFolder | None, what: str = "interrupted") -> str:
    """The message after Ctrl-C or SIGTERM (``what``): how to continue, when there is something
    to continue."""
    if folder is None:
        return f"{what} before training started; nothing was written"
    command = _continue_command(folder)
    if command is not None:
        return f"{what}; continue with: {command}"
    return f"{what} before the first checkpoint; nothing to resume"


def _continue_command(folder: RunFolder | None) -> str | None:
    """The command that continues the run in ``folder``, or None when it has no checkpoint."""
    if folder is None or not last_checkpoint(folder.path).is_file():
        return None
    job = distributed.current()
    launch = (
        f"torchrun --nproc-per-node {job.world_size} -m jem_ext.train"
        if job.parallel
        else "python -m jem_ext.train"
    )
    return f"{launch} --resume {folder.path}"


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
    """Command-line entry point; returns the exit status: 0 ok; 1 diverged, a distributed job
    lost a process, the run folder was removed, or a file could not be written (no space, a
    read-only file system); 2 bad input (under torchrun printed by rank 0 only, every process
    exits 2); 130 after Ctrl-C and 143 after SIGTERM, which stops the run the same way (the
    write in progress is abandoned, the resume command printed)."""
    with terminate_as_interrupt():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    prepared = None
    try:
        prepared = prepare(argv)
        job = distributed.current()
        if job.parallel:
            batch = prepared.cfg.optim.batch_size
            distributed.print_main(distributed.describe(job, batch), job)
        summary = train(
            prepared.cfg,
            resume_state=prepared.resume_state,
            datasets=prepared.datasets,
            resume_overrides=prepared.overrides,
        )
    except (ConfigError, jdata.DataError, CheckpointError, distributed.LaunchError) as err:
        # before training starts (a resume state that does not fit: nothing written yet)
        _release(prepared, keep_run=False)
        if distributed.launch_rank() == 0:  # every process of a job meets the same error
            print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        _release(prepared, keep_run=True)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RunFolderLost as err:
        _release(prepared, keep_run=True)
        distributed.print_main(f"error: {err}", distributed.current())
        return 1
    except OSError as err:  # a write failed: rank 0 writes, so only rank 0 gets here
        _release(prepared, keep_run=True)
        print(f"error: {_write_failed(err, prepared)}", file=sys.stderr)
        if distributed.current().parallel:
            distributed.abandon(1)  # the others wait in a collective: end the job now
        return 1
    except RuntimeError as err:
        job = distributed.current()
        if terminated() and job.parallel:  # a collective broken by the job's SIGTERM
            return _stop(prepared, Terminated())
        _release(prepared, keep_run=True)
        if not distributed.is_communication_failure(err, job):
            raise
        print(
            distributed.fail_message(err, job, prepared.cfg.distributed.timeout if prepared else 0),
            file=sys.stderr,
        )
        distributed.abandon(1)
    except KeyboardInterrupt as err:
        return _stop(prepared, err)
    except BaseException:
        _release(prepared, keep_run=True)
        raise
    finally:
        if not terminated():
            distributed.shutdown()
    _release(prepared, keep_run=True)
    if prepared.folder is not None:  # the process that holds the run folder
        print(_summary_line(summary))
    return 0


def _stop(prepared: Prepared | None, err: BaseException) -> int:
    """Ctrl-C or SIGTERM: release the run folder (removed when nothing can be resumed from
    it), say how to continue, exit 130 or 143. A process of a job leaves at once: the others
    stop too (torchrun signals all of them), and a barrier could wait for one that is gone."""
    status = interrupt_status(err)
    job = distributed.current()
    what = "terminated (SIGTERM)" if status == SIGTERM_STATUS else "interrupted"
    folder = prepared.folder if prepared else None
    message = _interrupted(folder, what)
    keep = _continue_command(folder) is not None
    if keep:
        _draw_curves(folder, "interrupted" if status != SIGTERM_STATUS else "terminated")
    _release(prepared, keep_run=keep)
    if job.is_main and distributed.launch_rank() == 0:
        print(f"\n{message}", file=sys.stderr)
    if job.parallel:
        distributed.abandon(status)
    return status


def _draw_curves(folder: RunFolder, status: str) -> None:
    """curves.png of a stopped run (best effort: the stop goes on when it cannot be written)."""
    try:
        write_curves(folder.path, status)
    except (OSError, ValueError):
        pass


def _write_failed(err: OSError, prepared: Prepared | None) -> str:
    """The one line of a failed write, with how to continue when a checkpoint exists."""
    folder = prepared.folder if prepared else None
    line = write_failure(err, folder.path if folder is not None else None)
    command = _continue_command(folder)
    if command is not None:
        return f"{line}; the run stopped; once the disk is writable, continue with: {command}"
    return f"{line}; the run stopped"


def _release(prepared: Prepared | None, keep_run: bool) -> None:
    if prepared is not None and prepared.folder is not None:
        prepared.folder.release(remove=not keep_run)
