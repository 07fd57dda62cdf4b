"""The ``chain`` stage: SGLD chain throughput per option set against an eager copy of the
JEM reference sampler."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..accel import SpeedOptions
from ..chain import DEFAULT_NOISE_STD, DEFAULT_REINIT_PROB, DEFAULT_STEP_SIZE
from ..models import build_model
from ..sampler import ReplayBuffer, SGLDSampler
from ..training.setup import apply_speed_options
from ..training.step import StepContext
from .config import Option, Sizes
from .timing import _within, sync, time_call


def _wrn(sizes: Sizes, device: torch.device) -> nn.Module:
    """The timed network: the WRN of the sizes, or the model of ``sizes.model``'s factory."""
    torch.manual_seed(0)
    if sizes.model is not None:
        return build_model(sizes.model, 10, sizes.image).to(device)
    model = build_model("wrn", 10, sizes.image, depth=sizes.depth, widen_factor=sizes.width)
    return model.to(device)


class ReferenceSampler:
    """Eager copy of the JEM reference sampler (wgrathwohl/JEM ``sample_p_0`` / ``sample_q``,
    unconditional): a CPU replay buffer (random rows, ``reinit_prob`` of them re-drawn uniform
    on [-1, 1], moved to ``device``), then per step ``autograd.grad`` of logsumexp and
    ``x.data += -step_size * g + noise_std * randn_like(x)`` (``g = dE/dx``), and the chains
    written back to the buffer. Used by ``python -m jem_ext.bench`` and
    ``benchmarks/bench_sampler.py`` as the baseline of jem_ext's sampler.
    """

    def __init__(
        self,
        buffer_size: int,
        sample_shape: tuple[int, ...],
        device: torch.device,
        n_steps: int,
        step_size: float = DEFAULT_STEP_SIZE,
        noise_std: float = DEFAULT_NOISE_STD,
        reinit_prob: float = DEFAULT_REINIT_PROB,
    ) -> None:
        self.sample_shape = tuple(sample_shape)
        self.buffer = torch.empty(buffer_size, *self.sample_shape).uniform_(-1, 1)
        self.device, self.n_steps = torch.device(device), n_steps
        self.step_size, self.noise_std, self.reinit_prob = step_size, noise_std, reinit_prob

    @classmethod
    def for_sizes(cls, sizes: Sizes, device: torch.device) -> ReferenceSampler:
        """The reference sampler of a bench size set (buffer, image shape, chain length)."""
        return cls(sizes.buffer, sizes.image, device, sizes.steps)

    def sample(self, model: nn.Module, batch: int) -> Tensor:
        idx = torch.randint(0, len(self.buffer), (batch,))
        fresh = torch.empty(batch, *self.sample_shape).uniform_(-1, 1)
        pick = (torch.rand(batch) < self.reinit_prob).float()
        pick = pick.view(batch, *([1] * len(self.sample_shape)))
        x = (pick * fresh + (1 - pick) * self.buffer[idx]).to(self.device).requires_grad_(True)
        model.eval()
        for _ in range(self.n_steps):
            (g,) = torch.autograd.grad(-model(x).logsumexp(1).sum(), [x], retain_graph=True)
            x.data += -self.step_size * g + self.noise_std * torch.randn_like(x)
        model.train()
        self.buffer[idx] = x.detach().cpu()
        return x.detach()


def _sampler(sizes: Sizes, device: torch.device) -> SGLDSampler:
    gen = torch.Generator(device=device).manual_seed(1)
    buffer = ReplayBuffer(sizes.buffer, sizes.image, device=device, generator=gen)
    return SGLDSampler(n_steps=sizes.steps, buffer=buffer)


def _context(option: Option, sizes: Sizes, device: torch.device) -> StepContext:
    model = _wrn(sizes, device)
    ctx = StepContext(
        model_for_chain=model,
        model_for_loss=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-4),
        sampler=_sampler(sizes, device),
        generator=torch.Generator(device=device).manual_seed(2),
    )
    speed = SpeedOptions(option.precision, option.channels_last, option.compile, option.cuda_graph)
    apply_speed_options(ctx, speed, device)
    return ctx


def _rate(sizes: Sizes, timing: dict[str, float]) -> dict[str, float]:
    work = sizes.batch * sizes.steps
    return {
        **timing,
        "images_steps_per_s": work / timing["median_s"],
        "best_images_steps_per_s": work / timing["best_s"],
    }


def stage_chain(
    device: torch.device, sizes: Sizes, options: tuple[Option, ...], deadline: float = math.inf
) -> dict[str, Any]:
    """Chain throughput of each option set and of the reference sampler (options not started
    by ``deadline``, a ``time.perf_counter()`` value, are recorded as skipped)."""
    model = _wrn(sizes, device)
    ref = ReferenceSampler.for_sizes(sizes, device)

    def reference() -> Tensor:
        return ref.sample(model, sizes.batch)

    out: dict[str, Any] = {"reference": _rate(sizes, time_call(reference, device, sizes.reps))}
    for option in options:
        out[option.name] = _within(
            deadline, partial(_chain_option, option, sizes, device, reference)
        )
    return out


def _chain_option(
    option: Option, sizes: Sizes, device: torch.device, reference: Callable[[], Any]
) -> dict[str, Any]:
    """The option's chain timed alternately with the reference chain (so that other load on
    the machine hits both alike); the speed-up is the ratio of their medians."""
    ctx = _context(option, sizes, device)
    start = time.perf_counter()
    ctx.sampler.sample(ctx.model_for_chain, sizes.batch, generator=ctx.generator)
    sync(device)
    first = time.perf_counter() - start  # capture / compilation included
    ours, ref = [], []
    for _ in range(sizes.reps):
        ref.append(time_call(reference, device, 1, warmup=0)["median_s"])
        ours.append(
            time_call(
                lambda: ctx.sampler.sample(
                    ctx.model_for_chain, sizes.batch, generator=ctx.generator
                ),
                device,
                1,
                warmup=0,
            )["median_s"]
        )
    res = _rate(sizes, {"median_s": statistics.median(ours), "best_s": min(ours)})
    return {
        **res,
        "first_call_s": first,
        "reference_median_s": statistics.median(ref),
        "speedup_vs_reference": statistics.median(ref) / res["median_s"],
    }
