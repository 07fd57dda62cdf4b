"""The run configuration, typed: :class:`RunConfig`, one frozen group per ``--help`` section.

Each group (:mod:`.options`, and :class:`jem_ext.accel.SpeedOptions` for the speed flags that
the evaluation shares) owns its settings' names, types, defaults, ranges, help texts and flags.
From them: the parser (:func:`build_parser`), the defaults (:func:`default_config`), the flat
dict of ``config.json`` (:meth:`RunConfig.flat`, keys are the flags' ``dest`` names, so run
folders of every version keep loading) and validation (:func:`validate`, the one way to make a
``RunConfig``: a ``RunConfig`` is always valid). Code reads attributes: ``cfg.chain.steps``.

The published recipes (:mod:`jem_ext.recipes`) are read against the same settings when this
module loads: each key a recipe sets must be a setting, and each value passes the setting's
checks, as a value typed on the command line would (:func:`check_recipes`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._cli import DefaultsHelpFormatter, RaisingParser
from ..accel import SpeedOptions
from ..data import dataset_entry, file_datasets
from ..factory import is_factory
from ..models import MODELS, convolutional_models
from ..recipes import RECIPES, Setting, apply_recipe
from ..settings import Spec, add_flags, flat_values, group_from_flat, specs, value_problem
from .options import (
    BudgetOptions,
    ChainOptions,
    DataOptions,
    DistOptions,
    FolderOptions,
    GuardOptions,
    ModelOptions,
    ObjectiveOptions,
    OptimOptions,
    RecipeOptions,
)
from .tensorboard import missing_message as missing_tensorboard

IDENTITY_KEYS = ("run_id", "data_fingerprint")


class ConfigError(ValueError):
    """A config value or config file is invalid."""


class _Parser(RaisingParser):
    """An argument parser whose errors are a :class:`ConfigError` (one line, exit status 2)."""

    error_type = ConfigError


@dataclass(frozen=True)
class RunConfig:
    """A validated trainer configuration (see the module docstring); build it with
    :func:`validate`, change it with :meth:`replace`.

    Attributes:
        run_id: the run's identity (config.json and every checkpoint carry it).
        data_fingerprint: the data the run trains on (:func:`jem_ext.data.data_fingerprint`),
            None until the data are loaded or when a run from before fingerprints is resumed.
    """

    recipe: RecipeOptions
    data: DataOptions
    model: ModelOptions
    objective: ObjectiveOptions
    chain: ChainOptions
    optim: OptimOptions
    folder: FolderOptions
    budget: BudgetOptions
    guard: GuardOptions
    speed: SpeedOptions
    distributed: DistOptions
    run_id: str | None = None
    data_fingerprint: dict[str, Any] | None = None

    def flat(self) -> dict[str, Any]:
        """The flat dict of config.json (and of every checkpoint's ``config``)."""
        out: dict[str, Any] = {}
        for f in _group_fields():
            out.update(flat_values(getattr(self, f.name)))
        out["run_id"] = self.run_id
        out["data_fingerprint"] = self.data_fingerprint
        return out

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with settings changed, named by their flat keys (``out=...``, ``run_id=...``);
        the values are taken as given (the trainer's own, already valid), paths made
        absolute."""
        flat = self.flat()
        unknown = sorted(set(changes) - set(flat))
        if unknown:
            raise KeyError(f"RunConfig.replace: unknown settings {unknown}")
        return _build({**flat, **changes})

    @property
    def generative(self) -> bool:
        """Whether the objective samples (jem, factored; not ce)."""
        return self.objective.name != "ce"

    @property
    def conditional(self) -> bool:
        """Whether the chains are class-conditional (the factored objective)."""
        return self.objective.name == "factored"


def _group_fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(RunConfig) if f.name not in IDENTITY_KEYS]


def groups() -> list[type]:
    """The group classes of :class:`RunConfig`, in ``--help`` order."""
    hints = typing.get_type_hints(RunConfig)
    return [hints[f.name] for f in _group_fields()]


def all_specs() -> dict[str, Spec]:
    """Every setting by its flat key (``dest``), in ``--help`` order."""
    return {s.dest: s for g in groups() for _, s in specs(g)}


def _build(flat: Mapping[str, Any]) -> RunConfig:
    """The RunConfig of a flat dict, its paths absolute: a run folder, its checkpoints and
    reports then work from any directory."""
    flat = dict(flat)
    for key, s in all_specs().items():
        if s.path and flat[key] is not None:
            flat[key] = os.path.abspath(os.path.expanduser(flat[key]))
    kw = {f.name: group_from_flat(g, flat) for f, g in zip(_group_fields(), groups())}
    return RunConfig(**kw, run_id=flat.get("run_id"), data_fingerprint=flat.get("data_fingerprint"))


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The argparse parser of ``python -m jem_ext.train``, generated from the groups.

    Args:
        suppress_defaults: leave unspecified flags out of the namespace (used to find which
            flags were given explicitly, so they can override ``--config``).
    """
    p = _Parser(
        prog="python -m jem_ext.train",
        description="Train a Joint Energy-based Model (JEM, Grathwohl et al. 2020) or its "
        "cross-entropy twin, writing a run folder with config, metrics, checkpoints, sample "
        "grids and a summary. Defaults train a JEM on the 8x8 digits on the CPU in minutes.",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        formatter_class=DefaultsHelpFormatter,
    )
    for g in groups():
        add_flags(p, g, suppress_defaults)
    return p


def default_config() -> dict[str, Any]:
    """Every setting's default, as the flat dict of config.json (without an identity)."""
    return {
        k: list(s.default) if isinstance(s.default, list) else s.default
        for k, s in all_specs().items()
    }


def flag_of(key: str) -> str:
    """The command-line flag of a config key (``batch_size`` -> ``--batch-size``)."""
    s = all_specs().get(key)
    return s.option_strings()[0] if s is not None else key


def validate(
    cfg: Mapping[str, Any],
    where: Mapping[str, str] | None = None,
    given: Collection[str] = (),
) -> RunConfig:
    """Check a flat config (every setting's type, range and own check), write its recipe over
    it when ``recipe`` is among the keys ``given`` (:func:`with_recipe`; the recipe's values
    were checked when this module loaded), check the combinations and return it typed, its
    paths absolute.

    Args:
        cfg: the flat config (every setting's key; ``run_id`` and ``data_fingerprint`` may be
            present).
        where: how to name each key in messages (e.g. ``--epochs`` for a flag the user typed,
            ``config file F: key 'epochs'`` for a value read from a file); default: the key.
            A key the recipe sets is named ``--recipe NAME: key 'KEY'``.
        given: the keys set explicitly (they keep their values over the recipe's).

    Raises:
        ConfigError: one clear message naming the first bad value.
    """
    where = dict(where or {})
    for key, s in all_specs().items():
        if key not in cfg:
            raise ConfigError(f"{key}: missing from the config")
        problem = value_problem(s, cfg[key])
        if problem is not None:
            raise ConfigError(f"{where.get(key, key)}: {problem}")
    recipe = cfg["recipe"] if "recipe" in given else None
    cfg = with_recipe(cfg, set(given))
    if recipe is not None:
        for key in set(RECIPES[recipe]) - set(given):
            where[key] = f"--recipe {recipe}: key {key!r}"
    check_combinations(cfg, lambda k: where.get(k, k))
    return _build(cfg)


def check_combinations(cfg: Mapping[str, Any], name: Callable[[str], str]) -> None:
    """The checks between settings (each value already valid on its own)."""
    if cfg["objective"] != "ce" and cfg["sgld_steps"] < 1:
        raise ConfigError(
            f"{name('sgld_steps')}: expected >= 1 for the jem and factored objectives"
        )
    # a factory's model is checked once it is built (jem_ext.training.model_checks), not here
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
    if cfg["init_noise_frac"] > 0 and cfg["init"] != "gaussian":
        raise ConfigError(
            f"{name('init_noise_frac')}: mixes uniform noise into --init gaussian's chains; "
            f"with --init {cfg['init']} leave it out"
        )
    if cfg["sam_rho"] > 0 and cfg["precision"] == "fp16":
        raise ConfigError(
            f"{name('sam_rho')}: SAM takes two gradients per update, which "
            "float16 gradient scaling does not support; use --precision bf16"
        )
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{name('device')}: cuda requested but no CUDA device is available")
    missing = missing_tensorboard(name("tensorboard")) if cfg["tensorboard"] else None
    if missing is not None:
        raise ConfigError(missing)


def with_recipe(cfg: Mapping[str, Any], given: set[str]) -> dict[str, Any]:
    """The flat ``cfg`` with its recipe written over it when ``recipe`` is among the keys
    ``given``.

    The keys in ``given`` (set explicitly by the user) keep their values. A recipe read from a
    config file is not applied again: the file already holds the values it set, and the
    flags the original run overrode.
    """
    if "recipe" not in given or cfg["recipe"] is None:
        return dict(cfg)
    return apply_recipe(cfg, cfg["recipe"], given)


def check_recipes(recipes: Mapping[str, Mapping[str, Setting]]) -> None:
    """Check recipes against the settings: every key a recipe sets is a setting, and every
    value passes the checks a command-line value of that setting passes.

    Raises:
        ConfigError: the first unknown key or bad value, naming the recipe.
    """
    settings = all_specs()
    for name, recipe in recipes.items():
        for key, entry in recipe.items():
            if key not in settings:
                raise ConfigError(
                    f"recipe {name!r}: key {key!r} is not a setting of python -m jem_ext.train"
                )
            problem = value_problem(settings[key], entry.value)
            if problem is not None:
                raise ConfigError(f"recipe {name!r}: key {key!r}: {problem}")


check_recipes(RECIPES)  # once, when the trainer loads: a mistyped recipe stops it here
