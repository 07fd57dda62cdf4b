"""Adversarial robustness: PGD attacks and the SGLD-refined classifier of JEM.

JEM's robustness experiment (Grathwohl et al. 2020, section 5.3) classifies an input after
running K SGLD steps on log p(x) = logsumexp_y f(x)[y] from it, averaged over several noisy
chains, and attacks that whole procedure with PGD by differentiating through the refinement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..chain import DEFAULT_CLAMP, DEFAULT_NOISE_STD, DEFAULT_STEP_SIZE, ChainSpec
from ..ops import energy

__all__ = ["pgd_attack", "SGLDRefinedClassifier", "robust_accuracy"]

_NORMS = ("linf", "l2")


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample of ``t``, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _random_start(
    x: torch.Tensor, norm: str, eps: float, generator: torch.Generator | None
) -> torch.Tensor:
    """A perturbation drawn uniformly from the eps-box (L-inf) or the eps-ball (L2)."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2.0 * u - 1.0) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
    u = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
    radius = eps * u.pow(1.0 / x[0].numel())
    return direction * radius.view(-1, *([1] * (x.dim() - 1)))


def _project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project each sample of ``delta`` onto the eps-box (L-inf) or the eps-ball (L2)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def pgd_attack(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    clamp: tuple[float, float] | None = DEFAULT_CLAMP,
    generator: torch.Generator | None = None,
    eot_samples: int = 1,
) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy of ``model(x_adv)`` (Madry et al. 2018).

    Each step computes g = d/dx_adv CE(model(x_adv), y) and moves

    - ``"linf"``: x_adv <- x_adv + step_size * sign(g), then projects onto the box
      ||x_adv - x||_inf <= eps;
    - ``"l2"``: x_adv <- x_adv + step_size * g / ||g||_2 (per sample), then projects onto
      the ball ||x_adv - x||_2 <= eps;

    and finally clamps x_adv to the data range ``clamp`` (for x inside that range this keeps
    the perturbation inside the eps-ball/box). With ``random_start`` the attack starts from a
    point drawn uniformly inside the eps-ball/box. ``eps = 0`` returns ``x`` unchanged.

    Stochastic models (e.g. :class:`SGLDRefinedClassifier`) are called afresh at every step,
    so the attack follows the expectation over their noise across steps; ``eot_samples > 1``
    additionally averages the gradient over that many calls per step (Expectation over
    Transformation). The model's mode (train/eval) is left as is, gradients are taken with
    respect to the input only (parameters' ``.grad`` are untouched).

    Args:
        model: callable mapping ``x`` to logits ``[N, K]``, differentiable w.r.t. its input.
        x: clean inputs ``[N, ...]``.
        y: integer labels ``[N]``.
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the threat model.
        steps: number of gradient steps.
        step_size: step length (in the norm's units).
        random_start: start from a uniform random point of the eps-ball instead of ``x``.
        clamp: ``(low, high)`` data range, or ``None`` for unbounded inputs.
        generator: random generator for the start point (must live on ``x.device``).
        eot_samples: gradient evaluations averaged per step.

    Returns:
        Adversarial inputs, detached, with the shape and dtype of ``x``.
    """
    _check_attack(norm, eps, steps, step_size, eot_samples)
    x = x.detach()
    if eps == 0:
        return x.clone()
    x_adv = x.clone()
    if random_start:
        x_adv = _to_range(x + _random_start(x, norm, eps, generator), clamp)
    for _ in range(steps):
        grad = _loss_gradient(model, x_adv, y, eot_samples)
        x_adv = _ascent_step(x_adv.detach(), grad, norm, step_size)
        x_adv = _to_range(x + _project(x_adv - x, norm, eps), clamp)
    return x_adv.detach()


def _check_attack(norm: str, eps: float, steps: int, step_size: float, eot_samples: int) -> None:
    """Raise ValueError unless the attack's settings are usable."""
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if eps < 0 or steps < 0 or step_size < 0 or eot_samples < 1:
        raise ValueError(
            f"need eps, steps, step_size >= 0 and eot_samples >= 1, got eps={eps}, "
            f"steps={steps}, step_size={step_size}, eot_samples={eot_samples}"
        )


def _to_range(t: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    """``t`` clamped to the data range (unchanged for unbounded inputs)."""
    return t if clamp is None else t.clamp(*clamp)


def _loss_gradient(
    model: Callable[[torch.Tensor], torch.Tensor],
    x_adv: torch.Tensor,
    y: torch.Tensor,
    eot_samples: int,
) -> torch.Tensor:
    """d/dx_adv of the summed cross-entropy, summed over ``eot_samples`` calls of ``model``.

    Summing instead of averaging the EOT gradients is equivalent: both step rules are
    invariant to the gradient's scale."""
    x_adv.requires_grad_(True)
    grad = torch.zeros_like(x_adv)
    with torch.enable_grad():
        for _ in range(eot_samples):
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
            grad += torch.autograd.grad(loss, x_adv)[0]
    return grad


def _ascent_step(
    x_adv: torch.Tensor, grad: torch.Tensor, norm: str, step_size: float
) -> torch.Tensor:
    """One step up the loss: along sign(g) (L-inf) or g / ||g||_2 per sample (L2)."""
    if norm == "linf":
        return x_adv + step_size * grad.sign()
    return x_adv + step_size * grad / _per_sample_norm(grad).clamp_min(1e-12)


class SGLDRefinedClassifier(nn.Module):
    """A classifier that first refines its input with SGLD on log p(x) = logsumexp f(x).

    For each of ``n_chains`` noisy copies x_0 = x + sigma * randn, runs ``n_steps`` (K) steps

        x_{k+1} = x_k + step_size * d/dx logsumexp_y f(x_k)[y] + noise_std * randn

    and returns the mean over the chains of the logits f(x_K). The steps are differentiable
    (``torch.autograd.grad(..., create_graph=True)``) whenever gradients are enabled, so PGD
    can backpropagate through the refinement; under ``torch.no_grad()`` the refinement still
    runs (gradients w.r.t. x are needed) but without keeping the graph. ``n_steps = 0`` gives
    the mean of f over the noisy copies (plain f when sigma is 0).

    The wrapped classifier is kept in eval mode: calling ``train()`` on the wrapper does not
    switch it to training mode. The chains are batched, so memory grows with ``n_chains``.

    Args:
        f: classifier returning logits ``[N, K]``.
        n_steps: number of SGLD steps K.
        step_size: SGLD step on the gradient of log p(x) (default: JEM's).
        noise_std: standard deviation of the SGLD noise (default: JEM's).
        sigma: standard deviation of the noise added to x to start each chain.
        n_chains: number of chains averaged.
        chain: the chain as one :class:`~jem_ext.chain.ChainSpec` (replaces ``n_steps``,
            ``step_size`` and ``noise_std``); its gradient clip bounds each step's gradient
            element-wise and its clamp bounds each state, as in the sampler's chains.
    """

    def __init__(
        self,
        f: nn.Module,
        n_steps: int = 0,
        step_size: float = DEFAULT_STEP_SIZE,
        noise_std: float = DEFAULT_NOISE_STD,
        sigma: float = 0.0,
        n_chains: int = 1,
        *,
        chain: ChainSpec | None = None,
    ) -> None:
        super().__init__()
        if chain is None:
            chain = ChainSpec(n_steps, step_size, noise_std)
        n_steps, step_size, noise_std = chain.n_steps, chain.step_size, chain.noise_std
        if n_steps < 0 or n_chains < 1:
            raise ValueError(f"need n_steps >= 0 and n_chains >= 1, got {n_steps}, {n_chains}")
        self.f = f
        self.n_steps = n_steps
        self.step_size = step_size
        self.noise_std = noise_std
        self.clamp, self.grad_clip = chain.clamp, chain.grad_clip
        self.sigma = sigma
        self.n_chains = n_chains
        self.f.eval()

    def train(self, mode: bool = True) -> SGLDRefinedClassifier:
        """Set the wrapper's mode while keeping the wrapped classifier in eval mode."""
        super().train(mode)
        self.f.eval()
        return self

    def refine(self, x: torch.Tensor) -> torch.Tensor:
        """Run the K SGLD steps from ``x`` (one chain per row); differentiable if grad is on."""
        create_graph = torch.is_grad_enabled()
        x_k = x
        with torch.enable_grad():
            for _ in range(self.n_steps):
                if not create_graph:
                    x_k = x_k.detach()
                if not x_k.requires_grad:
                    x_k.requires_grad_(True)
                # -energy(logits) == logsumexp(logits, 1); the fused op supports double backward.
                log_px = -energy(self.f(x_k)).sum()
                (grad,) = torch.autograd.grad(log_px, x_k, create_graph=create_graph)
                if self.grad_clip is not None:
                    grad = grad.clamp(-self.grad_clip, self.grad_clip)
                x_k = x_k + self.step_size * grad
                if self.noise_std > 0:
                    x_k = x_k + self.noise_std * torch.randn_like(x_k)
                if self.clamp is not None:
                    x_k = x_k.clamp(*self.clamp)
        return x_k if create_graph else x_k.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over chains of f(x_K), logits ``[N, K]``."""
        n = x.shape[0]
        chains = x.unsqueeze(1).expand(n, self.n_chains, *x.shape[1:]).reshape(-1, *x.shape[1:])
        if self.sigma > 0:
            chains = chains + self.sigma * torch.randn_like(chains)
        logits = self.f(self.refine(chains))
        return logits.view(n, self.n_chains, -1).mean(dim=1)


@torch.no_grad()
def robust_accuracy(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    eps_list: Sequence[float],
    steps: int,
    step_size: float | Callable[[float], float],
    batch_size: int,
    device: torch.device | str | None = None,
    random_start: bool = True,
    clamp: tuple[float, float] | None = DEFAULT_CLAMP,
    generator: torch.Generator | None = None,
    eot_samples: int = 1,
    desc: str = "PGD",
    progress: bool = True,
) -> list[tuple[float, float]]:
    """Accuracy of ``model`` under :func:`pgd_attack` for each radius in ``eps_list``.

    Every batch of ``x`` is attacked (on ``device``, default: where ``x`` is) and the
    adversarial batch is classified by one more call of ``model``; ``eps = 0`` gives the clean
    accuracy. ``step_size`` is a number or a function of eps (e.g. ``lambda e: 2.5 * e /
    steps``). The other arguments are passed to :func:`pgd_attack`. A tqdm bar counts
    attacked samples over all radii.

    Returns:
        ``[(eps, accuracy), ...]`` in the order of ``eps_list``, accuracies as fractions.
    """
    if batch_size < 1 or len(x) == 0:
        raise ValueError(f"need batch_size >= 1 and a non-empty x, got {batch_size}, {len(x)}")
    device = x.device if device is None else torch.device(device)
    results = []
    with tqdm(total=len(eps_list) * len(x), desc=desc, unit="img", disable=not progress) as bar:
        for eps in eps_list:
            size = step_size(eps) if callable(step_size) else step_size
            correct = 0
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size].to(device)
                yb = y[start : start + batch_size].to(device)
                x_adv = pgd_attack(
                    model,
                    xb,
                    yb,
                    norm=norm,
                    eps=eps,
                    steps=steps,
                    step_size=size,
                    random_start=random_start,
                    clamp=clamp,
                    generator=generator,
                    eot_samples=eot_samples,
                )
                correct += (model(x_adv).argmax(dim=1) == yb).sum().item()
                bar.update(len(xb))
            results.append((float(eps), correct / len(x)))
    return results
