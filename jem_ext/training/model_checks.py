"""The checks of a run's model before it starts that concern a model factory (``--model
PACKAGE.MODULE:FACTORY``) and batch normalisation; :mod:`.cli` calls them with the config's
values. Each raises one line (exit 2) before anything is written."""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from .. import factory as factories
from ..accel import is_convolutional
from ..checkpoint import CheckpointError, weights_mismatch
from . import distributed
from .config import ConfigError


def check_factory_model(
    name: str,
    num_classes: int,
    in_shape: tuple[int, ...],
    channels_last: bool,
    resume_weights: dict[str, Any] | None,
) -> nn.Module:
    """Build the factory's model for the data (one forward on a zero batch, on the CPU) and
    check it against ``--channels-last`` and a resumed checkpoint's weights.

    Raises:
        ConfigError: the factory cannot be used, or ``channels_last`` without a convolution.
        CheckpointError: the model no longer fits the resumed checkpoint's weights.
    """
    try:
        model = factories.build(name, num_classes, in_shape)
    except factories.FactoryError as err:
        raise ConfigError(f"--model {err}") from None
    if channels_last and not is_convolutional(model):
        raise ConfigError(
            f"--channels-last: expected a convolutional model, but the model of {name} has no "
            "2-d convolution"
        )
    if resume_weights is not None:
        diff = weights_mismatch(model, resume_weights)
        if diff is not None:
            raise CheckpointError(
                f"--resume: the model that {name} builds does not match the checkpoint's "
                f"weights (first difference: {diff}); the factory's code changed since the run"
            )
    return model


def check_factory_named(recorded: Any, given: str | None, run: str) -> None:
    """A resumed run whose model came from a factory continues only when the command line names
    that factory again (``given``: the explicit ``--model``; a checkpoint never imports code by
    itself); a factory's run resumed as another model, or a built-in one's as a factory, is
    refused."""
    if not (factories.is_factory(recorded) or factories.is_factory(given)):
        return
    if given is None:
        raise ConfigError(
            f"--resume {run}: the run's model comes from the factory {recorded}, and a "
            f"checkpoint never imports code by itself: name it again with --model {recorded}"
        )
    if given != recorded:
        kind = "the factory" if factories.is_factory(recorded) else "the built-in model"
        raise ConfigError(f"--model {given}: the run {run} trained {kind} {recorded}")


def note_batch_norm(model: nn.Module, name: str, generative: bool) -> None:
    """Say at the start what batch normalisation means for the chains (rank 0 of a job; only
    for objectives with chains)."""
    note = factories.batch_norm_note(model, name) if generative else None
    if note is not None and distributed.launch_rank() == 0:
        print(note, file=sys.stderr)
