"""Tests of the CUDA-graph SGLD chain (jem_ext.graphs).

On the CPU: the eager fallback and its note, the per-shape cache keys, the capture/replay
plumbing (with a stand-in graph that runs the captured body eagerly) and the fallback after a
failed capture. On CUDA (marked ``cuda``): replay equals the eager chain from the same generator
state, fresh noise at every replay, and no host synchronisation inside a replayed chain.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jem_ext import graphs
from jem_ext.graphs import GraphedChain, chain_key
from jem_ext.sampler import (
    ChainSpec,
    ReplayBuffer,
    SGLDSampler,
    sample_from_noise,
    sgld_chain,
    sgld_steps_,
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def _gen(seed: int = 3, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


CHAIN = dict(n_steps=3, step_size=0.5, noise_std=0.05)
SPEC = ChainSpec(n_steps=3, step_size=0.5, noise_std=0.05)  # the same chain as one spec


def test_cpu_falls_back_to_eager_with_one_note(capsys):
    model, x = _model(), torch.rand(4, 3, 2, 2)
    graphed = GraphedChain()
    a = graphed(model, x, SPEC, generator=_gen())
    b = graphed(model, x, SPEC, generator=_gen())
    ref = sgld_chain(model, x, generator=_gen(), **CHAIN)
    assert torch.equal(a, ref) and torch.equal(b, ref)
    err = capsys.readouterr().err
    assert err.count("cuda-graph chain off") == 1 and len(err.strip().splitlines()) == 1
    assert graphed.captures == 0 and not graphed.graphs


def test_sampler_with_graphed_chain_on_cpu_equals_default():
    def draw(chain):
        buf = ReplayBuffer(20, (3, 2, 2), generator=_gen(1))
        sampler = SGLDSampler(buffer=buf, **CHAIN)
        if chain is not None:
            sampler.chain = chain
        out = sampler.sample(_model(), 6, generator=_gen(2))
        return out, buf.data

    (a, buf_a), (b, buf_b) = draw(None), draw(GraphedChain())
    assert torch.equal(a, b) and torch.equal(buf_a, buf_b)


def test_sample_from_noise_takes_the_graphed_chain_and_autocast():
    model = _model()
    ref = sample_from_noise(model, 5, (3, 2, 2), 2, seed=4, batch_size=3)
    out = sample_from_noise(model, 5, (3, 2, 2), 2, seed=4, batch_size=3, chain=GraphedChain())
    assert torch.equal(out, ref)
    bf16 = sample_from_noise(
        model,
        5,
        (3, 2, 2),
        2,
        seed=4,
        batch_size=3,
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    )
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, ref)


def test_chain_key_separates_what_a_graph_bakes_in():
    model, x = _model(), torch.rand(4, 3, 2, 2)
    gen = _gen()
    base = dict(
        model=model,
        x=x,
        spec=ChainSpec(3, 1.0, 0.01),
        y=None,
        generator=gen,
        autocast=None,
    )
    key = chain_key(**base)
    assert key == chain_key(**{**base, "x": torch.rand(4, 3, 2, 2)})  # values do not matter
    changed = [
        {"x": torch.rand(5, 3, 2, 2)},
        {"x": torch.rand(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)},
        {"x": torch.rand(4, 3, 2, 2, dtype=torch.float64)},
        {"y": torch.zeros(4, dtype=torch.int64)},
        {"spec": ChainSpec(4, 1.0, 0.01)},
        {"spec": ChainSpec(3, 0.5, 0.01)},
        {"spec": ChainSpec(3, 1.0, 0.0)},
        {"spec": ChainSpec(3, 1.0, 0.01, clamp=(-1.0, 1.0))},
        {"spec": ChainSpec(3, 1.0, 0.01, grad_clip=0.03)},
        {"generator": _gen()},
        {"model": _model()},
        {"autocast": lambda: None},
    ]
    for change in changed:
        assert chain_key(**{**base, **change}) != key, change


class _EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay runs the captured chain body eagerly."""

    def __init__(self, body):
        self.body = body
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.body()


@pytest.fixture
def emulated(monkeypatch):
    """GraphedChain on the CPU with captures replaced by :class:`_EagerGraph`."""
    monkeypatch.setattr(graphs, "graph_unavailable", lambda x, gen: None)
    shapes = []

    def capture(self, model, x, spec, y, generator, autocast):
        static_x = x.detach().clone()
        static_y = None if y is None else y.clone()
        shapes.append(tuple(x.shape))
        self.captures += 1
        graph = _EagerGraph(
            lambda: sgld_steps_(model, static_x, spec, static_y, generator, autocast)
        )
        return graphs._Captured(graph, static_x, static_y)

    monkeypatch.setattr(GraphedChain, "_capture", capture)
    return shapes


def test_replay_plumbing_equals_eager_and_captures_once_per_shape(emulated):
    model = _model()
    graphed = GraphedChain(max_graphs=2)
    gen_a, gen_b = _gen(), _gen()
    for batch in (4, 4, 6, 4):
        x = torch.rand(batch, 3, 2, 2)
        y = torch.randint(0, 5, (batch,))
        out = graphed(model, x, SPEC, y=y, generator=gen_a)
        ref = sgld_chain(model, x, y=y, generator=gen_b, **CHAIN)
        assert torch.equal(out, ref)
        assert out.data_ptr() != graphed.graphs[next(reversed(graphed.graphs))].x.data_ptr()
    assert emulated == [(4, 3, 2, 2), (6, 3, 2, 2)]  # re-captured only for the new shape
    graphed(model, torch.rand(7, 3, 2, 2), SPEC, generator=gen_a)
    assert len(graphed.graphs) == 2  # least recently used (batch 6) dropped
    assert emulated[-1] == (7, 3, 2, 2)
    graphed(
        model, torch.rand(4, 3, 2, 2), SPEC, y=torch.zeros(4, dtype=torch.long), generator=gen_a
    )
    assert len(emulated) == 3  # batch 4 was used last before 7, so it was kept
    graphed(
        model, torch.rand(6, 3, 2, 2), SPEC, y=torch.zeros(6, dtype=torch.long), generator=gen_a
    )
    assert emulated[-1] == (6, 3, 2, 2) and len(emulated) == 4  # dropped, so captured again


def test_replay_restores_the_model_mode(emulated):
    model = _model().train()
    GraphedChain()(model, torch.rand(2, 3, 2, 2), SPEC, generator=_gen())
    assert model.training


def test_failed_capture_falls_back_to_eager_for_that_key(monkeypatch, capsys):
    monkeypatch.setattr(graphs, "graph_unavailable", lambda x, gen: None)
    calls = []

    def broken(self, *args):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedChain, "_capture", broken)
    model, x = _model(), torch.rand(4, 3, 2, 2)
    graphed = GraphedChain()
    for _ in range(2):
        out = graphed(model, x, SPEC, generator=_gen())
        assert torch.equal(out, sgld_chain(model, x, generator=_gen(), **CHAIN))
    assert calls == [1]  # not retried for the same key
    err = capsys.readouterr().err
    assert err.count("capture failed: operation not permitted") == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="warmup"):
        GraphedChain(warmup=0)


# ------------------------------------------------------------------------------ CUDA


def _cuda_setup(batch: int = 8):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    ).cuda()
    x = torch.rand(batch, 3, 8, 8, device="cuda") * 2 - 1
    return model, x, torch.Generator(device="cuda").manual_seed(11)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_cuda_replay_equals_eager_from_same_generator_state(precision):
    model, x, gen = _cuda_setup()
    autocast = None
    if precision is not None:

        def autocast():
            return torch.autocast("cuda", dtype=precision, cache_enabled=False)

    graphed = GraphedChain()
    chain = dict(n_steps=5, step_size=1.0, noise_std=0.01, autocast=autocast)
    spec = ChainSpec(5, 1.0, 0.01)
    graphed(model, x, spec, generator=gen, autocast=autocast)  # capture
    assert graphed.captures == 1
    state = gen.get_state()
    out = graphed(model, x, spec, generator=gen, autocast=autocast)
    gen.set_state(state)
    ref = sgld_chain(model, x, generator=gen, **chain)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert graphed.captures == 1


@pytest.mark.cuda
def test_cuda_every_replay_draws_fresh_noise():
    model, x, gen = _cuda_setup()
    graphed = GraphedChain()
    chain = ChainSpec(3, step_size=0.0, noise_std=1.0)  # pure noise: x + N(0, 3)
    outs = [graphed(model, x, chain, generator=gen) for _ in range(3)]
    assert graphed.captures == 1
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(outs[i], outs[j])
    noise = torch.stack(outs) - x
    assert abs(noise.std().item() - 3**0.5) < 0.1


@pytest.mark.cuda
def test_cuda_replayed_chain_has_no_host_sync():
    model, x, gen = _cuda_setup()
    graphed = GraphedChain()
    chain = ChainSpec(4, 1.0, 0.01)
    graphed(model, x, chain, generator=gen)  # capture outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            graphed(model, x, chain, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_eager_chain_has_no_host_sync():
    model, x, gen = _cuda_setup()
    sgld_chain(model, x, 2, generator=gen)  # lazy initialisation outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sgld_chain(model, x, 4, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_new_shape_recaptures_and_cpu_generator_falls_back(capsys):
    model, x, gen = _cuda_setup()
    graphed = GraphedChain()
    chain = ChainSpec(2, 1.0, 0.01)
    graphed(model, x, chain, generator=gen)
    graphed(model, x[:5], chain, generator=gen)
    assert graphed.captures == 2
    out = graphed(model, x, chain, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert "generator on the chain's CUDA device" in capsys.readouterr().err
