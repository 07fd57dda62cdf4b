"""One training iteration, JEM's Algorithm 1, and the seam through which options plug in.

:func:`train_step` is the algorithm and nothing else: given a data batch ``(x, y)``, draw
``x_q`` from the sampler (chains from the replay buffer, K SGLD steps, written back), compute
``loss = CE + E(x) - E(x_q) (+ penalty)`` and update the parameters. Everything else (learning
rate, logging, checkpoints, the divergence guard) happens around it, in :mod:`.loop`.

The seam is :class:`StepContext`. Options that change *how* a step runs, not *what* it
computes, are fields of the context, set where the context is built
(:func:`jem_ext.training.setup.build_context`), and never branches inside the step:

- ``model_for_loss``: the module the loss's forward passes go through (a distributed wrapper
  such as ``DistributedDataParallel(model)``); ``model_for_chain``: the underlying module, used
  for the SGLD chains (whose gradients are with respect to ``x``, not synchronised), for
  checkpoints and for evaluation. Without a wrapper both are the same module.
- ``autocast``: a zero-argument callable returning the context manager the loss is computed in
  (``torch.autocast(...)`` for mixed precision; ``contextlib.nullcontext`` by default).
- ``scaler``: a ``torch.amp.GradScaler`` for float16 training, or None.
- ``joint_forward``: data and samples share one forward (no batch-dependent normalisation).
- ``update``: the method that turns the loss into a parameter update (zero grads, backward,
  optimizer step, through the scaler when there is one); a CUDA-graph or compiled variant
  replaces this method or the step's callables, not the step. It also receives a closure that
  recomputes the loss on the same batch and samples, for updates that need a second gradient
  (:class:`SharpnessAwareContext`).

The loss terms come back as host floats, read in one transfer inside the objective: the only
host sync of an iteration. Callers (the guard, the logger) use those floats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import objectives
from ..objectives import Batch, Objective
from ..sam import SAM
from ..sampler import SGLDSampler


@dataclass
class StepContext:
    """What a training step runs on (see the module docstring for the seam).

    Attributes:
        model_for_chain: the network itself (SGLD chains, checkpoints, evaluation).
        model_for_loss: what the loss's forward passes go through (a wrapper, or the network).
        optimizer: the parameters' optimiser.
        sampler: the SGLD sampler, or None for the cross-entropy objective.
        generator: the sampler's random generator (buffer draws, SGLD noise).
        autocast: returns the context manager the loss is computed in.
        scaler: gradient scaler for float16 training, or None.
        joint_forward: one forward for data and samples together (models without
            batch-dependent normalisation).
    """

    model_for_chain: nn.Module
    model_for_loss: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: SGLDSampler | None
    generator: torch.Generator
    autocast: Callable[[], AbstractContextManager[Any]] = field(default=nullcontext)
    scaler: Any = None
    joint_forward: bool = False

    def update(self, loss: Tensor, recompute: Callable[[], Tensor]) -> None:
        """Gradient step on ``loss``: zero grads, backward, optimizer step (scaled if needed).

        ``recompute`` (unused here) returns the loss again on the same batch and samples.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()


@dataclass
class SharpnessAwareContext(StepContext):
    """A :class:`StepContext` whose optimiser is a :class:`~jem_ext.sam.SAM`: two passes.

    The first gradient (at ``w``) comes from ``loss``; SAM moves to the ascent point, where
    ``recompute`` gives the second loss on the same batch and the same samples (no new
    sampling), inside the same autocast, with BatchNorm running statistics frozen; SAM then
    returns to ``w`` and the base optimiser steps with the second gradient.
    """

    def update(self, loss: Tensor, recompute: Callable[[], Tensor]) -> None:
        if self.scaler is not None:
            raise RuntimeError("SAM with float16 gradient scaling is not supported")
        optimizer = self.optimizer
        if not isinstance(optimizer, SAM):
            raise TypeError(
                f"SharpnessAwareContext needs a SAM optimiser, got {type(optimizer).__name__}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

        def closure() -> Tensor:
            with frozen_norm_stats(self.model_for_chain):
                second = recompute()
                second.backward()
            return second

        optimizer.step(closure)


@contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Leave the running statistics of every BatchNorm layer of ``model`` as they were."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(layers, saved, strict=True):
                for k, b in m.named_buffers(recurse=False):
                    b.copy_(buffers[k])


def train_step(
    ctx: StepContext, batch: Batch, objective: Objective
) -> tuple[dict[str, float], Tensor | None]:
    """One iteration of JEM's Algorithm 1 on ``batch``.

    Returns:
        ``(terms, x_q)``: the loss terms as host floats (see :func:`jem_ext.objectives.jem_loss`)
        and the samples drawn this step (None without a sampler).
    """
    # Draw x_q ~ p_theta(x): chains from the replay buffer, K SGLD steps, written back.
    x_q = None
    if ctx.sampler is not None:
        y_q = batch.y if ctx.sampler.conditional else None
        x_q = ctx.sampler.sample(
            ctx.model_for_chain, batch.x.shape[0], y=y_q, generator=ctx.generator
        )

    # loss = CE(f(x), y) + E(x) - E(x_q) (+ L2 penalty on the energies), or the chosen
    # objective's terms (see jem_ext.objectives)
    def loss_and_terms() -> tuple[Tensor, dict[str, float]]:
        with ctx.autocast():
            return objectives.batch_loss(
                ctx.model_for_loss, batch, objective, x_q=x_q, joint_forward=ctx.joint_forward
            )

    ctx.model_for_loss.train()
    loss, terms = loss_and_terms()

    # Update theta.
    ctx.update(loss, lambda: loss_and_terms()[0])
    return terms, x_q
