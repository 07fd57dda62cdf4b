"""The trainer's configuration: command-line flags, config files and their validation.

A config is a plain dict keyed by the flags' ``dest`` names (``batch_size`` for
``--batch-size``); ``config.json`` in a run folder is that dict. Precedence: flags given
explicitly > ``--config`` file (or the resumed run's ``config.json``) > defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError
from ..data import (
    DataError,
    ImageData,
    data_fingerprint,
    dataset_entry,
    file_datasets,
    fingerprint_changes,
)
from ..factory import is_factory
from ..models import MODELS, convolutional_models
from ..recipes import apply_recipe
from .flags import (
    ConfigError,
    build_parser,
    default_config,
    finite_float,
    int_list,
    model_name,
)
from .tensorboard import missing_message as missing_tensorboard

# Keys of config.json that describe the invocation, not the experiment: ignored by --config
# and --resume. (The thread count is part of the experiment: results depend on it.)
INVOCATION_KEYS = ("out", "config", "resume", "no_progress")
# Keys config.json records about the launch (world size, batches): not flags, dropped on read.
LAUNCH_KEYS = ("world_size", "global_batch_size", "batch_size_per_process")
# Keys config.json records about the run's identity: not flags. ``run_id`` names the run (every
# checkpoint carries it in its config), ``data_fingerprint`` the data it trains on (see
# jem_ext.data.data_fingerprint). A resume keeps and checks them; --config drops them (a new
# run gets its own). Files written before they existed lack them: identity unknown.
IDENTITY_KEYS = ("run_id", "data_fingerprint")
# Keys holding paths: stored absolute, so that the run folder can be used from anywhere.
PATH_KEYS = ("data_root", "out", "config", "resume")
# Keys older config.json files may hold that no longer mean anything: read and dropped.
RETIRED_KEYS = ("debug_inject_nan_at",)
# Keys added after config files were first written, with the value that repeats what such a
# file meant: a run from before these flags kept its p(x) weight constant and used Adam's
# usual second-moment decay.
ADDED_KEYS: dict[str, Any] = {"w_px_decay_epochs": [], "adam_beta2": 0.999, "tensorboard": False}
# The flags that shape the built-in models, refused when given with a model factory.
BUILTIN_MODEL_KEYS = ("width", "depth", "norm", "dropout")


@dataclass(frozen=True)
class Range:
    """Accepted values of a numeric key: ``lo <= v <= hi`` (``<`` where open)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        return (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) and (
            self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        )

    def __str__(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts)


_POSITIVE, _NON_NEGATIVE = Range(1), Range(0)
_FRACTION = Range(0, 1)
# The accepted range of every numeric key. Upper bounds keep a run inside what one machine
# can hold (a replay buffer of more chains, a deeper MLP, more threads fail late and unclearly).
RANGES: dict[str, Range] = {
    "batch_size": _POSITIVE,
    "epochs": _POSITIVE,
    "log_every": _POSITIVE,
    "eval_every": _POSITIVE,
    "labels_per_class": _POSITIVE,
    "width": Range(1, 2**16),
    "depth": Range(1, 1000),
    "sgld_steps": Range(0, 10**6),
    "buffer_size": Range(0, 10**7),
    "threads": Range(0, 1024),
    "seed": Range(0, 2**62),
    "warmup_iters": _NON_NEGATIVE,
    "ckpt_every": _NON_NEGATIVE,
    "sample_every": _NON_NEGATIVE,
    "max_recoveries": _NON_NEGATIVE,
    "decay_epochs": _NON_NEGATIVE,
    "w_px_decay_epochs": _NON_NEGATIVE,
    "lr": Range(0, lo_open=True),
    "adam_beta2": Range(0, 1, hi_open=True),
    "dropout": Range(0, 1, hi_open=True),
    "w_px": _NON_NEGATIVE,
    "w_pyx": _NON_NEGATIVE,
    "l2_energy": _NON_NEGATIVE,
    "sgld_step_size": _NON_NEGATIVE,
    "sgld_noise": _NON_NEGATIVE,
    "reinit_prob": _FRACTION,
    "grad_clip": Range(0, lo_open=True),
    "decay_rate": Range(0, lo_open=True),
    "w_px_decay_rate": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "divergence_threshold": Range(0, lo_open=True),
    "recover_lr_factor": Range(0, 1, lo_open=True),
    "dist_timeout": Range(0, lo_open=True),
    "sam_rho": _NON_NEGATIVE,
    "input_noise": _NON_NEGATIVE,
    "max_minutes": Range(0, lo_open=True),
    "max_iters": _POSITIVE,
}


def _actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in build_parser()._actions if a.dest != "help"}


def flag_of(key: str) -> str:
    """The command-line flag of a config key (``batch_size`` -> ``--batch-size``)."""
    action = _actions().get(key)
    return action.option_strings[0] if action is not None else key


def _type_error(action: argparse.Action, value: Any) -> str | None:
    """Why ``value`` is not of the flag's type, or None when it is."""
    if value is None:
        return None if action.default is None else "expected a value, got null"
    if action.choices is not None:
        ok = value in action.choices or (action.dest == "norm" and value is None)
        return None if ok else f"expected one of {', '.join(action.choices)}, got {value!r}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if action.type is model_name:
        if not isinstance(value, str):
            return f"expected a string, got {value!r}"
        try:
            model_name(value)
        except argparse.ArgumentTypeError as err:
            return str(err)
        return None
    if action.type is int_list:
        ok = isinstance(value, list) and all(_is_int(v) for v in value)
        return None if ok else f"expected a list of integers, got {value!r}"
    if action.type is int:
        return None if _is_int(value) else f"expected an integer, got {value!r}"
    if action.type is finite_float:
        if not (_is_int(value) or isinstance(value, float)):
            return f"expected a number, got {value!r}"
        return None if math.isfinite(value) else f"expected a finite number, got {value!r}"
    return None if isinstance(value, str) else f"expected a string, got {value!r}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _range_error(key: str, value: Any) -> str | None:
    rng = RANGES.get(key)
    if rng is None or value is None:
        return None
    for v in value if isinstance(value, list) else [value]:
        if not rng.contains(v):
            return (
                f"expected {'values ' if isinstance(value, list) else 'a value '}{rng}, "
                f"got {value!r}"
            )
    return None


def validate(cfg: dict[str, Any], where: dict[str, str] | None = None) -> None:
    """Check every config value against its flag's type and range, and their combinations.

    Args:
        cfg: the config.
        where: how to name each key in messages (e.g. ``--epochs`` for a flag the user typed,
            ``config file F: key 'epochs'`` for a value read from a file); default: the key.

    Raises:
        ConfigError: one clear message naming the first bad value.
    """
    where = where or {}
    actions = _actions()
    for key, action in actions.items():
        if key not in cfg:
            raise ConfigError(f"{key}: missing from the config")
        problem = _type_error(action, cfg[key]) or _range_error(key, cfg[key])
        if problem is not None:
            raise ConfigError(f"{where.get(key, key)}: {problem}")
    _validate_combinations(cfg, lambda k: where.get(k, k))


def _validate_combinations(cfg: dict[str, Any], name: Any) -> None:
    if cfg["objective"] != "ce" and cfg["sgld_steps"] < 1:
        raise ConfigError(
            f"{name('sgld_steps')}: expected >= 1 for the jem and factored objectives"
        )
    # a factory's model is checked once it is built (jem_ext.training.cli), not here
    model = None if is_factory(cfg["model"]) else MODELS[cfg["model"]]
    if model is not None and dataset_entry(cfg["dataset"]).toy and model.needs_images:
        flat = " or ".join(k for k, e in MODELS.items() if not e.needs_images)
        raise ConfigError(
            f"{name('model')}: {cfg['model']} needs images; the 2-D set "
            f"{cfg['dataset']} needs --model {flat}"
        )
    if cfg["data_root"] is not None and not dataset_entry(cfg["dataset"]).reads_files:
        raise ConfigError(
            f"{name('data_root')}: the {cfg['dataset']} dataset reads no files "
            f"(only {', '.join(file_datasets())} do); leave it out"
        )
    if cfg["channels_last"] and model is not None and not model.convolutional:
        raise ConfigError(
            f"{name('channels_last')}: expected a convolutional model "
            f"({', '.join(convolutional_models())}), got {cfg['model']}"
        )
    if cfg["sam_rho"] > 0 and cfg["precision"] == "fp16":
        raise ConfigError(
            f"{name('sam_rho')}: SAM takes two gradients per update, which "
            "float16 gradient scaling does not support; use --precision bf16"
        )
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{name('device')}: cuda requested but no CUDA device is available")
    if cfg["tensorboard"]:
        missing = missing_tensorboard(name("tensorboard"))
        if missing is not None:
            raise ConfigError(missing)


def _check_factory_flags(cfg: dict[str, Any], explicit: dict[str, Any]) -> None:
    """``--width/--depth/--norm/--dropout`` shape the built-in models: refused with a factory."""
    if not is_factory(cfg["model"]):
        return
    given = [k for k in BUILTIN_MODEL_KEYS if k in explicit]
    if given:
        raise ConfigError(
            f"{flag_of(given[0])}: shapes the built-in models ({', '.join(MODELS)}), not the "
            f"model of the factory {cfg['model']}; leave it out"
        )


def config_from_args(argv: list[str] | None) -> dict[str, Any]:
    """Build the run config from command-line arguments (see :func:`parse_command_line`)."""
    return parse_command_line(argv).cfg


@dataclass
class Invocation:
    """A parsed command line: the config, and the keys the command line set explicitly."""

    cfg: dict[str, Any]
    explicit: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        """The experiment keys set on the command line (what a resume changes)."""
        return {k: v for k, v in self.explicit.items() if k not in INVOCATION_KEYS}


def parse_command_line(argv: list[str] | None) -> Invocation:
    """Parse flags and merge ``--config`` (or the resumed run's ``config.json``) under them.

    Order of precedence: flags given explicitly > config file > defaults.

    Raises:
        ConfigError: bad flags, an unreadable or malformed config file, or invalid values.
    """
    args = build_parser().parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    where = {k: flag_of(k) for k in explicit}
    if args.resume is not None:
        _check_resume_flags(args, explicit)
        base_file: Path | None = Path(args.resume) / "config.json"
    else:
        base_file = None if args.config is None else Path(args.config)
    cfg = vars(args)
    if base_file is not None:
        loaded = read_config_file(base_file)
        cfg = default_config()
        cfg.update({k: v for k, v in ADDED_KEYS.items() if k not in loaded})
        cfg.update({k: v for k, v in loaded.items() if k not in INVOCATION_KEYS})
        cfg.update(explicit)
        cfg["resume"], cfg["config"] = args.resume, args.config
        if args.resume is not None:
            cfg["out"] = str(Path(args.resume))
        for key in loaded:
            where.setdefault(key, f"config file {base_file}: key {key!r}")
    cfg = with_recipe(cfg, set(explicit))
    validate(cfg, where)
    _check_factory_flags(cfg, explicit)
    absolute_paths(cfg)
    recorded = loaded if args.resume is not None else {}
    cfg["run_id"] = recorded.get("run_id") or new_run_id()
    cfg["data_fingerprint"] = recorded.get("data_fingerprint")
    return Invocation(cfg, explicit)


def absolute_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """Make the config's paths (:data:`PATH_KEYS`) absolute, in place (and return ``cfg``):
    a run folder, its checkpoints and reports then work from any directory."""
    for key in PATH_KEYS:
        if cfg.get(key) is not None:
            cfg[key] = os.path.abspath(os.path.expanduser(cfg[key]))
    return cfg


def new_run_id() -> str:
    """A fresh run identity (random, 32 hex digits)."""
    return uuid.uuid4().hex


def check_identity(
    cfg: dict[str, Any], datasets: dict[str, ImageData], resume_state: dict[str, Any] | None
) -> None:
    """Record the data's fingerprint in ``cfg``; on a resume first check that the checkpoint
    belongs to this run and that the data are those the run was trained on.

    A config.json or checkpoint without an identity (written before runs recorded one) is
    not refused: what it lacks is unknown, and is recorded from now on.

    Raises:
        CheckpointError: the checkpoint carries another run's identity.
        DataError: the data differ from the recorded fingerprint, or no longer fit the
            checkpoint's model (another number of classes or sample shape).
    """
    current = data_fingerprint(datasets)
    if resume_state is not None:
        where = f"--resume {cfg['out']}"
        saved = resume_state.get("config")
        saved = saved if isinstance(saved, dict) else {}
        ckpt_id = saved.get("run_id")
        if cfg.get("run_id") and ckpt_id and ckpt_id != cfg["run_id"]:
            raise CheckpointError(
                f"{where}: checkpoints/last.pt belongs to another run (its run_id is {ckpt_id}, "
                f"config.json's is {cfg['run_id']}; objective {saved.get('objective')!r}, "
                f"dataset {saved.get('dataset')!r}); put this run's checkpoint back"
            )
        recorded = cfg.get("data_fingerprint") or saved.get("data_fingerprint")
        changes = fingerprint_changes(recorded, current)
        changes = changes or _model_changes(resume_state, datasets["train"])
        if changes:
            raise DataError(
                f"{where}: the data differ from those the run was trained on "
                f"({'; '.join(changes)}); restore them, or train a new run"
            )
        if ckpt_id and not cfg.get("run_id"):
            cfg["run_id"] = ckpt_id
    cfg["data_fingerprint"] = current


def _model_changes(state: dict[str, Any], train: ImageData) -> list[str]:
    """What a checkpoint's model says about its data that the data no longer match."""
    spec = state.get("model_spec")
    if not isinstance(spec, dict):
        return []
    changes = []
    if isinstance(spec.get("num_classes"), int) and spec["num_classes"] != train.num_classes:
        changes.append(
            f"the data now has {train.num_classes} classes, the checkpoint's model "
            f"{spec['num_classes']}"
        )
    if isinstance(spec.get("in_shape"), list) and tuple(spec["in_shape"]) != train.shape:
        changes.append(
            f"samples now have shape {train.shape}, the checkpoint's model takes "
            f"{tuple(spec['in_shape'])}"
        )
    return changes


def with_recipe(cfg: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """``cfg`` with its recipe written over it when ``recipe`` is among the keys ``given``.

    The keys in ``given`` (set explicitly by the user) keep their values. A recipe read from a
    config file is not applied again: the file already holds the values it set, and the
    flags the original run overrode.
    """
    if "recipe" not in given or cfg.get("recipe") is None:
        return cfg
    return apply_recipe(cfg, cfg["recipe"], given)


def _check_resume_flags(args: argparse.Namespace, explicit: dict[str, Any]) -> None:
    """``--resume`` continues a run in its own folder with its own config."""
    run = Path(args.resume)
    if not run.is_dir():
        raise ConfigError(f"--resume {args.resume}: no such run folder")
    if "out" in explicit and Path(args.out).resolve() != run.resolve():
        raise ConfigError(
            "--out: cannot be combined with --resume (a resumed run continues in its own folder)"
        )
    if "config" in explicit:
        raise ConfigError(
            "--config: cannot be combined with --resume (a resumed run "
            "continues with its own config.json; give flags to override it)"
        )


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a ``config.json``: a JSON object of known keys (values are checked by validate)."""
    if path.is_dir():
        raise ConfigError(f"config file {path}: is a directory (expected a config.json file)")
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    try:
        with path.open(encoding="utf-8") as f:
            loaded = json.load(f, parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"config file {path}: not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {path}: expected a JSON object, got {type(loaded).__name__}"
        )
    loaded = {k: v for k, v in loaded.items() if k not in RETIRED_KEYS + LAUNCH_KEYS}
    identity = {k: loaded.pop(k) for k in IDENTITY_KEYS if k in loaded}
    if not isinstance(identity.get("run_id", ""), str):
        raise ConfigError(f"config file {path}: key 'run_id': expected a string")
    if not isinstance(identity.get("data_fingerprint", {}), (dict, type(None))):
        raise ConfigError(f"config file {path}: key 'data_fingerprint': expected an object")
    actions = _actions()
    unknown = sorted(set(loaded) - set(actions))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown keys {unknown} (expected a jem_ext.train config.json)"
        )
    for key, value in loaded.items():  # every key, also those the merge then ignores
        problem = _type_error(actions[key], value)
        if problem is not None:
            raise ConfigError(f"config file {path}: key {key!r}: {problem}")
    return {**loaded, **identity}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")
