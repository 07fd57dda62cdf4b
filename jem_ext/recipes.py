"""Published JEM training recipes as data: every trainer setting with where it comes from.

``RECIPES[name][key]`` is a :class:`Setting` for the trainer config key ``key`` (the dest name
of a ``python -m jem_ext.train`` flag): its value, its source (paper section or the authors'
script and flag) and, where it matters, what to scale down for a small model or a CPU budget.
:func:`apply_recipe` writes a recipe into a config; flags given explicitly keep their values.
The trainer reads every recipe against its typed settings when it loads
(:func:`jem_ext.training.runconfig.check_recipes`): each key must be a setting and each value
must pass that setting's checks.

All three recipes are the authors' CIFAR-10 settings for a WRN-28-10 (36 M parameters). On a
CPU budget keep the recipe and override the size: ``--model small_cnn --width 64`` and fewer
``--epochs`` (the decay epochs then shrink in proportion, see :func:`apply_recipe`).

======================  ====================  ====================  ========================
key                     jem (JEM, 2020)       jempp (JEM++, 2021)   sadajem (SADA-JEM, 2023)
======================  ====================  ====================  ========================
model, depth, width     wrn 28-10             wrn 28-10             wrn 28-10
norm                    none                  batch                 batch
optimizer, lr           adam 1e-4             sgd 0.1 (mom. 0.9)    sgd 0.1 (mom. 0.9)
weight_decay            0                     4e-4                  5e-4
sam_rho, sam_adaptive   0 (off)               0 (off)               2.0, adaptive
warmup_iters            1000                  1000                  1000
epochs                  200                   150                   200
decay_epochs            160, 180              50, 100, 125          60, 120, 180
decay_rate              0.3                   0.2                   0.2
batch_size              64                    64                    64
input_noise             0.03                  0.03                  0
px_augment              yes                   yes                   no
sgld_steps              20                    10                    5
sgld_step_size          1                     1                     1
sgld_noise              0.01                  0                     0
proximal, grad_clip     no                    yes, 1                yes, 1
buffer_size             10000                 10000                 10000
reinit_prob             0.05                  0.05                  0.05
init                    uniform               gaussian per class    gaussian per class
l2_energy               0                     0                     0
======================  ====================  ====================  ========================

None of the three decays the p(x) weight (``w_px_decay_epochs`` empty); Adam's second-moment
decay is its usual 0.999 (``adam_beta2``, used by ``jem`` only).

Not carried over: JEM++'s YOPO inner steps (5 cheap steps on the first layer's Hamiltonian
inside each outer step; a speed device tied to the network's first layer), here replaced by
plain proximal steps; SADA-JEM's larger cross-entropy batch (128, against 64 for the p(x)
branch), here one batch of 64 serves both terms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .chain import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_N_STEPS,
    DEFAULT_NOISE_STD,
    DEFAULT_REINIT_PROB,
    DEFAULT_STEP_SIZE,
)

__all__ = ["RECIPES", "Setting", "apply_recipe", "recipe_values"]

_JEM = "wgrathwohl/JEM train_wrn_ebm.py"
_JEM_README = "wgrathwohl/JEM README training command"
_JEMPP = "sndnyang/JEMPP train_jempp.py"
_JEMPP_SH = "sndnyang/JEMPP scripts/jempp_cifar10.sh"
_SADA = "sndnyang/SADAJEM train_sadajem.py"
_SADA_SH = "sndnyang/SADAJEM scripts/sadajem_cifar10.sh"

_WRN_NOTE = "36 M parameters: on a CPU use --model small_cnn (--width 64 for CIFAR-sized images)"
_EPOCHS_NOTE = "scale down with the budget; decay epochs follow in proportion"
_BUFFER_NOTE = (
    "a buffer larger than the training set only keeps chains longer; small data sets can keep it"
)


@dataclass(frozen=True)
class Setting:
    """One recipe value with its provenance.

    Attributes:
        value: the config value.
        source: where the value comes from (paper section, or the authors' script and flag).
        scaled: what to change for a small model or a CPU budget ("" when nothing).
    """

    value: Any
    source: str
    scaled: str = ""


def _common_wrn(source: str) -> dict[str, Setting]:
    return {
        "model": Setting("wrn", f"{source} --model", _WRN_NOTE),
        "depth": Setting(28, f"{source} --depth", _WRN_NOTE),
        "width": Setting(10, f"{source} --width", _WRN_NOTE),
        "dropout": Setting(0.0, f"{source} --dropout_rate default"),
        "objective": Setting("jem", "log p(x) + log p(y|x) with equal weights"),
        "w_px": Setting(1.0, f"{source} p(x) weight"),
        "w_px_decay_epochs": Setting([], f"{source}: the p(x) weight is constant"),
        "adam_beta2": Setting(0.999, f"{source}: Adam's betas (0.9, 0.999); unused with SGD"),
        "w_pyx": Setting(1.0, f"{source} p(y|x) weight"),
        "batch_size": Setting(64, f"{source} --batch_size default"),
        "buffer_size": Setting(
            DEFAULT_BUFFER_SIZE, f"{source} --buffer_size default", _BUFFER_NOTE
        ),
        "reinit_prob": Setting(DEFAULT_REINIT_PROB, f"{source} --reinit_freq default"),
        "sgld_step_size": Setting(DEFAULT_STEP_SIZE, f"{source} --sgld_lr"),
    }


RECIPES: dict[str, dict[str, Setting]] = {
    "jem": {
        **_common_wrn(_JEM),
        "norm": Setting("none", "JEM paper (WRN without normalisation); --norm default None"),
        "optimizer": Setting("adam", f"{_JEM_README} --optimizer adam"),
        "lr": Setting(1e-4, f"{_JEM_README} --lr .0001"),
        "weight_decay": Setting(0.0, f"{_JEM} --weight_decay default"),
        "sam_rho": Setting(0.0, "no SAM in JEM"),
        "sam_adaptive": Setting(False, "no SAM in JEM"),
        "warmup_iters": Setting(
            1000,
            f"{_JEM_README} --warmup_iters 1000",
            "about 2.5 epochs of CIFAR-10: keep it short of the run",
        ),
        "epochs": Setting(200, f"{_JEM} --n_epochs default", _EPOCHS_NOTE),
        "decay_epochs": Setting([160, 180], f"{_JEM} --decay_epochs default", _EPOCHS_NOTE),
        "decay_rate": Setting(0.3, f"{_JEM} --decay_rate default"),
        "no_augment": Setting(False, f"{_JEM} utils: pad-4 crop and flip on both batches"),
        "input_noise": Setting(0.03, f"{_JEM_README} --sigma .03"),
        "px_augment": Setting(True, f"{_JEM}: the p(x) batch is augmented like the CE batch"),
        "sgld_steps": Setting(
            DEFAULT_N_STEPS, f"{_JEM} --n_steps default (the JEM paper's 20 steps)"
        ),
        "sgld_noise": Setting(DEFAULT_NOISE_STD, f"{_JEM} --sgld_std default"),
        "proximal": Setting(False, f"{_JEM} sample_q: no clamp, no gradient clip"),
        "grad_clip": Setting(None, f"{_JEM} sample_q: no gradient clip"),
        "init": Setting("uniform", f"{_JEM} init_random: U(-1, 1)"),
        "l2_energy": Setting(0.0, f"{_JEM}: no energy penalty"),
    },
    "jempp": {
        **_common_wrn(_JEMPP),
        "norm": Setting(
            "batch", f"{_JEMPP_SH} --norm batch (JEM++ paper: informative init lets BatchNorm work)"
        ),
        "optimizer": Setting("sgd", f"{_JEMPP_SH} --optimizer=sgd (momentum 0.9 in the code)"),
        "lr": Setting(0.1, f"{_JEMPP_SH} --lr=.1"),
        "weight_decay": Setting(4e-4, f"{_JEMPP} --weight_decay default"),
        "sam_rho": Setting(0.0, "no SAM in JEM++"),
        "sam_adaptive": Setting(False, "no SAM in JEM++"),
        "warmup_iters": Setting(1000, f"{_JEMPP_SH} --warmup_iters=1000"),
        "epochs": Setting(150, f"{_JEMPP_SH} --n_epochs=150", _EPOCHS_NOTE),
        "decay_epochs": Setting(
            [50, 100, 125], f"{_JEMPP_SH} --decay_epochs 50 100 125", _EPOCHS_NOTE
        ),
        "decay_rate": Setting(0.2, f"{_JEMPP} --decay_rate default"),
        "no_augment": Setting(False, f"{_JEMPP} utils: pad-4 reflect crop and flip"),
        "input_noise": Setting(0.03, f"{_JEMPP_SH} --sigma=.03"),
        "px_augment": Setting(True, f"{_JEMPP} utils: the p(x) batch is augmented too"),
        "sgld_steps": Setting(
            10,
            f"{_JEMPP_SH} --n_steps=10 (outer steps; its 5 YOPO inner "
            "steps per outer step are not carried over)",
            "5 outer steps (the script's earlier setting) halve the cost",
        ),
        "sgld_noise": Setting(0.0, f"{_JEMPP} --sgld_std default"),
        "proximal": Setting(
            True, "JEM++ paper, proximal SGLD; samples clamped to [-1, 1] in sample_q"
        ),
        "grad_clip": Setting(
            1.0, f"{_JEMPP} --eps default (element-wise clip of the sampling gradient)"
        ),
        "init": Setting(
            "gaussian",
            "JEM++ paper, informative initialisation: one "
            f"Gaussian per class fitted to the training data ({_JEMPP} "
            "init_from_centers)",
        ),
        "l2_energy": Setting(0.0, f"{_JEMPP}: no energy penalty"),
    },
    "sadajem": {
        **_common_wrn(_SADA),
        "norm": Setting("batch", f"{_SADA_SH} --norm batch"),
        "optimizer": Setting("sgd", f"{_SADA_SH} --optimizer sgd (momentum 0.9 in the code)"),
        "lr": Setting(0.1, f"{_SADA_SH} --lr .1"),
        "weight_decay": Setting(5e-4, f"{_SADA} --weight_decay default"),
        "sam_rho": Setting(2.0, f"{_SADA} --rho default"),
        "sam_adaptive": Setting(True, f"{_SADA}: adaptive SAM whenever rho >= 0.5"),
        "warmup_iters": Setting(1000, f"{_SADA_SH} --warmup_iters 1000"),
        "epochs": Setting(200, f"{_SADA_SH} --n_epochs 200", _EPOCHS_NOTE),
        "decay_epochs": Setting(
            [60, 120, 180], f"{_SADA_SH} --decay_epochs 60 120 180", _EPOCHS_NOTE
        ),
        "decay_rate": Setting(0.2, f"{_SADA} --decay_rate default"),
        "no_augment": Setting(
            False, f"{_SADA} utils: pad-4 reflect crop and flip on the cross-entropy batch"
        ),
        "input_noise": Setting(0.0, f"{_SADA_SH} --sigma .0"),
        "px_augment": Setting(
            False,
            "SADA-JEM paper: no data augmentation in the p(x) "
            f"branch ({_SADA} utils: the p(x) loader uses the test "
            "transform)",
        ),
        "sgld_steps": Setting(5, f"{_SADA_SH} --n_steps 5"),
        "sgld_noise": Setting(0.0, f"{_SADA_SH} --sgld_std 0.0"),
        "proximal": Setting(
            True, f"{_SADA} sample_q: gradient clipped to [-1, 1], samples clamped to [-1, 1]"
        ),
        "grad_clip": Setting(1.0, f"{_SADA} sample_q: clamp(eta, -1, 1)"),
        "init": Setting("gaussian", f"{_SADA} --init gm default (one Gaussian per class)"),
        "l2_energy": Setting(0.0, f"{_SADA} --l2_coeff default 0"),
    },
}


def recipe_values(name: str) -> dict[str, Any]:
    """The config values of recipe ``name`` (a fresh dict; lists copied).

    Raises:
        KeyError: unknown recipe (the message lists the known ones).
    """
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}")
    return {
        key: (list(s.value) if isinstance(s.value, list) else s.value)
        for key, s in RECIPES[name].items()
    }


def apply_recipe(cfg: Mapping[str, Any], name: str, explicit: set[str]) -> dict[str, Any]:
    """``cfg`` with recipe ``name`` written over it, except the keys in ``explicit``.

    When ``epochs`` is explicit and ``decay_epochs`` is not, the recipe's decay epochs are
    scaled by ``epochs / recipe epochs`` (rounded, at least 1), so a shortened run keeps the
    recipe's schedule shape.

    Args:
        cfg: a complete trainer config (every key a recipe sets must be present).
        name: the recipe.
        explicit: the config keys the user gave explicitly (they keep their values).

    Returns:
        A new config dict (``cfg`` is not modified).

    Raises:
        KeyError: unknown recipe, or a recipe key the config does not have.
    """
    values = recipe_values(name)
    missing = sorted(set(values) - set(cfg))
    if missing:
        raise KeyError(
            f"recipe {name!r} sets config keys this trainer does not have: {', '.join(missing)}"
        )
    out = dict(cfg)
    for key, value in values.items():
        if key not in explicit:
            out[key] = value
    if "epochs" in explicit and "decay_epochs" not in explicit:
        out["decay_epochs"] = _scaled_epochs(
            values["decay_epochs"], values["epochs"], out["epochs"]
        )
    return out


def _scaled_epochs(decay: list[int], recipe_epochs: int, epochs: int) -> list[int]:
    return [max(1, round(e * epochs / recipe_epochs)) for e in decay]
