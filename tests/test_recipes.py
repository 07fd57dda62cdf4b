"""Recipes: complete, valid for the trainer, with sources; apply_recipe lets explicit flags win."""

from __future__ import annotations

import copy

import pytest

from jem_ext import train
from jem_ext.recipes import RECIPES, Setting, apply_recipe, recipe_values
from jem_ext.training.config import ConfigError, validate
from jem_ext.training.runconfig import check_recipes


def _full_config() -> dict:
    return train.default_config()


def test_the_three_published_recipes_exist():
    assert set(RECIPES) == {"jem", "jempp", "sadajem"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_setting_names_a_source(name):
    for key, setting in RECIPES[name].items():
        assert isinstance(setting, Setting), key
        assert setting.source.strip(), f"{name}.{key} has no source"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_set_the_same_keys_and_only_config_keys(name):
    keys = set(RECIPES[name])
    assert keys == set(RECIPES["jem"]), "every recipe must set every key another one sets"
    assert keys <= set(_full_config()), sorted(keys - set(_full_config()))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_values_pass_the_trainers_validation(name):
    cfg = apply_recipe(_full_config(), name, explicit=set())
    defaults = train.default_config()
    for key, value in recipe_values(name).items():
        default = defaults.get(key)
        if default is None or value is None:
            continue
        want = float if isinstance(default, float) else type(default)
        assert isinstance(value, want) and not (isinstance(value, bool) and want is not bool), (
            f"{name}.{key}: {value!r} is not a {want.__name__}"
        )
    trainer_cfg = {k: v for k, v in cfg.items() if k in defaults}
    assert trainer_cfg == cfg, "a recipe sets keys the trainer does not have"
    validate(trainer_cfg)  # raises ConfigError on a bad value


def test_published_values_are_pinned():
    jem, jempp, sada = (recipe_values(n) for n in ("jem", "jempp", "sadajem"))
    assert (jem["optimizer"], jem["lr"], jem["sgld_steps"], jem["sgld_noise"]) == (
        "adam",
        1e-4,
        20,
        0.01,
    )
    assert (jem["buffer_size"], jem["reinit_prob"], jem["norm"]) == (10000, 0.05, "none")
    assert (jempp["init"], jempp["proximal"], jempp["norm"], jempp["optimizer"]) == (
        "gaussian",
        True,
        "batch",
        "sgd",
    )
    assert (sada["sam_rho"], sada["sam_adaptive"], sada["sgld_steps"], sada["sgld_noise"]) == (
        2.0,
        True,
        5,
        0.0,
    )
    assert sada["px_augment"] is False and jem["px_augment"] is True


def test_apply_recipe_overrides_defaults_but_not_explicit_flags():
    cfg = _full_config()
    cfg.update(lr=0.5, model="small_cnn", sgld_steps=3)
    before = copy.deepcopy(cfg)
    out = apply_recipe(cfg, "sadajem", explicit={"model", "lr"})
    assert cfg == before, "apply_recipe must not modify its input"
    assert out["model"] == "small_cnn" and out["lr"] == 0.5  # explicit: kept
    assert out["sgld_steps"] == 5 and out["sam_rho"] == 2.0  # recipe: applied
    assert out["dataset"] == cfg["dataset"]  # keys outside the recipe: untouched


def test_shorter_epochs_scale_the_decay_epochs():
    cfg = {**_full_config(), "epochs": 20}
    out = apply_recipe(cfg, "jem", explicit={"epochs"})
    assert out["epochs"] == 20 and out["decay_epochs"] == [16, 18]
    out = apply_recipe(cfg, "jempp", explicit={"epochs"})
    assert out["decay_epochs"] == [7, 13, 17]
    out = apply_recipe({**cfg, "epochs": 1}, "jem", explicit={"epochs"})
    assert out["decay_epochs"] == [1, 1]


def test_explicit_decay_epochs_are_not_rescaled():
    cfg = {**_full_config(), "epochs": 20, "decay_epochs": [5]}
    out = apply_recipe(cfg, "jem", explicit={"epochs", "decay_epochs"})
    assert out["decay_epochs"] == [5]
    out = apply_recipe(cfg, "jem", explicit=set())
    assert (out["epochs"], out["decay_epochs"]) == (200, [160, 180])


def test_recipe_values_are_fresh_copies():
    values = recipe_values("jem")
    values["decay_epochs"].append(1)
    assert recipe_values("jem")["decay_epochs"] == [160, 180]


def test_unknown_recipe_and_missing_keys_are_reported():
    with pytest.raises(KeyError, match="expected one of jem, jempp, sadajem"):
        apply_recipe(_full_config(), "vera", explicit=set())
    cfg = _full_config()
    del cfg["sam_rho"]
    with pytest.raises(KeyError, match="sam_rho"):
        apply_recipe(cfg, "sadajem", explicit=set())


def _docs_table() -> dict[str, list[str]]:
    """Rows of the module docstring's table: key -> the three recipe cells."""
    import re

    import jem_ext.recipes as mod

    rows = {}
    for line in mod.__doc__.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 4 and not line.startswith("="):
            rows[cells[0]] = cells[1:]
    return rows


def test_docs_table_agrees_with_the_data():
    table = _docs_table()
    names = ("jem", "jempp", "sadajem")
    checked = 0
    for key, cells in table.items():
        if key not in RECIPES["jem"]:
            continue  # rows that combine several keys are prose
        for name, cell in zip(names, cells):
            value = recipe_values(name)[key]
            if isinstance(value, list):
                assert cell == ", ".join(map(str, value)), (name, key)
            elif isinstance(value, bool):
                assert cell == ("yes" if value else "no"), (name, key, cell)
            elif isinstance(value, (int, float)):
                assert float(cell) == value, (name, key, cell)
            else:
                assert cell.startswith(str(value)), (name, key, cell)
            checked += 1
    assert checked >= 30


def test_every_published_recipe_passes_the_settings_checks():
    check_recipes(RECIPES)  # the trainer runs it when it loads; a bad recipe raises


def test_a_mistyped_recipe_key_is_refused():
    with pytest.raises(ConfigError, match="recipe 'mine': key 'sgld_stpes' is not a setting"):
        check_recipes({"mine": {**RECIPES["jem"], "sgld_stpes": Setting(5, "a typo")}})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("sgld_noise", -1.0, r"key 'sgld_noise': expected a value >= 0, got -1.0"),
        ("epochs", 2.5, r"key 'epochs': expected an integer, got 2.5"),
        ("init", "laplace", r"key 'init': expected one of .*, got 'laplace'"),
        ("model", "no_such_net", r"key 'model': expected one of .*got 'no_such_net'"),
    ],
)
def test_a_recipe_value_is_checked_as_a_command_line_value(key, value, message):
    with pytest.raises(ConfigError, match=r"recipe 'mine': " + message):
        check_recipes({"mine": {key: Setting(value, "a bad value")}})


def test_a_combination_the_recipe_makes_names_the_recipe():
    # sadajem's SAM and float16 gradient scaling do not go together: the message says where
    # sam_rho came from
    with pytest.raises(ConfigError, match=r"^--recipe sadajem: key 'sam_rho': SAM takes two"):
        train.config_from_args(["--recipe", "sadajem", "--precision", "fp16"])
    with pytest.raises(ConfigError, match=r"^--sam-rho: SAM takes two"):
        train.config_from_args(["--sam-rho", "0.5", "--precision", "fp16"])
