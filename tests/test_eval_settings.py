"""The evaluation's settings: its typed groups and flags, and its SGLD chain (flags over the
checkpoint's sampler over JEM's defaults)."""

import math
from pathlib import Path

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


# ----------------------------------------------------------------- the typed settings

# report.json's "settings" keys, in the order every version has written them
REPORT_KEYS = (
    "checkpoint out tasks compare label compare_label model compare_model dataset data_root "
    "batch_size device max_samples seed sgld_step_size sgld_noise refine_steps ood gen_steps "
    "gen_n gen_init judge inception_weights fid_classifier pgd_norms pgd_eps pgd_steps "
    "pgd_step_size robust_refine_steps robust_chains robust_sigma robust_n no_progress "
    "precision channels_last compile cuda_graph gen_clamp gen_grad_clip"
).split()


def _parse(*flags: str):
    from jem_ext.eval import cli

    return cli.parse_settings(["--checkpoint", "c.pt", "--out", "o", *flags])


def test_the_speed_group_is_the_trainer_s():
    import typing

    from jem_ext.accel import SpeedOptions
    from jem_ext.eval.settings import EvalSettings

    assert typing.get_type_hints(EvalSettings)["speed"] is SpeedOptions
    settings = _parse("--precision", "bf16", "--channels-last")
    assert settings.speed == SpeedOptions(precision="bf16", channels_last=True)


def test_every_flag_is_a_setting_of_one_group_with_its_default():
    """The parser is generated from the groups: one flag per setting, its default the
    field's (nothing is added to the parser by hand)."""
    from jem_ext.eval import cli
    from jem_ext.eval.settings import all_specs, default_values

    parser = cli.build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == set(all_specs())
    for action in parser._actions:
        if action.dest != "help":
            assert action.default == default_values()[action.dest], action.dest
    assert parser.get_default("batch_size") == 100 and parser.get_default("pgd_steps") == 10


def test_settings_are_grouped_frozen_and_read_as_attributes(tmp_path):
    import dataclasses

    settings = _parse(
        "--tasks",
        "robustness,accuracy",
        "--pgd-norms",
        "l2",
        "--pgd-eps",
        "l2=1,0.5,1",
        "--ood",
        "svhn:data",
        "--gen-n",
        "7",
    )
    assert settings.job.task_names == ["accuracy", "robustness"]  # the table's order
    assert settings.job.out == str(Path("o").resolve())
    assert settings.robustness.norms == ["l2"] and settings.robustness.eps == {"l2": [0.5, 1.0]}
    assert settings.ood.sets == [("svhn", str(Path("data").resolve()))]
    assert settings.generation.gen_n == 7 and settings.data.batch_size == 100
    assert settings.display.progress
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.data.seed = 3  # type: ignore[misc]


def test_report_settings_keep_their_keys_and_order():
    settings = _parse("--tasks", "accuracy")
    sgld = resolve_sgld(None, None, None)
    record = settings.to_json(sgld)
    assert list(record) == REPORT_KEYS
    assert record["tasks"] == "accuracy" and record["pgd_norms"] == "linf,l2"
    assert record["pgd_eps"]["linf"] == [0.0, 0.05, 0.1, 0.2, 0.3]
    assert record["gen_clamp"] == [-1.0, 1.0] and record["ood"] == []


@pytest.mark.parametrize(
    "flags, line",
    [
        (["--batch-size", "0"], "--batch-size: expected >= 1, got 0"),
        (["--gen-n", "0"], "--gen-n: expected >= 1, got 0"),
        (["--robust-chains", "0"], "--robust-chains: expected >= 1, got 0"),
        (["--robust-n", "0"], "--robust-n: expected >= 1, got 0"),
        (["--gen-steps", "-1"], "--gen-steps: expected >= 0, got -1"),
        (["--refine-steps", "-1"], "--refine-steps: expected >= 0, got -1"),
        (["--robust-refine-steps", "-1"], "--robust-refine-steps: expected >= 0, got -1"),
        (["--pgd-steps", "-2"], "--pgd-steps: expected >= 0, got -2"),
        (["--max-samples", "1"], "--max-samples: expected >= 2, got 1"),
        (["--pgd-step-size", "0"], "--pgd-step-size: expected > 0, got 0.0"),
        (["--sgld-noise", "-1"], "--sgld-noise: expected >= 0, got -1.0"),
        (["--robust-sigma", "-0.5"], "--robust-sigma: expected >= 0, got -0.5"),
        (["--tasks", ","], "--tasks: unknown task(s) (none given); expected a comma list of"),
        (["--pgd-norms", "l3"], "--pgd-norms: expected a comma list of linf, l2, got 'l3'"),
        (["--pgd-eps", "l3=1"], "--pgd-eps 'l3=1': unknown norm 'l3' (expected linf, l2)"),
        (["--pgd-eps", "linf=-1"], "--pgd-eps 'linf=-1': expected non-negative finite numbers"),
        (["--ood", "uniform"], "--ood uniform: a built-in OOD set, always evaluated"),
        (["--ood", ":x"], "--ood ':x': expected NAME[:FOLDER]"),
        (["--device", "foo"], "--device: unknown device 'foo'"),
        (["--model", "nofactory"], "--model nofactory: expected PACKAGE.MODULE:FACTORY"),
        (["--gen-init", "bar"], "argument --gen-init: invalid choice: 'bar'"),
        (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    ],
)
def test_each_bad_flag_is_one_line_naming_it(flags, line):
    with pytest.raises(EvalError) as err:
        _parse(*flags)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_from_flat_refuses_unknown_settings():
    from jem_ext.eval.settings import EvalSettings

    assert EvalSettings.from_flat(batch_size=3).data.batch_size == 3
    with pytest.raises(KeyError, match="bach_size"):
        EvalSettings.from_flat(bach_size=3)


def test_eval_writes_no_jem_chain_default():
    """JEM's chain settings have one home (jem_ext.chain): no evaluation module writes the
    clamp, the step size or the noise as a number."""
    import ast

    import jem_ext.eval

    found = []
    for path in sorted(Path(jem_ext.eval.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple) and [ast.unparse(e) for e in node.elts] == [
                "-1.0",
                "1.0",
            ]:
                found.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.keyword) and node.arg in ("step_size", "noise_std"):
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, float):
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []
