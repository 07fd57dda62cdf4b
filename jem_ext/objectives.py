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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["OBJECTIVES", "jem_loss"]

OBJECTIVES = ("jem", "factored", "ce")

_TERM_NAMES = ("loss", "ce", "px", "energy_data", "energy_sample", "accuracy")


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
    """The JEM loss of one batch and its terms.

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
    y, labeled = _checked_labels(objective, x, y, labeled, x_q, w_px)
    if objective == "ce":
        x_q = None
    logits, logits_q = _forward(model, x, x_q, joint_forward)
    e_data, ce = ops.energy_ce(logits, y)  # E(x) = -lse, ce = lse - f(x)[y]
    e_data, ce = _widen(e_data), _widen(ce)  # half logits (autocast): terms in float32
    ce_mean = _masked_mean(ce, labeled)
    accuracy = _accuracy(logits, y, labeled)
    nan = torch.full((), math.nan, dtype=e_data.dtype, device=logits.device)
    px, e_data_mean, e_q_mean = nan, e_data.mean(), nan
    if objective == "ce":
        loss = w_pyx * ce_mean
    else:
        if x_px is not None:
            if x_px.shape != x.shape:
                raise ValueError(
                    f"jem_loss: x_px must have the shape of x {tuple(x.shape)}, "
                    f"got {tuple(x_px.shape)}"
                )
            e_data, ce = ops.energy_ce(model(x_px), y)
            e_data, ce = _widen(e_data), _widen(ce)
            e_data_mean = e_data.mean()
        e_d, e_d_mean = _data_energies(objective, e_data, e_data_mean, ce, labeled)
        if objective == "factored":
            e_data_mean = e_d_mean
        loss = w_pyx * ce_mean if objective == "jem" else 0.0 * ce_mean
        if x_q is not None:
            e_q = _sample_energies(logits_q, objective, y if y_q is None else y_q)
            e_q_mean = e_q.mean()
            px = e_d_mean - e_q_mean
            loss = loss + w_px * px
            if l2_energy:
                sq_d = _masked_mean(e_d.pow(2), labeled if objective == "factored" else None)
                loss = loss + l2_energy * (sq_d + e_q.pow(2).mean())

    terms = torch.stack(
        [
            loss.detach(),
            ce_mean.detach(),
            px.detach(),
            e_data_mean.detach(),
            e_q_mean.detach(),
            accuracy,
        ]
    ).double()
    return loss, dict(zip(_TERM_NAMES, _read_terms(terms)))


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
    objective: str, x: Tensor, y: Tensor, labeled: Tensor | None, x_q: Tensor | None, w_px: float
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
    if objective != "ce" and w_px != 0 and x_q is None:
        raise ValueError(f"jem_loss: objective {objective!r} with w_px={w_px} needs samples x_q")
    return y, labeled


def _accuracy(logits: Tensor, y: Tensor, labeled: Tensor | None) -> Tensor:
    """Accuracy on the labeled rows, as a tensor (NaN when nothing is labeled)."""
    correct = (logits.detach().argmax(1) == y).float()
    if labeled is None:
        return correct.mean()
    m = labeled.float()
    return (correct * m).sum() / m.sum()


def _data_energies(
    objective: str, e_data: Tensor, e_data_mean: Tensor, ce: Tensor, labeled: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-row data energies of the generative term and their mean: ``E(x)`` for "jem",
    ``E(x, y) = -f(x)[y] = E(x) + CE`` on the labeled rows for "factored"."""
    if objective == "jem":
        return e_data, e_data_mean
    e_d = e_data + ce
    return e_d, _masked_mean(e_d, labeled)


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


def _sample_energies(logits_q: Tensor, objective: str, y_q: Tensor) -> Tensor:
    """Energies of the samples (float32 at least) from their logits: ``E(x_q)`` for "jem",
    ``E(x_q, y_q)`` for "factored"."""
    if objective == "jem":
        return _widen(ops.energy(logits_q))
    n = logits_q.shape[0]
    if y_q.shape != (n,):
        raise ValueError(f"jem_loss: y_q must have shape [{n}], got {tuple(y_q.shape)}")
    return _widen(ops.energy(logits_q, y_q.to(logits_q.device, torch.int64)))
