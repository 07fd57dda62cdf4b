"""JEM training objectives, as in the paper (Grathwohl et al., ICLR 2020, Sections 3 and 4).

With logits ``f(x)``, ``E(x) = -logsumexp_y f(x)[y]`` and ``E(x, y) = -f(x)[y]``:

* ``"jem"``: maximise ``log p(y | x) + log p(x)``. The loss is
  ``w_pyx * CE(f(x), y) + w_px * (E(x).mean() - E(x_q).mean())`` where ``x_q`` are SGLD samples
  from ``p(x)``; the second term is the usual contrastive surrogate of ``-log p(x)``.
* ``"factored"``: maximise ``log p(y) + log p(x | y)``. ``p(y)`` is the (fixed) class prior and
  contributes no gradient; ``p(x | y) = exp(f(x)[y]) / Z(y)`` gives the surrogate
  ``w_px * (E(x, y).mean() - E(x_q, y_q).mean())`` with ``x_q`` sampled class-conditionally for
  labels ``y_q``. There is no cross-entropy term: classification comes only from the generative
  model (the paper's negative control). ``w_pyx`` is unused.
* ``"ce"``: plain classifier, ``w_pyx * CE``; ``x_q`` is ignored.

``l2_energy > 0`` adds ``l2_energy * (mean(E_data^2) + mean(E_q^2))`` (the energies of the
``p(x)`` term; equal to ``(E_data^2 + E_q^2).mean()`` for equal batch sizes), the usual fix for
diverging runs. The logsumexp of the data logits is taken once (``ops.energy_ce``), and
``E(x, y) = E(x) + CE`` reuses it.

The objective and its weights are one :class:`Objective`, a data batch one :class:`Batch`.
Each objective is one small function ``(BatchTerms, Objective) -> Loss`` in a table keyed by
its name. :func:`batch_loss` (the trainer's call; :func:`jem_loss` is its keyword form) runs
the forwards and computes the terms the objectives share once
(:class:`BatchTerms`: cross-entropy, data energies), the chosen function adds its own (the
sample energies, the contrastive ``p(x)`` term and its L2 penalty, :func:`_contrastive`), and
the logged terms travel to the host in one read; a term an objective does not have is NaN in
the log.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["OBJECTIVES", "Batch", "BatchTerms", "Loss", "Objective", "batch_loss", "jem_loss"]

_TERM_NAMES = ("loss", "ce", "px", "energy_data", "energy_sample", "accuracy")


@dataclass(frozen=True)
class Objective:
    """An objective and the weights of its terms (see the module docstring).

    Attributes:
        name: "jem", "factored" or "ce".
        w_px: weight of the ``p(x)`` (or ``p(x | y)``) term.
        w_pyx: weight of the cross-entropy term.
        l2_energy: weight of the squared-energy penalty.
    """

    name: str = "jem"
    w_px: float = 1.0
    w_pyx: float = 1.0
    l2_energy: float = 0.0


@dataclass
class Batch:
    """A data batch: inputs, labels, which labels the CE term may use (None: all), and the
    inputs of the p(x) term when they differ from ``x`` (the batch before augmentation)."""

    x: Tensor
    y: Tensor
    labeled: Tensor | None = None
    x_px: Tensor | None = None


@dataclass(frozen=True)
class BatchTerms:
    """The terms of one batch that the objectives share, each computed once (float32 at least).

    Attributes:
        labeled: bool mask ``[B]`` of the rows with a usable label, or None (all rows).
        ce_mean: mean cross-entropy ``CE(f(x), y)`` on the labeled rows.
        e_data: per-row data energies ``E(x)`` of the batch ``x``.
        e_px: per-row ``E(x)`` of the generative term's data batch (``x_px`` when given).
        ce_px: per-row cross-entropy of that batch (``E(x, y) = E(x) + CE``).
        logits_q: ``f(x_q)`` of the samples, or None (no samples).
        y_q: int64 labels of conditional samples.
    """

    labeled: Tensor | None
    ce_mean: Tensor
    e_data: Tensor
    e_px: Tensor
    ce_px: Tensor
    logits_q: Tensor | None
    y_q: Tensor


class Loss(NamedTuple):
    """An objective's differentiable loss and its logged terms (None: not part of it)."""

    loss: Tensor
    energy_data: Tensor
    px: Tensor | None = None
    energy_sample: Tensor | None = None


def _contrastive(
    loss: Tensor | None,
    e_d: Tensor,
    e_d_mean: Tensor,
    e_q: Tensor,
    mask: Tensor | None,
    w: Objective,
) -> Loss:
    """``loss + w_px * (E_data.mean() - E_q.mean())``, plus
    ``l2_energy * (mean(E_data^2) + mean(E_q^2))`` when ``l2_energy`` is set; the data means
    over ``mask``."""
    e_q_mean = e_q.mean()
    px = e_d_mean - e_q_mean
    total = w.w_px * px if loss is None else loss + w.w_px * px
    if w.l2_energy:
        total = total + w.l2_energy * (_masked_mean(e_d.pow(2), mask) + e_q.pow(2).mean())
    return Loss(total, e_d_mean, px, e_q_mean)


def _ce_loss(t: BatchTerms, w: Objective) -> Loss:
    """Plain classifier: ``w_pyx * CE``."""
    return Loss(w.w_pyx * t.ce_mean, t.e_data.mean())


def _jem_loss(t: BatchTerms, w: Objective) -> Loss:
    """``log p(y | x) + log p(x)``: ``w_pyx * CE + w_px * (E(x) - E(x_q))`` (+ L2)."""
    ce = w.w_pyx * t.ce_mean
    e_d_mean = t.e_px.mean()
    if t.logits_q is None:  # w_px == 0: no samples, no p(x) term
        return Loss(ce, e_d_mean)
    return _contrastive(ce, t.e_px, e_d_mean, _widen(ops.energy(t.logits_q)), None, w)


def _factored_loss(t: BatchTerms, w: Objective) -> Loss:
    """``log p(x | y)`` alone: ``w_px * (E(x, y) - E(x_q, y_q))`` (+ L2), data on labeled rows."""
    assert t.logits_q is not None  # the only term needs samples (see _checked_labels)
    e_d = t.e_px + t.ce_px  # E(x, y) = -f(x)[y] = E(x) + CE
    e_q = _widen(ops.energy(t.logits_q, t.y_q))
    return _contrastive(None, e_d, _masked_mean(e_d, t.labeled), e_q, t.labeled, w)


class _Entry(NamedTuple):
    """An entry of the objective table."""

    loss: Callable[[BatchTerms, Objective], Loss]
    generative: bool  # has a p(x) term: forwards the samples and the x_px batch
    conditional: bool = False  # samples x_q carry labels y_q; its only term needs them


_OBJECTIVES: dict[str, _Entry] = {
    "jem": _Entry(_jem_loss, generative=True),
    "factored": _Entry(_factored_loss, generative=True, conditional=True),
    "ce": _Entry(_ce_loss, generative=False),
}

OBJECTIVES = tuple(_OBJECTIVES)


def _masked_mean(v: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``v`` over ``mask`` (0 for an empty mask, no host sync)."""
    if mask is None:
        return v.mean()
    m = mask.to(v.dtype)
    return (v * m).sum() / m.sum().clamp_min(1.0)


def jem_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_q: Tensor | None = None,
    labeled: Tensor | None = None,
    objective: str = "jem",
    w_px: float = 1.0,
    w_pyx: float = 1.0,
    l2_energy: float = 0.0,
    y_q: Tensor | None = None,
    joint_forward: bool = False,
    x_px: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The JEM loss of one batch and its terms: :func:`batch_loss` with its arguments spelled
    out.

    Args:
        model: classifier; ``model(x)`` gives logits ``[B, C]``.
        x: data batch ``[B, ...]``.
        y: int64 labels ``[B]`` (entries of unlabeled rows are ignored when ``labeled`` is given).
        x_q: model samples ``[M, ...]`` (required for "jem" and "factored" when ``w_px != 0``).
        labeled: optional bool mask ``[B]``: the CE term, the accuracy, and the data term of the
            "factored" objective use only these rows (the "jem" ``p(x)`` term uses all rows).
        objective: "jem", "factored" or "ce" (see the module docstring).
        w_px: weight of the ``p(x)`` (or ``p(x | y)``) term.
        w_pyx: weight of the cross-entropy term.
        l2_energy: weight of the squared-energy penalty.
        y_q: labels of the conditional samples ``x_q`` for "factored" (default: ``y``).
        joint_forward: compute ``f(x)`` and ``f(x_q)`` in one forward of the concatenated
            batch (same terms, fewer kernel launches); only for models whose outputs do not
            depend on the rest of the batch (no batch normalisation in train mode).
        x_px: the data batch of the generative term, same shape as ``x`` (default: ``x``):
            the batch before augmentation, when only the cross-entropy batch is augmented.
            Its energies are the ``E(x)`` of "px" and "energy_data".

    Returns:
        ``(loss, terms)`` with ``loss`` a differentiable scalar and ``terms`` a dict of floats:
        "loss", "ce" (mean cross-entropy on labeled rows), "px" (``E_data.mean() - E_q.mean()``,
        with conditional energies for "factored"), "energy_data", "energy_sample", "accuracy"
        (labeled rows; NaN when there are none). Terms not computed ("px", "energy_sample" for
        "ce") are NaN.

    Raises:
        ValueError: unknown objective, missing ``x_q``, or shape mismatches.
    """
    return batch_loss(
        model,
        Batch(x, y, labeled, x_px),
        Objective(objective, w_px, w_pyx, l2_energy),
        x_q=x_q,
        y_q=y_q,
        joint_forward=joint_forward,
    )


def batch_loss(
    model: nn.Module,
    batch: Batch,
    objective: Objective,
    x_q: Tensor | None = None,
    y_q: Tensor | None = None,
    joint_forward: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of ``objective`` on ``batch`` with the samples ``x_q`` (labels ``y_q`` for the
    factored objective, default ``batch.y``), and its terms; see :func:`jem_loss`."""
    x, x_px = batch.x, batch.x_px
    y, labeled = _checked_labels(
        objective.name, x, batch.y, batch.labeled, x_q, objective.w_px, y_q, x_px
    )
    spec = _OBJECTIVES[objective.name]
    logits, logits_q = _forward(model, x, x_q if spec.generative else None, joint_forward)
    e_data, ce = ops.energy_ce(logits, y)  # E(x) = -lse, ce = lse - f(x)[y]
    e_data, ce = _widen(e_data), _widen(ce)  # half logits (autocast): terms in float32
    e_px, ce_px = e_data, ce
    if spec.generative and x_px is not None:
        e_px, ce_px = (_widen(t) for t in ops.energy_ce(model(x_px), y))
    shared = BatchTerms(
        labeled=labeled,
        ce_mean=_masked_mean(ce, labeled),
        e_data=e_data,
        e_px=e_px,
        ce_px=ce_px,
        logits_q=logits_q,
        y_q=y if y_q is None else y_q.to(x.device, torch.int64),
    )
    out = spec.loss(shared, objective)
    nan = torch.full((), math.nan, dtype=e_data.dtype, device=logits.device)
    terms = torch.stack(
        [
            out.loss.detach(),
            shared.ce_mean.detach(),
            nan if out.px is None else out.px.detach(),
            out.energy_data.detach(),
            nan if out.energy_sample is None else out.energy_sample.detach(),
            _accuracy(logits, y, labeled),
        ]
    ).double()
    return out.loss, dict(zip(_TERM_NAMES, _read_terms(terms)))


def _read_terms(terms: Tensor) -> list[float]:
    """The float64 terms as host floats: one host sync for all of them. On a GPU the device's
    label record (see :func:`jem_ext.ops.raise_label_errors`) travels in the same copy, so a
    label out of range raises here, as the CPU kernels raise at once."""
    if terms.device.type == "cpu":
        return terms.tolist()
    record = ops.label_error_record(terms.device)
    host = torch.cat([terms.view(torch.int64), record]).cpu()
    ops.check_label_record(host[terms.numel() :])
    return host[: terms.numel()].view(torch.float64).tolist()


def _checked_labels(
    objective: str,
    x: Tensor,
    y: Tensor,
    labeled: Tensor | None,
    x_q: Tensor | None,
    w_px: float,
    y_q: Tensor | None,
    x_px: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Check the arguments of :func:`jem_loss`; labels as int64 (0 on unlabeled rows) and the
    mask as bool, on ``x``'s device."""
    if objective not in OBJECTIVES:
        raise ValueError(f"jem_loss: objective must be one of {OBJECTIVES}, got {objective!r}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"jem_loss: y must have shape [{x.shape[0]}], got {tuple(y.shape)}")
    y = y.to(device=x.device, dtype=torch.int64)
    if labeled is not None:
        if labeled.shape != (x.shape[0],):
            raise ValueError(
                f"jem_loss: labeled must have shape [{x.shape[0]}], got {tuple(labeled.shape)}"
            )
        labeled = labeled.to(device=x.device, dtype=torch.bool)
        y = torch.where(labeled, y, torch.zeros_like(y))  # unlabeled rows may hold -1
    spec = _OBJECTIVES[objective]
    if not spec.generative:
        return y, labeled
    if x_q is None and (w_px != 0 or spec.conditional):
        raise ValueError(f"jem_loss: objective {objective!r} with w_px={w_px} needs samples x_q")
    if spec.conditional and y_q is not None and y_q.shape != (x_q.shape[0],):
        raise ValueError(f"jem_loss: y_q must have shape [{x_q.shape[0]}], got {tuple(y_q.shape)}")
    if x_px is not None and x_px.shape != x.shape:
        raise ValueError(
            f"jem_loss: x_px must have the shape of x {tuple(x.shape)}, got {tuple(x_px.shape)}"
        )
    return y, labeled


def _accuracy(logits: Tensor, y: Tensor, labeled: Tensor | None) -> Tensor:
    """Accuracy on the labeled rows, as a tensor (NaN when nothing is labeled)."""
    correct = (logits.detach().argmax(1) == y).float()
    if labeled is None:
        return correct.mean()
    m = labeled.float()
    return (correct * m).sum() / m.sum()


def _widen(t: Tensor) -> Tensor:
    """``t`` in float32 when it is a half type (energies of autocast logits), else as is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _forward(
    model: nn.Module, x: Tensor, x_q: Tensor | None, joint: bool
) -> tuple[Tensor, Tensor | None]:
    """``(f(x), f(x_q))``: two forwards, or one on ``cat([x, x_q])`` when ``joint``."""
    if x_q is None:
        return model(x), None
    if not joint:
        return model(x), model(x_q)
    both = model(torch.cat([x, x_q.to(x.dtype)]))
    return both[: x.shape[0]], both[x.shape[0] :]
