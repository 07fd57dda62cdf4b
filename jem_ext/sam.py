"""Sharpness-aware minimisation (SAM) around any torch optimiser, with the adaptive variant.

SAM (Foret et al., ICLR 2021) minimises the loss at the worst point of a small neighbourhood of
the weights instead of the loss at the weights. Each update takes two gradients:

1. ``first_step``: with the gradient ``g`` of the loss at ``w``, move to the ascent point
   ``w + e(w)`` with ``e(w) = rho * T(w)^2 g / ||T(w) g||``, where the norm runs over all
   parameters together and ``T(w)`` is the identity (SAM) or the element-wise ``|w|``
   (adaptive SAM, ASAM, Kwon et al., ICML 2021: the neighbourhood scales with each weight, so
   the sharpness it measures does not change when a layer's weights are rescaled).
2. ``second_step``: with the gradient at ``w + e(w)``, go back to ``w`` and let the base
   optimiser (SGD, Adam, ...) take its usual step, weight decay and momentum included.

SADA-JEM (Yang, Su and Ji, CVPR 2023) trains JEM this way with ``rho = 2`` and the adaptive
variant, on both the cross-entropy and the ``E(x_data) - E(x_sample)`` terms; the second
gradient reuses the same data batch and the same SGLD samples.

Use::

    opt = SAM(model.parameters(), torch.optim.SGD, rho=2.0, adaptive=True, lr=0.1, momentum=0.9)
    loss_fn(model).backward()
    opt.step(lambda: _backward(loss_fn(model)))   # first_step, closure, second_step

or call ``first_step(zero_grad=True)``, the second backward pass, and ``second_step()`` by
hand. :meth:`SAM.state_dict` holds the base optimiser's state (momentum, Adam moments) and the
SAM settings, so a run resumed from a checkpoint continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["SAM"]

# Added to the gradient norm in the denominator of e(w), so a zero gradient gives no move.
_NORM_EPS = 1e-12


class SAM(torch.optim.Optimizer):
    """Sharpness-aware wrapper around a base optimiser (see the module docstring).

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``/``adaptive``).
        base_optimizer: the base optimiser's class (or any callable taking the parameter
            groups and ``**base_kwargs`` and returning an optimiser).
        rho: radius of the neighbourhood (>= 0; 0 makes SAM the base optimiser).
        adaptive: use the scale-invariant ASAM neighbourhood ``T(w) = |w|``.
        **base_kwargs: the base optimiser's settings (``lr``, ``momentum``, ``weight_decay``...).

    The wrapper and the base optimiser share one list of parameter groups, so a learning-rate
    schedule that writes ``group["lr"]`` into :attr:`param_groups` reaches the base optimiser.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"rho: expected >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self._saved: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        """``||T(w) g||`` over every parameter that has a gradient."""
        norms = [
            ((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter to its ascent point ``w + e(w)`` (gradients must be set)."""
        if self._saved:
            raise RuntimeError("SAM.first_step called twice without second_step in between")
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + _NORM_EPS)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._saved[p] = p.detach().clone()
                weight = p.square() if group["adaptive"] else 1.0
                p.add_(weight * p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and take the base optimiser's step with the gradient now in ``.grad``."""
        for p, w in self._saved.items():
            p.copy_(w)
        self._saved.clear()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM update.

        The gradient at ``w`` must already be in ``.grad``; ``closure`` re-computes the loss
        at the ascent point and calls ``backward()`` on it (it runs with gradients enabled).

        Returns:
            What ``closure`` returns (the loss at the ascent point).
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and its gradient")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state and parameter groups (which carry ``rho``/``adaptive``)."""
        if self._saved:
            raise RuntimeError(
                "SAM.state_dict between first_step and second_step: the "
                "parameters are at the ascent point"
            )
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (the base optimiser's layout)."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self._saved.clear()
