"""The K-step SGLD chain captured in a CUDA graph once per shape, then replayed.

:class:`GraphedChain` is a drop-in for :func:`jem_ext.sampler.run_chain` (same signature: the
model, the chain starts and a :class:`~jem_ext.sampler.ChainSpec`; set it as
``SGLDSampler.chain``). On the first call for a given key (shapes, dtypes, layout, device,
chain settings, model, generator, autocast) it captures the whole chain -- K times forward,
input-gradient, energy and ``sgld_step_`` -- into one ``torch.cuda.CUDAGraph``; later calls copy
the chain starts into the graph's static input, replay it and return a copy of the result.
Buffer reads and writes stay outside, with the caller.

Noise: ``sgld_step_`` takes its CUDA random state from ``philox_cuda_state``; the sampler's
generator is registered with the graph (``CUDAGraph.register_generator_state``), so each replay
reads the generator's current offset and advances it: every replay draws fresh noise, and a
replay from a given generator state gives what the eager chain gives from that state.

Where a graph cannot be used -- a CPU tensor, a CPU generator for a CUDA chain, or a capture that
fails -- the chain runs eagerly (:func:`~jem_ext.sampler.run_chain`) after a one-line note on
stderr (once per reason).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .chain import Autocast, ChainSpec, run_chain, sgld_steps_
from .modules import eval_mode

__all__ = ["GraphedChain", "chain_key", "graph_unavailable"]


def graph_unavailable(x: Tensor, generator: torch.Generator | None) -> str | None:
    """Why the chain on ``x`` cannot be captured in a CUDA graph, or None when it can."""
    if x.device.type != "cuda":
        return f"CUDA graphs need a CUDA chain, got a {x.device.type} tensor"
    if generator is not None and generator.device.type != "cuda":
        return "CUDA graphs need the noise generator on the chain's CUDA device"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def chain_key(
    model: nn.Module,
    x: Tensor,
    spec: ChainSpec,
    y: Tensor | None,
    generator: torch.Generator | None,
    autocast: Autocast | None,
) -> Hashable:
    """What a captured chain is valid for: a different key needs a different graph.

    Shapes, dtypes, strides (memory layout) and device of ``x`` and ``y``; the chain settings
    (they are baked into the captured kernels' arguments); and the identity of the model, the
    generator and the autocast (captured by reference).
    """
    y_key = None if y is None else (tuple(y.shape), y.dtype)
    return (
        id(model),
        tuple(x.shape),
        tuple(x.stride()),
        x.dtype,
        str(x.device),
        y_key,
        int(spec.n_steps),
        float(spec.step_size),
        float(spec.noise_std),
        spec.clamp,
        None if spec.grad_clip is None else float(spec.grad_clip),
        None if generator is None else id(generator),
        None if autocast is None else id(autocast),
    )


@dataclass
class _Captured:
    """One captured chain: the graph and its static input/output tensors."""

    graph: Any
    x: Tensor
    y: Tensor | None


class GraphedChain:
    """:func:`~jem_ext.sampler.run_chain`, captured in a CUDA graph per key and replayed.

    Args:
        warmup: eager runs of the chain (on a scratch copy, on a side stream) before a capture,
            as CUDA graphs require (lazy initialisation of the autograd and library state).
        max_graphs: captured chains kept; the least recently used is dropped beyond this.
    """

    def __init__(self, warmup: int = 2, max_graphs: int = 4) -> None:
        if warmup < 1 or max_graphs < 1:
            raise ValueError(
                f"GraphedChain: need warmup >= 1 and max_graphs >= 1, got {warmup}, {max_graphs}"
            )
        self.warmup = int(warmup)
        self.max_graphs = int(max_graphs)
        self.graphs: OrderedDict[Hashable, _Captured | None] = OrderedDict()
        self.captures = 0
        self._noted: set[str] = set()

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        spec: ChainSpec,
        *,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        autocast: Autocast | None = None,
    ) -> Tensor:
        kwargs = dict(y=y, generator=generator, autocast=autocast)
        reason = graph_unavailable(x, generator)
        if reason is not None or spec.n_steps == 0:
            if reason is not None:
                self._note(reason)
            return run_chain(model, x, spec, **kwargs)
        if y is not None:
            y = y.to(device=x.device, dtype=torch.int64)
        key = chain_key(model, x, spec, y, generator, autocast)
        if key not in self.graphs:
            self._store(key, self._try_capture(model, x, spec, y, generator, autocast))
        self.graphs.move_to_end(key)
        entry = self.graphs[key]
        if entry is None:  # the capture failed for this key: eager from now on
            return run_chain(model, x, spec, **kwargs)
        return self._replay(entry, model, x, y)

    # ------------------------------------------------------------------ internals

    def _note(self, reason: str) -> None:
        if reason not in self._noted:
            self._noted.add(reason)
            print(
                f"jem_ext: cuda-graph chain off ({reason}); running the chain eagerly",
                file=sys.stderr,
            )

    def _store(self, key: Hashable, entry: _Captured | None) -> None:
        self.graphs[key] = entry
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    def _replay(self, entry: _Captured, model: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
        entry.x.copy_(x)
        if y is not None:
            entry.y.copy_(y)
        with eval_mode(model):
            entry.graph.replay()
        return entry.x.clone()

    def _try_capture(
        self,
        model: nn.Module,
        x: Tensor,
        spec: ChainSpec,
        y: Tensor | None,
        generator: torch.Generator | None,
        autocast: Autocast | None,
    ) -> _Captured | None:
        try:
            with eval_mode(model):
                return self._capture(model, x, spec, y, generator, autocast)
        except RuntimeError as err:
            first_line = (str(err).splitlines() or [type(err).__name__])[0]
            self._note(f"capture failed: {first_line}")
            return None

    def _capture(
        self,
        model: nn.Module,
        x: Tensor,
        spec: ChainSpec,
        y: Tensor | None,
        generator: torch.Generator | None,
        autocast: Autocast | None,
    ) -> _Captured:
        static_x = x.detach().clone()
        static_y = None if y is None else y.clone()
        steps = (spec, static_y, generator, autocast)
        # Warm up on a side stream (as torch.cuda.graphs requires), on a scratch copy; the
        # generator state is restored so the warm-up draws do not shift the chain's noise.
        saved = None if generator is None else generator.get_state()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                sgld_steps_(model, static_x.clone(), *steps)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if saved is not None:
            generator.set_state(saved)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            sgld_steps_(model, static_x, *steps)
        self.captures += 1
        return _Captured(graph, static_x, static_y)
