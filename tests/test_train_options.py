"""Trainer options of the published recipes: --recipe, SAM, --input-noise, --no-px-augment."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from jem_ext import objectives
from jem_ext import train as jtrain
from jem_ext.checkpoint import load_checkpoint
from jem_ext.models import build_model
from jem_ext.objectives import Objective
from jem_ext.recipes import recipe_values
from jem_ext.sam import SAM
from jem_ext.training import loop
from jem_ext.training.config import INVOCATION_KEYS, parse_command_line
from jem_ext.training.runconfig import RunConfig
from jem_ext.training.setup import build_run, make_augment, make_optimizer
from jem_ext.training.step import Batch, SharpnessAwareContext, StepContext, train_step

DIGITS = [
    "--model",
    "small_cnn",
    "--width",
    "4",
    "--buffer-size",
    "200",
    "--sgld-steps",
    "2",
    "--no-progress",
    "--sample-every",
    "0",
    "--epochs",
    "1",
]


def _cfg(argv: list[str]) -> RunConfig:
    return parse_command_line(argv).cfg.replace(out="unused")


def test_help_lists_the_recipes_and_points_to_the_table(capsys):
    with pytest.raises(SystemExit):
        jtrain.main(["--help"])
    out = capsys.readouterr().out
    assert "--recipe {jem,jempp,sadajem}" in out and "jem_ext.recipes" in out


def test_recipe_sets_its_values_and_explicit_flags_win():
    argv = ["--recipe", "sadajem", "--model", "small_cnn", "--width", "64", "--epochs", "20"]
    cfg = _cfg(argv).flat()
    sada = recipe_values("sadajem")
    assert (cfg["model"], cfg["width"], cfg["epochs"]) == ("small_cnn", 64, 20)
    for key in (
        "optimizer",
        "lr",
        "sam_rho",
        "sam_adaptive",
        "px_augment",
        "sgld_steps",
        "init",
        "proximal",
        "norm",
        "input_noise",
    ):
        assert cfg[key] == sada[key], key
    assert cfg["decay_epochs"] == [6, 12, 18]  # scaled with the shorter run
    assert _cfg(["--recipe", "jem", "--lr", "0.01"]).optim.lr == 0.01
    assert _cfg([]).recipe.name is None and _cfg([]).optim.sam_rho == 0.0


def test_recipe_is_recorded_and_repeated_by_config_and_resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["--recipe", "sadajem", "--max-iters", "3"] + DIGITS
    assert jtrain.main(argv + ["--out", str(a)]) == 0
    cfg_a = json.loads((a / "config.json").read_text())
    assert cfg_a["recipe"] == "sadajem" and cfg_a["sam_rho"] == 2.0
    assert (cfg_a["model"], cfg_a["width"], cfg_a["sgld_steps"]) == ("small_cnn", 4, 2)
    # --config repeats the run: the file's values, not the recipe's again
    assert jtrain.main(["--config", str(a / "config.json"), "--out", str(b)]) == 0
    assert _experiment(json.loads((b / "config.json").read_text())) == _experiment(cfg_a)
    pa = load_checkpoint(a / "checkpoints" / "last.pt")["model"]
    pb = load_checkpoint(b / "checkpoints" / "last.pt")["model"]
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0)
    assert jtrain.main(["--resume", str(a), "--max-iters", "4"]) == 0
    assert _experiment(json.loads((a / "config.json").read_text())) == {
        **_experiment(cfg_a),
        "max_iters": 4,
    }


def _experiment(cfg: dict) -> dict:
    """The config without the invocation and the run's own identity (a repeat is a new run)."""
    return {k: v for k, v in cfg.items() if k not in INVOCATION_KEYS + ("run_id",)}


def test_train_function_applies_the_recipe_under_given_keys(tmp_path):
    summary = jtrain.train(
        {
            "recipe": "jempp",
            "model": "small_cnn",
            "width": 4,
            "sgld_steps": 1,
            "buffer_size": 100,
            "max_iters": 2,
            "no_progress": True,
            "sample_every": 0,
            "out": str(tmp_path / "r"),
        }
    )
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert summary["status"] == "budget"
    assert (cfg["optimizer"], cfg["lr"], cfg["norm"], cfg["sgld_steps"]) == ("sgd", 0.1, "batch", 1)


def test_sam_optimiser_is_built_from_the_config():
    cfg = _cfg(["--sam-rho", "0.5", "--sam-adaptive", "--optimizer", "sgd"] + DIGITS)
    run = build_run(cfg)
    assert isinstance(run.ctx, SharpnessAwareContext)
    assert isinstance(run.ctx.optimizer, SAM)
    assert isinstance(run.ctx.optimizer.base_optimizer, torch.optim.SGD)
    group = run.ctx.optimizer.param_groups[0]
    assert (group["rho"], group["adaptive"], group["momentum"]) == (0.5, True, 0.9)
    plain = build_run(_cfg(DIGITS))
    assert type(plain.ctx) is StepContext and isinstance(plain.ctx.optimizer, torch.optim.Adam)


class _FixedSampler:
    """Returns the same samples on every call and counts the calls."""

    conditional = False

    def __init__(self, x_q: torch.Tensor) -> None:
        self.x_q, self.calls = x_q, 0

    def sample(self, model, n, y=None, generator=None):
        self.calls += 1
        return self.x_q.clone()


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", 10, (1, 8, 8), width=4, norm="batch")


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_equals_the_two_pass_hand_computation(adaptive):
    """Second gradient on the same x and x_q, no second draw, BatchNorm stats of one pass."""
    g = torch.Generator().manual_seed(3)
    x, x_q = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, torch.rand(16, 1, 8, 8, generator=g)
    x_px = x + 0.1
    y = torch.randint(0, 10, (16,), generator=g)
    weights = Objective("jem", 1.0, 1.0, 0.01)
    kw = dict(rho=0.3, adaptive=adaptive, lr=0.05, momentum=0.9, weight_decay=1e-3)

    model = _bn_model()
    ref = copy.deepcopy(model)
    sampler = _FixedSampler(x_q)
    ctx = SharpnessAwareContext(
        model, model, SAM(model.parameters(), torch.optim.SGD, **kw), sampler, torch.Generator()
    )
    train_step(ctx, Batch(x, y, None, x_px), weights)
    assert sampler.calls == 1

    opt = SAM(ref.parameters(), torch.optim.SGD, **kw)
    ref.train()

    def loss():
        return objectives.jem_loss(
            ref, x, y, x_q=x_q, w_px=1.0, w_pyx=1.0, l2_energy=0.01, x_px=x_px
        )[0]

    loss().backward()
    stats = {k: b.clone() for k, b in ref.named_buffers()}
    opt.first_step(zero_grad=True)
    loss().backward()
    with torch.no_grad():
        for k, b in ref.named_buffers():
            b.copy_(stats[k])
    opt.second_step()
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    assert any("running_mean" in k for k in stats)


def test_sam_update_refuses_a_plain_optimiser():
    model = _bn_model()
    ctx = SharpnessAwareContext(
        model, model, torch.optim.SGD(model.parameters(), lr=0.1), None, torch.Generator()
    )
    with pytest.raises(TypeError, match="SAM"):
        ctx.update(model(torch.zeros(2, 1, 8, 8)).sum(), lambda: torch.zeros(()))


def test_input_noise_replaces_the_presets_noise_only():
    preset = make_augment(_cfg(["--dataset", "digits"]).data)
    assert preset.noise_sigma == 0.03
    noisy = make_augment(_cfg(["--dataset", "digits", "--input-noise", "0.1"]).data)
    assert (noisy.noise_sigma, noisy.pad, noisy.flip) == (0.1, preset.pad, preset.flip)
    assert make_augment(_cfg(["--input-noise", "0.1", "--no-augment"]).data) is None
    assert _cfg(["--input-noise", "0"]).data.input_noise == 0.0


@pytest.mark.parametrize("argv", [["--input-noise", "-0.1"], ["--sam-rho", "-1"]])
def test_negative_values_are_one_line_errors(tmp_path, capsys, argv):
    assert jtrain.main(argv + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {argv[0]}:") and not (tmp_path / "r").exists()


@pytest.mark.parametrize("px_augment", [True, False])
def test_px_batch_is_the_batch_before_augmentation(px_augment):
    argv = DIGITS + ([] if px_augment else ["--no-px-augment"])
    run = build_run(_cfg(argv))
    assert run.cfg.data.px_augment is px_augment
    x = run.data.train_on_device.x[:8]
    y = run.data.train_on_device.y[:8]
    batch = loop._batch(run.data, run.generators["augment"], x, y, torch.arange(8))
    assert not torch.equal(batch.x, x)  # the CE batch is augmented either way
    if px_augment:
        assert batch.x_px is None
    else:
        assert torch.equal(batch.x_px, x)


def test_jem_loss_takes_the_data_energies_from_x_px():
    model = _bn_model().eval()
    g = torch.Generator().manual_seed(1)
    x, x_px, x_q = (torch.rand(8, 1, 8, 8, generator=g) for _ in range(3))
    y = torch.randint(0, 10, (8,), generator=g)
    _, with_px = objectives.jem_loss(model, x, y, x_q=x_q, x_px=x_px)
    _, plain = objectives.jem_loss(model, x, y, x_q=x_q)
    _, on_px = objectives.jem_loss(model, x_px, y, x_q=x_q)
    assert with_px["energy_data"] == pytest.approx(on_px["energy_data"], abs=1e-6)
    assert with_px["px"] == pytest.approx(on_px["px"], abs=1e-6)
    assert with_px["ce"] == pytest.approx(plain["ce"], abs=1e-6)  # CE stays on x
    assert with_px["energy_data"] != pytest.approx(plain["energy_data"], abs=1e-6)
    with pytest.raises(ValueError, match="x_px"):
        objectives.jem_loss(model, x, y, x_q=x_q, x_px=x_px[:4])


def test_sam_with_float16_scaling_is_refused(tmp_path, capsys):
    argv = ["--sam-rho", "0.5", "--precision", "fp16", "--out", str(tmp_path / "r")]
    assert jtrain.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --sam-rho:") and "bf16" in err
    assert not (tmp_path / "r").exists()


def test_px_weight_decays_at_its_epochs():
    cfg = _cfg(["--w-px", "0.5", "--w-px-decay-epochs", "2,4", "--w-px-decay-rate", "0.1"])
    base = Objective("jem", w_px=0.5, w_pyx=2.0, l2_energy=0.01)
    got = [loop.loss_weights(cfg.objective, base, epoch) for epoch in range(6)]
    assert [w.w_px for w in got] == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005, 0.005])
    assert all((w.name, w.w_pyx, w.l2_energy) == ("jem", 2.0, 0.01) for w in got)
    no_decay = _cfg(["--w-px-decay-epochs", ""]).objective
    assert loop.loss_weights(no_decay, base, 100) == base


def test_training_steps_use_the_epochs_px_weight(tmp_path, monkeypatch):
    seen = []
    real_step = loop.train_step

    def recording_step(ctx, batch, weights):
        seen.append(weights.w_px)
        return real_step(ctx, batch, weights)

    monkeypatch.setattr(loop, "train_step", recording_step)
    argv = [*DIGITS, "--epochs", "2", "--out", str(tmp_path / "run")]
    argv += ["--w-px", "0.8", "--w-px-decay-epochs", "1", "--w-px-decay-rate", "0.25"]
    assert jtrain.main(argv) == 0
    per_epoch = len(seen) // 2
    assert seen == pytest.approx([0.8] * per_epoch + [0.2] * (len(seen) - per_epoch))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["w_px_decay_epochs"], cfg["w_px_decay_rate"]) == ([1], 0.25)


def test_config_files_from_before_the_px_weight_decay_keep_a_constant_weight(tmp_path):
    run = tmp_path / "old"
    assert jtrain.main([*DIGITS, "--max-iters", "2", "--out", str(run)]) == 0
    cfg_file = run / "config.json"
    cfg = json.loads(cfg_file.read_text())
    assert (cfg["w_px_decay_epochs"], cfg["adam_beta2"]) == ([30], 0.99)  # today's defaults
    del cfg["w_px_decay_epochs"], cfg["adam_beta2"]  # a run folder from before the flags
    cfg_file.write_text(json.dumps(cfg))
    for argv in (["--config", str(cfg_file)], ["--resume", str(run)]):
        old = parse_command_line(argv).cfg
        assert (old.objective.w_px_decay_epochs, old.optim.adam_beta2) == ((), 0.999)
    again = parse_command_line(["--resume", str(run), "--w-px-decay-epochs", "5"]).cfg
    assert again.objective.w_px_decay_epochs == (5,)


def test_adam_beta2_reaches_the_optimiser_and_a_resume_can_change_it(tmp_path):
    model = torch.nn.Linear(2, 2)
    assert make_optimizer(_cfg([]).optim, model).param_groups[0]["betas"] == (0.9, 0.99)
    jem = make_optimizer(_cfg(["--recipe", "jem"]).optim, model)
    assert jem.param_groups[0]["betas"] == (0.9, 0.999)  # the paper's Adam
    run = tmp_path / "run"
    argv = [*DIGITS, "--max-iters", "2", "--adam-beta2", "0.95", "--out", str(run)]
    assert jtrain.main(argv) == 0
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]["param_groups"][0]
    assert tuple(saved["betas"]) == (0.9, 0.95)
    argv = ["--resume", str(run), "--max-iters", "3", "--adam-beta2", "0.9"]
    assert jtrain.main([*argv, "--weight-decay", "0.1"]) == 0
    resumed = load_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]["param_groups"][0]
    assert (tuple(resumed["betas"]), resumed["weight_decay"]) == ((0.9, 0.9), 0.1)
