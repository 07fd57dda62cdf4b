"""Chains that start near the data with a share of noise (``--init gaussian --init-noise-frac``),
and the evaluation's view of what such a JEM generates: fresh chains from the run's fitted
per-class Gaussians (``--gen-init gaussian``), a second classifier's verdict on the
class-conditional samples (``--judge``) and the FID of the replay buffer."""

from __future__ import annotations

import json

import pytest
import torch
from trained_runs import train_on_digits

from jem_ext import train as jtrain
from jem_ext.checkpoint import load_checkpoint, save_checkpoint
from jem_ext.data import load_dataset, save_image_grid
from jem_ext.eval import cli as eval_cli
from jem_ext.inits import GaussianInit, MixedInit, UniformInit, _init_from_state
from jem_ext.models import build_model, model_spec
from jem_ext.sampler import ReplayBuffer, SGLDSampler

DIGITS = ["--max-iters", "2", "--buffer-size", "50", "--sgld-steps", "1", "--no-progress"]
EVAL_FAST = ["--max-samples", "60", "--batch-size", "60", "--gen-n", "20", "--gen-steps", "2"]


def _fitted(value: float = 0.5, classes: int = 2) -> GaussianInit:
    """Per-class Gaussians of data packed tightly around ``value`` (std 0.01)."""
    g = torch.Generator().manual_seed(0)
    x = value + 0.01 * torch.randn(400, 1, 4, 4, generator=g)
    return GaussianInit.fit(x, torch.arange(classes).repeat(400 // classes), classes)


# ------------------------------------------------------------------------------- MixedInit


@pytest.mark.parametrize("frac", [0.0, 0.25, 0.7, 1.0])
def test_mixed_init_starts_that_share_of_chains_from_noise(frac):
    init = MixedInit(_fitted(), UniformInit(), frac)
    x = init(4000, (1, 4, 4), generator=torch.Generator().manual_seed(1))
    noise_rows = x.flatten(1).std(1) > 0.2  # the fitted Gaussians' rows have std ~0.01
    assert abs(noise_rows.double().mean().item() - frac) < 0.03
    assert x.min() >= -1 and x.max() <= 1


def test_mixed_init_follows_the_labels_and_the_generator():
    gi = _fitted(classes=2)
    gi.mean[1] = -0.5  # class 1 lives elsewhere
    init = MixedInit(gi, UniformInit(), 0.0)
    y = torch.tensor([0, 1] * 50)
    x = init(100, (1, 4, 4), y=y, generator=torch.Generator().manual_seed(2))
    assert (x.flatten(1).mean(1).sign() == torch.where(y == 0, 1.0, -1.0)).all()
    # no noise share: exactly the informative init's draws with the same generator state
    same = gi(100, (1, 4, 4), y=y, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x, same)
    again = init(100, (1, 4, 4), y=y, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x, again)


def test_mixed_init_survives_its_state_dict_and_the_samplers():
    init = MixedInit(_fitted(), UniformInit(), 0.3)
    back = _init_from_state(init.state_dict())
    assert isinstance(back, MixedInit) and back.noise_frac == 0.3
    a = init(50, (1, 4, 4), generator=torch.Generator().manual_seed(3))
    b = back(50, (1, 4, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    sampler = SGLDSampler(n_steps=1, buffer=ReplayBuffer(10, (1, 4, 4), init=init))
    other = SGLDSampler(n_steps=1, buffer=ReplayBuffer(10, (1, 4, 4), init=init))
    other.load_state_dict(sampler.state_dict())
    assert isinstance(other.init, MixedInit) and other.buffer.init is other.init
    assert SGLDSampler(n_steps=1, init=init).sample_shape == (1, 4, 4)


@pytest.mark.parametrize("frac", [-0.1, 1.5, float("nan")])
def test_mixed_init_refuses_a_share_outside_0_1(frac):
    with pytest.raises(ValueError, match="noise_frac"):
        MixedInit(_fitted(), UniformInit(), frac)


# --------------------------------------------------------------------------------- trainer


def test_trainer_records_and_resumes_the_noise_share(tmp_path):
    run = tmp_path / "run"
    argv = [*DIGITS, "--init", "gaussian", "--init-noise-frac", "0.4", "--ckpt-every", "1"]
    assert jtrain.main([*argv, "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["init_noise_frac"] == 0.4
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["sampler"]["init"]
    assert saved["kind"] == "mixed" and saved["noise_frac"] == 0.4
    assert jtrain.main(["--resume", str(run), "--max-iters", "3"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 3


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--init-noise-frac", "0.2"], "--init-noise-frac: mixes uniform noise"),
        (["--init", "gaussian", "--init-noise-frac", "1.5"], "--init-noise-frac"),
        (["--init", "gaussian", "--init-noise-frac", "nan"], "--init-noise-frac"),
    ],
)
def test_trainer_refuses_a_noise_share_it_cannot_use(tmp_path, capsys, extra, needle):
    run = tmp_path / "never"
    assert jtrain.main([*DIGITS, *extra, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.strip().count("\n") == 0
    assert not run.exists()


def test_an_older_config_without_the_share_means_none(tmp_path):
    run = tmp_path / "run"
    assert jtrain.main([*DIGITS, "--init", "gaussian", "--out", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    del cfg["init_noise_frac"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(cfg))
    again = tmp_path / "again"
    assert jtrain.main(["--config", str(old), "--out", str(again), "--max-iters", "1"]) == 0
    assert json.loads((again / "config.json").read_text())["init_noise_frac"] == 0.0


# -------------------------------------------------------------------------------- evaluation


def _digits_run(path, init, seed: int, buffer: bool = True):
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, (1, 8, 8), width=8)
    train_on_digits(model, 30)
    buf = ReplayBuffer(40, (1, 8, 8), init=init) if buffer else None
    sampler = SGLDSampler(n_steps=2, buffer=buf, init=init, sample_shape=(1, 8, 8))
    save_checkpoint(
        path,
        {
            "model_spec": model_spec(model),
            "model": model.state_dict(),
            "sampler": sampler.state_dict(),
            "config": {"dataset": "digits", "data_root": None, "objective": "jem"},
            "iteration": 30,
            "best_val_accuracy": None,
        },
    )
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    digits = load_dataset("digits", split="train")
    fitted = GaussianInit.fit(digits.x, digits.y, 10)
    return {
        "gaussian": _digits_run(root / "gaussian.pt", MixedInit(fitted, UniformInit(), 0.2), 0),
        "uniform": _digits_run(root / "uniform.pt", UniformInit(), 1),
        "judge": _digits_run(root / "judge.pt", None, 2, buffer=False),
        "wide": _save_wide(root / "wide.pt"),
        "fitted": fitted,
    }


def _save_wide(path):
    model = build_model("small_cnn", 10, (3, 32, 32), width=4)
    save_checkpoint(
        path,
        {"model_spec": model_spec(model), "model": model.state_dict(), "config": {}},
    )
    return path


def _eval(argv, capsys):
    code = eval_cli.main([str(a) for a in [*argv, *EVAL_FAST, "--no-progress"]])
    out, err = capsys.readouterr()
    return code, out, err


def test_fresh_chains_start_from_the_runs_gaussians_and_are_judged(runs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", runs["gaussian"], "--out", out, "--tasks", "generation,fid"]
    argv += ["--gen-init", "gaussian", "--judge", runs["judge"]]
    code, _, err = _eval([*argv, "--fid-classifier", runs["judge"]], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    gen = report["generation"]
    assert gen["init"] == "per-class Gaussians of the run"
    assert gen["judge"] == str(runs["judge"])
    for key in ("judge_conditional_accuracy", "judge_start_accuracy"):
        assert 0.0 <= gen[key] <= 1.0
    # the fitted Gaussians' class means look like their digits to a trained classifier
    assert gen["judge_start_accuracy"] > 0.3
    assert report["settings"]["gen_init"] == "gaussian"
    fid = report["fid"]
    assert fid["n_buffer"] == fid["n_generated"] and fid["fid_buffer"] >= 0
    md = (out / "report.md").read_text()
    assert f"Judge: {runs['judge']}." in md and "FID replay buffer" in md


def test_a_judge_that_is_the_model_itself_agrees_with_its_own_rate(runs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", runs["gaussian"], "--out", out, "--tasks", "generation"]
    code, _, err = _eval([*argv, "--gen-init", "gaussian", "--judge", runs["gaussian"]], capsys)
    assert code == 0, err
    gen = json.loads((out / "report.json").read_text())["generation"]
    assert gen["judge_conditional_accuracy"] == gen["conditional_accuracy"]
    assert gen["judge_start_accuracy"] == gen["conditional_start_accuracy"]


def test_uniform_starts_are_the_default_and_stay_uniform(runs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", runs["gaussian"], "--out", out, "--tasks", "generation"]
    code, _, err = _eval([*argv, "--judge", runs["judge"]], capsys)
    assert code == 0, err
    gen = json.loads((out / "report.json").read_text())["generation"]
    assert gen["init"] == "uniform(-1, 1)"
    # uniform noise is no digit: the judge's rate of the starts is about chance
    assert gen["judge_start_accuracy"] < 0.35


@pytest.mark.parametrize(
    "case, needle",
    [
        ("no_gaussians", "--gen-init gaussian:"),
        ("judge_shape", "--judge"),
        ("judge_missing", "--judge"),
    ],
)
def test_bad_generation_inputs_exit_2_before_writing(runs, tmp_path, capsys, case, needle):
    out = tmp_path / "never"
    argv = {
        "no_gaussians": ["--checkpoint", runs["uniform"], "--gen-init", "gaussian"],
        "judge_shape": ["--checkpoint", runs["gaussian"], "--judge", runs["wide"]],
        "judge_missing": ["--checkpoint", runs["gaussian"], "--judge", tmp_path / "no.pt"],
    }[case]
    code, out_text, err = _eval([*argv, "--out", out, "--tasks", "generation"], capsys)
    assert code == 2
    assert needle in err and err.strip().count("\n") == 0 and out_text == ""
    assert not out.exists()


def test_grids_show_at_most_a_hundred_samples_and_ten_a_class(runs, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "out"
    argv = ["--checkpoint", runs["gaussian"], "--out", out, "--tasks", "generation"]
    flags = ["--gen-n", "200", "--gen-steps", "1", "--no-progress", "--batch-size", "100"]
    code = eval_cli.main([str(a) for a in [*argv, *flags]])
    err = capsys.readouterr().err
    assert code == 0, err
    gen = json.loads((out / "report.json").read_text())["generation"]
    assert gen["n_unconditional"] == 200 and gen["n_conditional"] == 200
    # 10 x 10 tiles each (a class a row of 10 in the conditional grid), not 200 samples
    ref = tmp_path / "ref.png"
    save_image_grid(torch.zeros(100, 1, 8, 8), ref, nrow=10)
    for kind in ("cond", "uncond"):
        assert Image.open(out / f"samples_{kind}.png").size == Image.open(ref).size
