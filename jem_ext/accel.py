"""Speed options (precision, channels-last, compile, CUDA-graph chain) that training and
evaluation share: the ``speed`` settings of both command lines (:class:`SpeedOptions`, one
flag group for both) and one small function per option. The trainer applies them to its step
context at the seam (:func:`jem_ext.training.setup.apply_speed_options`), never inside the
step; the evaluation wraps its models with them (:mod:`jem_ext.eval.speed`).

* :func:`autocast_factory` -- ``fp32`` runs as is; ``bf16``/``fp16`` run the network's forward
  and input-gradient (chain and loss) under ``torch.autocast``; the chain state stays float32
  and the energy op takes the half logits (it accumulates in float32). ``fp16`` adds a gradient
  scaler (:func:`make_scaler`).
* :func:`use_channels_last` -- weights and the model's input in NHWC layout (the replay buffer
  too: :func:`configure_sampler`).
* :func:`compile_model` -- ``nn.Module.compile`` in place (checkpoints keep their key names).
* :class:`jem_ext.graphs.GraphedChain` -- the K-step chain as one CUDA graph.
* :func:`batch_independent` -- whether data and samples can share one forward.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .graphs import GraphedChain
from .sampler import Autocast, SGLDSampler
from .settings import setting

PRECISIONS = ("fp32", "bf16", "fp16")
_HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SpeedOptions:
    """How the network runs, not what it computes: the ``speed`` settings of
    ``python -m jem_ext.train`` and ``python -m jem_ext.eval`` (one set of names, help texts
    and defaults; :func:`jem_ext.settings.add_flags` makes them flags)."""

    GROUP = "speed"
    precision: str = setting(
        "fp32",
        "arithmetic of the network's forward and input-gradient (training: the loss and the "
        "SGLD chain, fp16 with a gradient scaler; evaluation: logits, OOD scores, PGD, SGLD "
        "chains): bf16 or fp16 autocast; inputs and chain states stay float32, the IS/FID "
        "network runs in float32",
        kind="str",
        choices=PRECISIONS,
    )
    channels_last: bool = setting(
        False,
        "channels-last (NHWC) layout for a convolutional model's weights, its input and "
        "the replay buffer",
    )
    compile: bool = setting(
        False,
        "torch.compile the model (the loss and the SGLD chain both use it, as does every "
        "evaluation task)",
    )
    cuda_graph: bool = setting(
        False,
        "capture the K-step SGLD chains (training's, the generation task's) in a CUDA graph "
        "once per shape and replay them (runs eagerly, with a note, on the CPU)",
    )


def autocast_factory(precision: str, device: torch.device, cache_enabled: bool = True) -> Autocast:
    """A zero-argument callable giving the context manager for ``precision`` on ``device``.

    ``cache_enabled=False`` is needed where the region is captured in a CUDA graph (the
    autocast weight cache would hold tensors from outside the capture).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return nullcontext
    return functools.partial(
        torch.autocast,
        device_type=torch.device(device).type,
        dtype=_HALF_DTYPES[precision],
        cache_enabled=cache_enabled,
    )


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for float16 training (None for fp32 and bf16)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def is_convolutional(model: nn.Module) -> bool:
    """Whether ``model`` has 2-d convolutions (where the channels-last layout applies)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _to_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    if isinstance(x, Tensor) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, *args[1:])


def use_channels_last(model: nn.Module) -> None:
    """NHWC layout for the weights and the model's input (a forward pre-hook)."""
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_to_channels_last)


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile`` the model's forward in place (used by the loss and the chain alike)."""
    model.compile()
    return model


def batch_independent(model: nn.Module) -> bool:
    """Whether each sample's output is independent of the rest of its batch in train mode
    (no batch normalisation), so data and samples can go through one forward."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def configure_sampler(
    sampler: SGLDSampler, speed: SpeedOptions, device: torch.device
) -> SGLDSampler:
    """The sampler's speed options: the chain's autocast (``precision``), a CUDA-graph chain
    (``cuda_graph``) and a channels-last buffer (``channels_last``, image buffers). Applied
    wherever a sampler is built, so a rebuilt sampler keeps them."""
    precision = speed.precision
    sampler.autocast = (
        None if precision == "fp32" else autocast_factory(precision, device, cache_enabled=False)
    )
    if speed.cuda_graph:
        sampler.chain = GraphedChain()
    buffer = sampler.buffer
    if speed.channels_last and buffer is not None and buffer.data.dim() == 4:
        buffer.data = buffer.data.contiguous(memory_format=torch.channels_last)
    return sampler
