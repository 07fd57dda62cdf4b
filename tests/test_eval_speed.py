"""The speed flags of ``python -m jem_ext.eval`` (--precision, --channels-last, --compile,
--cuda-graph): accepted, recorded in report.json, applied through the
helpers shared with the trainer (jem_ext.accel)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trained_runs import train_on_digits

from jem_ext import accel
from jem_ext.checkpoint import save_checkpoint
from jem_ext.eval import cli
from jem_ext.eval.generation import generate
from jem_ext.eval.settings import EvalSettings, SGLDSettings
from jem_ext.eval.speed import AutocastModel, autocast_model, make_chain, uncompiled
from jem_ext.graphs import GraphedChain
from jem_ext.models import build_model, model_spec
from jem_ext.training.runconfig import build_parser as train_parser

SPEED_FLAGS = ("--precision", "--channels-last", "--compile", "--cuda-graph")
SMALL = [
    "--max-samples",
    "40",
    "--batch-size",
    "40",
    "--gen-n",
    "10",
    "--gen-steps",
    "2",
    "--no-progress",
    "--seed",
    "2",
    "--device",
    "cpu",
]


def _save(path, model_name: str, train_steps: int = 0, in_shape=(1, 8, 8)):
    """A tiny digits checkpoint (``train_steps`` cross-entropy Adam steps)."""
    torch.manual_seed(0)
    size = {"hidden": 16} if model_name == "mlp" else {"width": 8}
    model = build_model(model_name, 10, in_shape, **size)
    if train_steps:
        train_on_digits(model, train_steps)
    save_checkpoint(
        path,
        {
            "model_spec": model_spec(model),
            "model": model.state_dict(),
            "sampler": None,
            "config": {"dataset": "digits", "objective": "jem"},
            "iteration": train_steps,
            "best_val_accuracy": None,
        },
    )
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    return {
        "cnn": _save(root / "cnn.pt", "small_cnn", train_steps=40),
        "mlp": _save(root / "mlp.pt", "mlp"),
    }


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, err


def _report(out_dir):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads((out_dir / "report.json").read_text(), parse_constant=refuse)


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, float):
        yield obj


# ------------------------------------------------------------------------------ flags


def _speed_actions(parser):
    return {
        a.option_strings[0]: a
        for a in parser._actions
        if a.option_strings and a.option_strings[0] in SPEED_FLAGS
    }


def test_speed_flags_match_the_trainers():
    """One flag group (jem_ext.accel.SpeedOptions) serves both command lines: same names,
    help texts and defaults."""
    ours, theirs = _speed_actions(cli.build_parser()), _speed_actions(train_parser())
    assert set(ours) == set(theirs) == set(SPEED_FLAGS)
    for flag in SPEED_FLAGS:
        a, b = ours[flag], theirs[flag]
        assert (a.dest, a.choices, a.default, a.nargs, type(a), a.help) == (
            b.dest,
            b.choices,
            b.default,
            b.nargs,
            type(b),
            b.help,
        ), flag
        assert a.help, flag


def test_speed_flags_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "speed:" in text
    for flag in SPEED_FLAGS:
        assert flag in text, flag


@pytest.mark.parametrize(
    "argv",
    [
        ["--precision", "fp8"],
        ["--precision"],
        ["--channels-last=yes"],
        ["--cuda-graph", "1"],
        ["--compile", "on"],
    ],
)
def test_bad_speed_values_exit_2(ckpts, tmp_path, capsys, argv):
    out_dir = tmp_path / "out"
    code, err = _run(["--checkpoint", ckpts["cnn"], "--out", out_dir, *argv], capsys)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("jem_ext.eval: error:")
    assert not out_dir.exists()


def test_defaults_are_recorded(ckpts, tmp_path, capsys):
    code, err = _run(
        ["--checkpoint", ckpts["cnn"], "--out", tmp_path, "--tasks", "accuracy", *SMALL], capsys
    )
    assert code == 0, err
    s = _report(tmp_path)["settings"]
    assert (s["precision"], s["channels_last"], s["compile"], s["cuda_graph"]) == (
        "fp32",
        False,
        False,
        False,
    )


def test_channels_last_refuses_an_mlp(ckpts, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, err = _run(
        ["--checkpoint", ckpts["mlp"], "--out", out_dir, "--channels-last", *SMALL], capsys
    )
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (
        "jem_ext.eval: error: --channels-last: expected a convolutional "
        "model (wrn, small_cnn), got mlp (--checkpoint)"
    )
    assert not out_dir.exists()


def test_channels_last_refuses_an_mlp_compare(ckpts, tmp_path, capsys):
    code, err = _run(
        [
            "--checkpoint",
            ckpts["cnn"],
            "--compare",
            ckpts["mlp"],
            "--out",
            tmp_path / "out",
            "--channels-last",
            *SMALL,
        ],
        capsys,
    )
    assert code == 2 and "(--compare)" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- precision, layout


def _accuracy_run(ckpts, out_dir, capsys, *extra):
    code, err = _run(
        [
            "--checkpoint",
            ckpts["cnn"],
            "--out",
            out_dir,
            "--tasks",
            "accuracy,calibration,ood",
            "--refine-steps",
            "1",
            *SMALL,
            "--max-samples",
            "300",
            "--batch-size",
            "100",
            *extra,
        ],
        capsys,
    )
    assert code == 0, err
    return _report(out_dir)


def test_bf16_accuracy_within_noise_of_fp32(ckpts, tmp_path, capsys):
    ref = _accuracy_run(ckpts, tmp_path / "fp32", capsys)
    half = _accuracy_run(ckpts, tmp_path / "bf16", capsys, "--precision", "bf16")
    assert half["settings"]["precision"] == "bf16"
    assert ref["accuracy"] > 0.5  # the checkpoint has learnt something
    # One binomial standard deviation at n = 300 is about 0.025: bf16 flips a few borderline
    # predictions at most.
    assert abs(half["accuracy"] - ref["accuracy"]) <= 0.03
    assert abs(half["accuracy_refined"]["accuracy"] - ref["accuracy_refined"]["accuracy"]) <= 0.05
    assert all(math.isfinite(v) for v in _numbers(half))
    for name, scores in half["ood"].items():
        for score, value in scores.items():
            assert abs(value - ref["ood"][name][score]) <= 0.05, (name, score)


def test_channels_last_matches_the_default_layout(ckpts, tmp_path, capsys):
    ref = _accuracy_run(ckpts, tmp_path / "nchw", capsys)
    nhwc = _accuracy_run(ckpts, tmp_path / "nhwc", capsys, "--channels-last")
    assert nhwc["settings"]["channels_last"] is True
    assert nhwc["accuracy"] == ref["accuracy"]
    assert nhwc["ece"] == pytest.approx(ref["ece"], abs=1e-5)


def test_autocast_model_keeps_inputs_and_gradients_float32():
    torch.manual_seed(0)
    net = build_model("small_cnn", 10, (1, 8, 8), width=4)
    settings = EvalSettings.from_flat(tasks="accuracy", precision="bf16")
    wrapped = autocast_model(net, settings)
    assert isinstance(wrapped, AutocastModel)
    assert autocast_model(net, EvalSettings.from_flat()) is net
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    out = wrapped(x)
    assert out.dtype == torch.float32
    (grad,) = torch.autograd.grad(out.logsumexp(1).sum(), x)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


# ------------------------------------------------------------------- cuda graph, compile


def test_cuda_graph_on_the_cpu_equals_eager_with_one_note(ckpts, tmp_path, capsys):
    argv = [
        "--checkpoint",
        ckpts["cnn"],
        "--compare",
        ckpts["cnn"],
        "--tasks",
        "generation,fid",
        "--fid-classifier",
        ckpts["cnn"],
        *SMALL,
    ]
    code, err = _run([*argv, "--out", tmp_path / "eager"], capsys)
    assert code == 0, err
    code, err = _run([*argv, "--out", tmp_path / "graph", "--cuda-graph"], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "cuda-graph" in line]
    assert len(notes) == 1 and "eagerly" in notes[0], err
    eager, graph = _report(tmp_path / "eager"), _report(tmp_path / "graph")
    assert graph["settings"]["cuda_graph"] is True
    for r_e, r_g in ((eager, graph), (eager["compare"], graph["compare"])):
        assert r_g["generation"] == r_e["generation"]
        assert r_g["fid"] == r_e["fid"]


def test_generate_with_a_graphed_chain_equals_eager_on_the_cpu(capsys):
    torch.manual_seed(0)
    net = build_model("small_cnn", 10, (1, 8, 8), width=4)
    settings = EvalSettings.from_flat(
        tasks="generation", no_progress=True, batch_size=3, precision="bf16", cuda_graph=True
    )
    sgld = SGLDSettings(step_size=1.0, noise_std=0.01, clamp=(-1.0, 1.0), grad_clip=None)
    chain = make_chain(settings)
    assert isinstance(chain, GraphedChain)
    graphed = generate(net, 5, (1, 8, 8), 2, sgld, settings, seed=4, chain=chain)
    eager = generate(net, 5, (1, 8, 8), 2, sgld, settings, seed=4)
    assert graphed.dtype == torch.float32 and torch.equal(graphed, eager)
    assert capsys.readouterr().err.count("cuda-graph") == 1


def test_compile_flag_is_applied_and_recorded(ckpts, tmp_path, capsys, monkeypatch):
    compiled = []
    monkeypatch.setattr(accel, "compile_model", lambda m: compiled.append(m) or m)
    code, err = _run(
        [
            "--checkpoint",
            ckpts["cnn"],
            "--out",
            tmp_path,
            "--tasks",
            "accuracy",
            "--compile",
            *SMALL,
        ],
        capsys,
    )
    assert code == 0, err
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    assert _report(tmp_path)["settings"]["compile"] is True


def test_compiled_model_is_attacked_uncompiled(ckpts, tmp_path, capsys):
    """PGD through SGLD refinement is a double backward, which compiled backward functions
    refuse: the robustness task runs the model uncompiled, with the eager figures."""
    argv = [
        "--checkpoint",
        ckpts["cnn"],
        "--tasks",
        "robustness",
        *SMALL,
        "--robust-n",
        "6",
        "--pgd-steps",
        "1",
        "--robust-refine-steps",
        "1",
        "--robust-chains",
        "1",
        "--pgd-eps",
        "linf=0,0.2",
        "--pgd-norms",
        "linf",
    ]
    code, err = _run([*argv, "--out", tmp_path / "eager"], capsys)
    assert code == 0, err
    code, err = _run([*argv, "--out", tmp_path / "compiled", "--compile"], capsys)
    assert code == 0, err
    eager, compiled = _report(tmp_path / "eager"), _report(tmp_path / "compiled")
    assert compiled["settings"]["compile"] is True
    assert compiled["robustness"] == eager["robustness"]


def test_uncompiled_runs_the_eager_forward_with_hooks():
    torch.manual_seed(0)
    net = build_model("small_cnn", 10, (1, 8, 8), width=4)
    assert uncompiled(net) is net
    accel.use_channels_last(net)
    seen = []
    net.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    accel.compile_model(net)
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    eager = uncompiled(net)
    out = eager(x)
    (g,) = torch.autograd.grad(out.logsumexp(1).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)  # a double backward
    assert seen == [True] and torch.isfinite(gg).all()
