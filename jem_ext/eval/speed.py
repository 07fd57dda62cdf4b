"""The evaluation's speed options, through the shared helpers
(:mod:`jem_ext.accel`, :class:`jem_ext.graphs.GraphedChain`).

* ``--precision bf16|fp16``: the evaluated models' forwards run under ``torch.autocast``
  (:class:`AutocastModel`); their logits come back as float32 and every input -- test images,
  OOD sets, PGD's adversarial points, SGLD chain states -- stays float32, so input gradients
  (the ``approx_mass`` score, PGD, SGLD) are float32 too. The IS/FID network always runs in
  float32, so IS/FID figures do not depend on the option.
* ``--channels-last``: NHWC weights and inputs of a convolutional model (an MLP is refused).
* ``--compile``: ``torch.compile`` of each evaluated model, in place; the robustness task runs
  it uncompiled (:func:`uncompiled`: PGD differentiates through SGLD's input gradients, a
  double backward that compiled backward functions refuse).
* ``--cuda-graph``: the generation chains are captured in CUDA graphs and replayed; one chain
  object serves every model and task, so its eager fallback (e.g. on the CPU) is one note.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import accel
from ..graphs import GraphedChain
from ..models import convolutional_models
from .settings import EvalError, EvalSettings

__all__ = [
    "AutocastModel",
    "Uncompiled",
    "apply_model_options",
    "autocast_model",
    "chain_autocast",
    "make_chain",
    "uncompiled",
]


class AutocastModel(nn.Module):
    """``f`` run under an autocast context, returning float32 outputs.

    The input is passed as is (float32 stays float32, so gradients with respect to it are
    float32); only the network's arithmetic is in the autocast's precision.
    """

    def __init__(self, f: nn.Module, autocast: accel.Autocast) -> None:
        super().__init__()
        self.f = f
        self.autocast = autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.f(x)
        return out.float()


class Uncompiled(nn.Module):
    """``f`` (a module compiled in place by :func:`~jem_ext.accel.compile_model`)
    called without its compiled forward, hooks included.

    Differentiating through an input gradient (PGD through SGLD refinement: a double backward)
    is not supported by ``torch.compile``'s backward.
    """

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f._call_impl(x)  # nn.Module.__call__ without the compiled path


def uncompiled(model: nn.Module) -> nn.Module:
    """``model`` without the compilation of --compile (``model`` itself when not compiled)."""
    if getattr(model, "_compiled_call_impl", None) is None:
        return model
    return Uncompiled(model)


def autocast_model(model: nn.Module, settings: EvalSettings) -> nn.Module:
    """``model`` under --precision's autocast (``model`` itself for fp32)."""
    if settings.speed.precision == "fp32":
        return model
    return AutocastModel(
        model, accel.autocast_factory(settings.speed.precision, torch.device(settings.data.device))
    )


def chain_autocast(settings: EvalSettings) -> accel.Autocast | None:
    """The autocast of the SGLD chains' forwards (None for fp32); its weight cache is off, as
    a CUDA-graph capture needs. The same object for the same settings, so a CUDA-graph chain
    (keyed by the autocast's identity) is captured once for every call."""
    if settings.speed.precision == "fp32":
        return None
    return _chain_autocast(settings.speed.precision, settings.data.device)


@functools.cache
def _chain_autocast(precision: str, device: str) -> accel.Autocast:
    return accel.autocast_factory(precision, torch.device(device), cache_enabled=False)


def make_chain(settings: EvalSettings) -> Callable[..., torch.Tensor] | None:
    """The chain function of the generation task: a CUDA-graph chain with --cuda-graph, else
    None (the sampler's eager chain)."""
    return GraphedChain() if settings.speed.cuda_graph else None


def apply_model_options(
    model: nn.Module, spec: dict[str, Any], settings: EvalSettings, what: str
) -> None:
    """Apply --channels-last and --compile to a loaded model (raises :class:`EvalError` for
    --channels-last on a model without convolutions, before anything is computed)."""
    if settings.speed.channels_last:
        if not accel.is_convolutional(model):
            raise EvalError(
                "--channels-last: expected a convolutional model "
                f"({', '.join(convolutional_models())}), "
                f"got {spec.get('name', type(model).__name__)} ({what})"
            )
        accel.use_channels_last(model)
    if settings.speed.compile:
        accel.compile_model(model)
