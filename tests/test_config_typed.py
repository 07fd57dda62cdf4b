"""The typed run configuration: one owner per setting, generated parser, validated once."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch

from jem_ext import accel
from jem_ext import train as jtrain
from jem_ext.chain import DEFAULT_CLAMP, PROXIMAL_GRAD_CLIP, ChainSpec, run_chain
from jem_ext.sampler import ReplayBuffer, SGLDSampler, sample_from_noise, sgld_chain
from jem_ext.settings import (
    Range,
    add_flags,
    flat_values,
    group_from_flat,
    setting,
    specs,
    value_problem,
)
from jem_ext.training import config, runconfig
from jem_ext.training.options import ChainOptions
from jem_ext.training.runconfig import ConfigError, RunConfig, all_specs, build_parser, validate


def test_every_flag_comes_from_one_setting():
    """The parser holds exactly the settings of the groups, each with its default and help."""
    actions = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    settings = all_specs()
    assert list(actions) == list(settings)
    for key, s in settings.items():
        a = actions[key]
        assert a.option_strings == list(s.option_strings()), key
        default = list(s.default) if isinstance(s.default, list) else s.default
        assert a.default == default and a.help == s.help_text(), key
    groups = [g.title for g in build_parser()._action_groups[2:]]
    assert groups == [g.GROUP for g in runconfig.groups()]


def test_a_run_config_round_trips_through_its_flat_dict():
    cfg = jtrain.config_from_args(["--objective", "factored", "--decay-epochs", "3,4"])
    flat = cfg.flat()
    assert json.loads(json.dumps(flat)) == flat  # config.json's format: plain JSON
    assert validate(flat) == cfg
    assert cfg.optim.decay_epochs == (3, 4) and flat["decay_epochs"] == [3, 4]
    assert cfg.conditional and cfg.generative and cfg.chain.steps == 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert cfg.replace(lr=0.5).optim.lr == 0.5 and cfg.optim.lr == 3e-3
    with pytest.raises(KeyError, match="unknown settings"):
        cfg.replace(learning_rate=0.5)


def test_validation_names_the_setting_and_its_range():
    flat = jtrain.default_config()
    with pytest.raises(ConfigError, match=r"^reinit_prob: expected a value >= 0 and <= 1"):
        validate({**flat, "reinit_prob": 1.5})
    with pytest.raises(ConfigError, match=r"^--lr: expected a value > 0, got 0"):
        validate({**flat, "lr": 0}, where={"lr": "--lr"})
    with pytest.raises(ConfigError, match="epochs: missing from the config"):
        validate({k: v for k, v in flat.items() if k != "epochs"})


def test_a_command_line_is_validated_once(monkeypatch, tmp_path):
    """The config is checked where it is read; training takes the checked RunConfig as is."""
    calls = []
    real = runconfig.validate

    def counting(cfg, where=None, given=()):
        calls.append(1)
        return real(cfg, where, given)

    monkeypatch.setattr(config, "validate", counting)
    monkeypatch.setattr(runconfig, "validate", counting)
    argv = ["--objective", "ce", "--max-iters", "1", "--sample-every", "0", "--no-progress"]
    assert jtrain.main([*argv, "--out", str(tmp_path / "r")]) == 0
    assert len(calls) == 1


def test_the_library_call_takes_a_partial_flat_dict_or_a_run_config(tmp_path):
    base = {"objective": "ce", "max_iters": 1, "sample_every": 0, "no_progress": True}
    summary = jtrain.train({**base, "out": str(tmp_path / "a")})
    cfg = config.config_from_mapping({**base, "out": str(tmp_path / "b")})
    assert isinstance(cfg, RunConfig)
    again = jtrain.train(cfg)
    assert (summary["iterations"], again["iterations"]) == (1, 1)
    with pytest.raises(ConfigError, match="^epochs: expected a value >= 1"):
        jtrain.train({**base, "epochs": 0, "out": str(tmp_path / "c")})
    assert not (tmp_path / "c").exists()


def test_the_chain_options_resolve_proximal_sgld_once():
    plain = ChainOptions().spec()
    assert plain == ChainSpec(20, 1.0, 0.01, None, None)
    proximal = ChainOptions(proximal=True).spec()
    assert (proximal.clamp, proximal.grad_clip) == (DEFAULT_CLAMP, PROXIMAL_GRAD_CLIP)
    assert ChainOptions(proximal=True, grad_clip=1.0).spec().grad_clip == 1.0
    assert ChainOptions(grad_clip=0.5).spec().clamp is None


def test_speed_options_reach_the_sampler_without_defaults_elsewhere():
    sampler = SGLDSampler(buffer=ReplayBuffer(4, (1, 2, 2)), n_steps=1)
    accel.configure_sampler(sampler, accel.SpeedOptions(precision="bf16"), torch.device("cpu"))
    assert sampler.autocast is not None
    plain = SGLDSampler(buffer=ReplayBuffer(4, (1, 2, 2)), n_steps=1)
    accel.configure_sampler(plain, accel.SpeedOptions(), torch.device("cpu"))
    assert plain.autocast is None


def test_a_chain_spec_equals_its_keyword_form():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.rand(5, 1, 2, 2)
    spec = ChainSpec(3, 0.5, 0.02, clamp=(-1, 1), grad_clip=0.1)
    kw = dict(clamp=(-1.0, 1.0), grad_clip=0.1)
    a = sgld_chain(model, x, 3, 0.5, 0.02, generator=torch.Generator().manual_seed(1), **kw)
    b = sample_from_noise(model, 5, (1, 2, 2), 3, 0.5, 0.02, seed=2, **kw)
    c = sample_from_noise(model, 5, (1, 2, 2), spec=spec, seed=2)
    d = run_chain(model, x, spec, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, d) and torch.equal(b, c)
    sampler = SGLDSampler(n_steps=3, step_size=0.5, noise_std=0.02, sample_shape=(1, 2, 2), **kw)
    assert sampler.spec == spec == SGLDSampler(spec=spec, sample_shape=(1, 2, 2)).spec
    sampler.n_steps = 7  # the library's attribute form sets the spec's field
    assert sampler.spec == dataclasses.replace(spec, n_steps=7)
    with pytest.raises(ValueError, match="n_steps or spec"):
        sample_from_noise(model, 5, (1, 2, 2))


@dataclass(frozen=True)
class _Logging:
    GROUP = "logging"
    tensorboard: bool = setting(False, "write TensorBoard event files")
    every: int = setting(10, "log every N iterations", dest="log_rows_every", range=Range(1))


def test_a_new_setting_is_one_field():
    """A new group or setting needs nothing but its field: flag, help section, flat key and
    checks follow from it."""
    parser = argparse.ArgumentParser()
    add_flags(parser, _Logging, suppress_defaults=False)
    args = vars(parser.parse_args(["--tensorboard", "--log-rows-every", "3"]))
    assert args == {"tensorboard": True, "log_rows_every": 3}
    group = group_from_flat(_Logging, args)
    assert group == _Logging(True, 3) and flat_values(group) == args
    every = dict(specs(_Logging))["every"]
    assert value_problem(every, 0) == "expected a value >= 1, got 0"
    assert value_problem(every, True) == "expected an integer, got True"
