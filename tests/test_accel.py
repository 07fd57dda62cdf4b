"""Tests of the trainer's speed options (jem_ext.accel) and the joint forward."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

from jem_ext import accel, objectives
from jem_ext import train as jtrain
from jem_ext.graphs import GraphedChain
from jem_ext.models import build_model
from jem_ext.sampler import ReplayBuffer, SGLDSampler, run_chain, sgld_chain
from jem_ext.training.config import config_from_mapping
from jem_ext.training.setup import build_run, make_sampler
from jem_ext.training.step import Batch, train_step

TINY = {
    "dataset": "digits",
    "model": "small_cnn",
    "width": 4,
    "sgld_steps": 2,
    "buffer_size": 50,
    "batch_size": 16,
    "no_progress": True,
}


def _tiny_run(tmp_path, **over):
    return build_run(config_from_mapping({**TINY, "out": str(tmp_path / "run"), **over}))


def _batch(run, n=16):
    d = run.data.train_on_device
    return Batch(d.x[:n], d.y[:n])


# ------------------------------------------------------------------ precision


def test_autocast_factory():
    assert accel.autocast_factory("fp32", torch.device("cpu")) is nullcontext
    lin = nn.Linear(4, 3)
    with accel.autocast_factory("bf16", torch.device("cpu"))():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        accel.autocast_factory("fp8", torch.device("cpu"))


def test_scaler_only_for_fp16():
    assert accel.make_scaler("fp32", torch.device("cpu")) is None
    assert accel.make_scaler("bf16", torch.device("cpu")) is None
    assert isinstance(accel.make_scaler("fp16", torch.device("cpu")), torch.amp.GradScaler)


def test_bf16_chain_keeps_fp32_state_and_runs_the_network_in_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 10))
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.rand(8, 3, 2, 2)
    bf16 = accel.autocast_factory("bf16", torch.device("cpu"), cache_enabled=False)
    out = sgld_chain(model, x, 3, 1.0, 0.0, autocast=bf16)
    ref = sgld_chain(model, x, 3, 1.0, 0.0)
    assert out.dtype == torch.float32 and seen[:3] == [torch.bfloat16] * 3
    torch.testing.assert_close(out, ref, rtol=0, atol=0.02)
    assert not torch.equal(out, ref)  # the network really ran in bf16


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_step(tmp_path, precision):
    run = _tiny_run(tmp_path, precision=precision)
    assert (run.ctx.scaler is not None) == (precision == "fp16")
    before = [p.detach().clone() for p in run.ctx.model_for_chain.parameters()]
    terms, x_q = train_step(run.ctx, _batch(run), run.objective)
    assert x_q.dtype == torch.float32 and run.ctx.sampler.buffer.data.dtype == torch.float32
    assert all(isinstance(v, float) for v in terms.values())
    assert all(torch.isfinite(torch.tensor(v)) for k, v in terms.items())
    after = list(run.ctx.model_for_chain.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------- channels-last


def test_channels_last_model_input_and_buffer(tmp_path):
    run = _tiny_run(tmp_path, channels_last=True)
    model = run.ctx.model_for_chain
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert run.ctx.sampler.buffer.data.is_contiguous(memory_format=torch.channels_last)
    seen = []
    conv.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = run.data.train_on_device.x[:4]
    reference = _tiny_run(tmp_path / "ref").ctx.model_for_chain
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert seen and all(seen)
    train_step(run.ctx, _batch(run), run.objective)  # the step runs in this layout


def test_channels_last_needs_a_convolutional_model(tmp_path, capsys):
    code = jtrain.main(
        ["--dataset", "moons", "--model", "mlp", "--channels-last", "--out", str(tmp_path / "r")]
    )
    assert code == 2 and "--channels-last: expected a convolutional" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# -------------------------------------------------------------------- compile


def test_compiled_model_in_chain_and_loss_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    eager = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    eager.load_state_dict(model.state_dict())
    accel.compile_model(model)
    assert set(model.state_dict()) == set(eager.state_dict())  # checkpoints keep key names
    x = torch.rand(6, 2)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    out = sgld_chain(model, x, 2, 0.5, 0.01, generator=gen_a)
    ref = sgld_chain(eager, x, 2, 0.5, 0.01, generator=gen_b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    y = torch.randint(0, 3, (6,))
    la, _ = objectives.jem_loss(model, x, y, x_q=out)
    lb, _ = objectives.jem_loss(eager, x, y, x_q=ref)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------- joint forward


def _loss_model(norm=None):
    torch.manual_seed(0)
    return build_model("small_cnn", 10, (1, 8, 8), width=4, norm=norm).double()


@pytest.mark.parametrize("objective", ["jem", "factored"])
def test_joint_forward_equals_two_forwards(objective):
    model = _loss_model()
    x, x_q = torch.rand(6, 1, 8, 8).double(), torch.rand(5, 1, 8, 8).double()
    y = torch.randint(0, 10, (6,))
    labeled = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    kw = dict(
        x_q=x_q, labeled=labeled, objective=objective, l2_energy=0.1, y_q=torch.randint(0, 10, (5,))
    )
    grads, terms = [], []
    for joint in (False, True):
        model.zero_grad()
        loss, t = objectives.jem_loss(model, x, y, joint_forward=joint, **kw)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        terms.append(t)
    assert terms[0].keys() == terms[1].keys()
    for k in terms[0]:
        assert terms[0][k] == pytest.approx(terms[1][k], rel=1e-12, abs=1e-12, nan_ok=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_joint_forward_counts_one_forward():
    model = _loss_model()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x, x_q = torch.rand(6, 1, 8, 8).double(), torch.rand(5, 1, 8, 8).double()
    objectives.jem_loss(model, x, torch.zeros(6, dtype=torch.long), x_q=x_q, joint_forward=True)
    assert calls == [11]


def test_joint_forward_only_without_batch_norm(tmp_path):
    assert accel.batch_independent(_loss_model())
    assert not accel.batch_independent(_loss_model("batch"))
    assert _tiny_run(tmp_path).ctx.joint_forward
    assert not _tiny_run(tmp_path / "bn", norm="batch").ctx.joint_forward


# ---------------------------------------------------------------- host syncs


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")
# Adam keeps its step counters as CPU tensors on every device: reading them is no device sync.
NOT_DEVICE_READS = (str(Path(torch.optim.__file__).parent),)


@pytest.mark.parametrize(
    "over", [{}, {"precision": "bf16"}, {"cuda_graph": True}, {"objective": "factored"}]
)
def test_iteration_reads_the_host_once(tmp_path, monkeypatch, over):
    run = _tiny_run(tmp_path, **over)
    batch = _batch(run)
    train_step(run.ctx, batch, run.objective)  # first step outside the count (lazy set-up)
    counts = {name: 0 for name in HOST_READS}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _orig=original, **k):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.startswith(NOT_DEVICE_READS):
                counts[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    train_step(run.ctx, batch, run.objective)
    monkeypatch.undo()
    assert counts == {**{n: 0 for n in HOST_READS}, "tolist": 1}


# ---------------------------------------------------------------------- CLI


def test_speed_flags_in_help(capsys):
    with pytest.raises(SystemExit):
        jtrain.main(["--help"])
    text = capsys.readouterr().out
    assert "speed:" in text
    for flag in ("--precision", "--channels-last", "--compile", "--cuda-graph"):
        assert flag in text, flag


def test_bad_precision_is_exit_2(tmp_path, capsys):
    code = jtrain.main(["--precision", "fp8", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "--precision" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_cuda_graph_flag_trains_on_cpu_with_a_note(tmp_path, capsys):
    code = jtrain.main(
        [
            "--dataset",
            "digits",
            "--model",
            "small_cnn",
            "--width",
            "4",
            "--sgld-steps",
            "2",
            "--buffer-size",
            "50",
            "--epochs",
            "1",
            "--cuda-graph",
            "--precision",
            "bf16",
            "--no-progress",
            "--sample-every",
            "0",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("cuda-graph chain off") == 1


@pytest.mark.cuda
def test_cuda_training_step_syncs_once(tmp_path):
    run = _tiny_run(tmp_path, device="cuda", precision="bf16", cuda_graph=True)
    batch = _batch(run)
    train_step(run.ctx, batch, run.objective)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            train_step(run.ctx, batch, run.objective)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_rebuilt_sampler_keeps_the_speed_options(tmp_path):
    run = _tiny_run(tmp_path, precision="bf16", cuda_graph=True, channels_last=True)
    fresh = make_sampler(run.cfg, run.data.train, run.device)  # as after a recovery
    for sampler in (run.ctx.sampler, fresh):
        assert isinstance(sampler.chain, GraphedChain) and sampler.autocast is not None
        assert sampler.buffer.data.is_contiguous(memory_format=torch.channels_last)
    plain = make_sampler(
        run.cfg.replace(precision="fp32", cuda_graph=False, channels_last=False),
        run.data.train,
        run.device,
    )
    assert plain.chain is run_chain and plain.autocast is None


def test_replay_buffer_channels_last_state_round_trip():
    buf = ReplayBuffer(10, (1, 4, 4))
    sampler = SGLDSampler(buffer=buf, n_steps=1)
    speed = accel.SpeedOptions(channels_last=True)
    accel.configure_sampler(sampler, speed, torch.device("cpu"))
    assert buf.data.is_contiguous(memory_format=torch.channels_last)
    saved = sampler.state_dict()
    fresh = SGLDSampler(buffer=ReplayBuffer(10, (1, 4, 4)), n_steps=1)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.buffer.data, buf.data)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "over",
    [{"precision": "fp16"}, {"precision": "bf16", "channels_last": True, "cuda_graph": True}],
)
def test_cuda_training_steps_with_speed_options(tmp_path, over):
    run = _tiny_run(tmp_path, device="cuda", **over)
    for _ in range(3):
        terms, x_q = train_step(run.ctx, _batch(run), run.objective)
    assert x_q.is_cuda and x_q.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
