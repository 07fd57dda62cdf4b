"""The trainer's configuration as it arrives: command-line flags and config files.

The settings themselves (names, types, defaults, ranges, help, groups) and their validation
live in :mod:`.options` and :mod:`.runconfig`; this module merges their sources into one flat
dict, validates it once and hands on a :class:`~.runconfig.RunConfig`. ``config.json`` in a run
folder is that flat dict, keyed by the flags' ``dest`` names (``batch_size`` for
``--batch-size``). Precedence: flags given explicitly > ``--config`` file (or the resumed run's
``config.json``) > defaults.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError
from ..data import DataError, ImageData, data_fingerprint, fingerprint_changes
from ..factory import is_factory
from ..models import MODELS
from ..settings import value_problem
from .runconfig import (
    IDENTITY_KEYS,
    ConfigError,
    RunConfig,
    all_specs,
    build_parser,
    default_config,
    flag_of,
    validate,
    with_recipe,
)

__all__ = [
    "ADDED_KEYS",
    "INVOCATION_KEYS",
    "ConfigError",
    "Invocation",
    "RunConfig",
    "build_parser",
    "check_identity",
    "config_from_args",
    "config_from_mapping",
    "default_config",
    "flag_of",
    "parse_command_line",
    "read_config_file",
    "validate",
    "with_recipe",
]

# Keys of config.json that describe the invocation, not the experiment: ignored by --config
# and --resume. (The thread count is part of the experiment: results depend on it.)
INVOCATION_KEYS = ("out", "config", "resume", "no_progress")
# Keys config.json records about the launch (world size, batches): not flags, dropped on read.
LAUNCH_KEYS = ("world_size", "global_batch_size", "batch_size_per_process")
# Keys older config.json files may hold that no longer mean anything: read and dropped.
RETIRED_KEYS = ("debug_inject_nan_at",)
# Keys added after config files were first written, with the value that repeats what such a
# file meant: a run from before these flags kept its p(x) weight constant, used Adam's usual
# second-moment decay and started every chain from its --init.
ADDED_KEYS: dict[str, Any] = {
    "w_px_decay_epochs": [],
    "adam_beta2": 0.999,
    "init_noise_frac": 0.0,
    "tensorboard": False,
}
# The settings that shape the built-in models, refused when given with a model factory.
BUILTIN_MODEL_KEYS = ("width", "depth", "norm", "dropout")
# ``run_id`` names the run (every checkpoint carries it in its config), ``data_fingerprint``
# the data it trains on (see jem_ext.data.data_fingerprint): the IDENTITY_KEYS of config.json,
# not flags. A resume keeps and checks them; --config drops them (a new run gets its own).
# Files written before they existed lack them: identity unknown.


def config_from_args(argv: list[str] | None) -> RunConfig:
    """Build the run config from command-line arguments (see :func:`parse_command_line`)."""
    return parse_command_line(argv).cfg


def config_from_mapping(cfg: Mapping[str, Any]) -> RunConfig:
    """The run config of a partial flat dict (library use, e.g. ``train({"epochs": 1})``):
    missing keys take their recipe's values (``cfg["recipe"]``) or their defaults."""
    return validate({**default_config(), **cfg}, given=set(cfg))


@dataclass
class Invocation:
    """A parsed command line: the config, and the keys the command line set explicitly."""

    cfg: RunConfig
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
    recorded = loaded if args.resume is not None else {}  # a file may lack its identity
    cfg["run_id"] = recorded.get("run_id") or new_run_id()
    cfg["data_fingerprint"] = recorded.get("data_fingerprint")
    run_cfg = validate(cfg, where, given=set(explicit))
    _check_factory_flags(run_cfg.model.name, explicit)
    return Invocation(run_cfg, explicit)


def _check_factory_flags(model: str, explicit: Mapping[str, Any]) -> None:
    """``--width/--depth/--norm/--dropout`` shape the built-in models: refused with a factory."""
    given = [k for k in BUILTIN_MODEL_KEYS if k in explicit]
    if given and is_factory(model):
        raise ConfigError(
            f"{flag_of(given[0])}: shapes the built-in models ({', '.join(MODELS)}), not the "
            f"model of the factory {model}; leave it out"
        )


def new_run_id() -> str:
    """A fresh run identity (random, 32 hex digits)."""
    return uuid.uuid4().hex


def check_identity(
    cfg: RunConfig, datasets: dict[str, ImageData], resume_state: dict[str, Any] | None
) -> RunConfig:
    """``cfg`` with the data's fingerprint recorded; on a resume first check that the
    checkpoint belongs to this run and that the data are those the run was trained on.

    A config.json or checkpoint without an identity (written before runs recorded one) is
    not refused: what it lacks is unknown, and is recorded from now on.

    Raises:
        CheckpointError: the checkpoint carries another run's identity.
        DataError: the data differ from the recorded fingerprint, or no longer fit the
            checkpoint's model (another number of classes or sample shape).
    """
    current = data_fingerprint(datasets)
    run_id = cfg.run_id
    if resume_state is not None:
        where = f"--resume {cfg.folder.out}"
        saved = resume_state.get("config")  # the checkpoint's record: any version's keys
        saved = saved if isinstance(saved, dict) else {}
        ckpt_id = saved.get("run_id")
        if run_id and ckpt_id and ckpt_id != run_id:
            raise CheckpointError(
                f"{where}: checkpoints/last.pt belongs to another run (its run_id is {ckpt_id}, "
                f"config.json's is {run_id}; objective {saved.get('objective')!r}, "
                f"dataset {saved.get('dataset')!r}); put this run's checkpoint back"
            )
        recorded = cfg.data_fingerprint or saved.get("data_fingerprint")
        changes = fingerprint_changes(recorded, current)
        changes = changes or _model_changes(resume_state, datasets["train"])
        if changes:
            raise DataError(
                f"{where}: the data differ from those the run was trained on "
                f"({'; '.join(changes)}); restore them, or train a new run"
            )
        if ckpt_id and not run_id:
            run_id = ckpt_id
    return cfg.replace(run_id=run_id, data_fingerprint=current)


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
    settings = all_specs()
    unknown = sorted(set(loaded) - set(settings))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown keys {unknown} (expected a jem_ext.train config.json)"
        )
    for key, value in loaded.items():  # every key, also those the merge then ignores
        problem = value_problem(settings[key], value, types_only=True)
        if problem is not None:
            raise ConfigError(f"config file {path}: key {key!r}: {problem}")
    return {**loaded, **identity}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")
