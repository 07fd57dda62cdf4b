"""The evaluation's SGLD chain: flags over the checkpoint's sampler over JEM's defaults."""

import math

import pytest

from jem_ext.chain import ChainSpec
from jem_ext.eval.settings import EvalError, resolve_sgld


def test_defaults_without_sampler_are_jem_s():
    assert resolve_sgld(None, None, None) == ChainSpec(20, 1.0, 0.01, (-1.0, 1.0), None)


def test_sampler_settings_are_used_and_flags_override_them():
    sampler = {"step_size": 0.5, "noise_std": 0.0, "clamp": [-2, 2], "grad_clip": 0.1}
    assert resolve_sgld(sampler, None, None) == ChainSpec(20, 0.5, 0.0, (-2.0, 2.0), 0.1)
    assert resolve_sgld(sampler, 2.0, 0.3) == ChainSpec(20, 2.0, 0.3, (-2.0, 2.0), 0.1)
    assert resolve_sgld({**sampler, "n_steps": 5}, None, None).n_steps == 5  # the run's chain


def test_a_flag_replaces_an_unusable_sampler_value():
    assert resolve_sgld({"noise_std": -1.0}, None, 0.02).noise_std == 0.02


@pytest.mark.parametrize(
    "sampler, step, noise, needle",
    [
        ({"noise_std": -1.0}, None, None, "checkpoint's sampler settings: SGLD noise"),
        ({"step_size": math.nan}, None, None, "finite"),
        ({"clamp": [1.0, -1.0]}, None, None, "low > high"),
        ({"grad_clip": -0.5}, None, None, "gradient clip"),
        (None, -1.0, None, "--sgld-step-size"),
        (None, None, math.inf, "--sgld-noise"),
    ],
)
def test_unusable_settings_are_refused_naming_their_source(sampler, step, noise, needle):
    with pytest.raises(EvalError, match=needle):
        resolve_sgld(sampler, step, noise)
