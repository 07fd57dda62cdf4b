"""Where fresh SGLD chains start: uniform noise on ``[-1, 1]^D`` (:class:`UniformInit`, JEM)
or per-class Gaussians fitted to the data (:class:`GaussianInit`, the "informative" init of
JEM++), a mix of the two (:class:`MixedInit`), and the generator-aware random helpers they and
the replay buffer draw with.

Nothing here reads a tensor value on the host. Random numbers come from the ``generator``
argument when one is given (see :mod:`jem_ext.sampler`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .chain import DEFAULT_CLAMP

__all__ = ["INITS", "Initializer", "UniformInit", "GaussianInit", "MixedInit"]

# Names of the chain initialisations (:class:`UniformInit`, :class:`GaussianInit`).
INITS = ("uniform", "gaussian")

# ------------------------------------------------------------------ random helpers


def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """The device to draw on: the generator's if given, else ``device``."""
    return device if generator is None else generator.device


def _rand(shape: Sequence[int], generator, device, dtype=torch.float32) -> Tensor:
    device = torch.device(device)
    out = torch.rand(
        tuple(shape), generator=generator, device=_gen_device(generator, device), dtype=dtype
    )
    return out.to(device, non_blocking=True)


def _randn(shape: Sequence[int], generator, device, dtype=torch.float32) -> Tensor:
    device = torch.device(device)
    out = torch.randn(
        tuple(shape), generator=generator, device=_gen_device(generator, device), dtype=dtype
    )
    return out.to(device, non_blocking=True)


def _randint(high: int, shape: Sequence[int], generator, device) -> Tensor:
    device = torch.device(device)
    out = torch.randint(
        0, high, tuple(shape), generator=generator, device=_gen_device(generator, device)
    )
    return out.to(device, non_blocking=True)


# -------------------------------------------------------------------- initialisers


class Initializer(Protocol):
    """Where SGLD chains start: ``init(n, sample_shape, y=None, generator=None, device=None)``."""

    def __call__(
        self,
        n: int,
        sample_shape: Sequence[int] | None = None,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: Any = None,
    ) -> Tensor: ...


class UniformInit:
    """Uniform noise on ``[low, high]^D``, the JEM initialisation (by default JEM's data range
    ``[-1, 1]``, :data:`jem_ext.chain.DEFAULT_CLAMP`).

    Args:
        low, high: bounds, ``low < high``.
    """

    def __init__(self, low: float = DEFAULT_CLAMP[0], high: float = DEFAULT_CLAMP[1]) -> None:
        if not low < high:
            raise ValueError(f"UniformInit: expected low < high, got low={low}, high={high}")
        self.low = float(low)
        self.high = float(high)

    def __call__(
        self,
        n: int,
        sample_shape: Sequence[int] | None = None,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: Any = None,
    ) -> Tensor:
        """``n`` samples of shape ``sample_shape`` (float32, on ``device``); ``y`` is ignored."""
        if sample_shape is None:
            raise ValueError("UniformInit: sample_shape is required")
        device = torch.device("cpu" if device is None else device)
        u = _rand((n, *sample_shape), generator, device)
        return u.mul_(self.high - self.low).add_(self.low)

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": "uniform", "low", "high"}``."""
        return {"kind": "uniform", "low": self.low, "high": self.high}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.__init__(d["low"], d["high"])

    def __repr__(self) -> str:
        return f"UniformInit(low={self.low}, high={self.high})"


class GaussianInit:
    """Per-class Gaussians fitted to the data: the "informative" initialisation of JEM++.

    Class ``k`` has mean ``mean[k]`` and covariance ``chol[k] @ chol[k].T`` over the flattened
    sample; samples are clamped to ``[clamp_min, clamp_max]`` (``[-1, 1]`` by default). Build it
    with :meth:`fit`. Memory is ``num_classes * D^2`` floats (about 380 MB for CIFAR-10).

    Args:
        mean: ``[C, D]`` class means.
        chol: ``[C, D, D]`` lower Cholesky factors of the class covariances.
        prior: ``[C]`` class probabilities used when ``y`` is not given (uniform by default).
        sample_shape: shape of one sample (``prod == D``).
        clamp: ``(lo, hi)`` or None.
    """

    def __init__(
        self,
        mean: Tensor,
        chol: Tensor,
        prior: Tensor | None = None,
        sample_shape: Sequence[int] | None = None,
        clamp: tuple[float, float] | None = DEFAULT_CLAMP,
    ) -> None:
        if mean.dim() != 2 or chol.shape != (*mean.shape, mean.shape[1]):
            raise ValueError(
                f"GaussianInit: expected mean [C, D] and chol [C, D, D], got "
                f"{tuple(mean.shape)} and {tuple(chol.shape)}"
            )
        c, d = mean.shape
        self.mean = mean.float()
        self.chol = chol.float()
        self.prior = (torch.full((c,), 1.0 / c) if prior is None else prior.float()).to(
            self.mean.device
        )
        self.sample_shape = tuple(int(s) for s in (sample_shape or (d,)))
        if math.prod(self.sample_shape) != d:
            raise ValueError(
                f"GaussianInit: sample_shape {self.sample_shape} does not hold {d} values"
            )
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))

    @property
    def _chol_t(self) -> Tensor:
        # chol stacked as [C*D, D] and transposed (a view): one matmul gives every class' sample
        c, d = self.mean.shape
        return self.chol.reshape(c * d, d).t()

    @property
    def num_classes(self) -> int:
        """Number of fitted classes."""
        return int(self.mean.shape[0])

    @classmethod
    def fit(
        cls,
        x: Tensor,
        y: Tensor,
        num_classes: int,
        ridge: float = 1e-4,
        clamp: tuple[float, float] | None = DEFAULT_CLAMP,
    ) -> GaussianInit:
        """Fit per-class mean and full covariance to data ``x`` ``[N, *shape]`` with labels ``y``.

        The covariance (unbiased, computed in float64 on the CPU) gets ``ridge * I`` added so that
        it is positive definite even for constant pixels; class priors are the label frequencies.

        Raises:
            ValueError: a class has fewer than two samples, labels out of range, or the
                covariance is not positive definite even with the ridge.
        """
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"GaussianInit.fit: x has {x.shape[0]} rows but y has {y.shape[0]}")
        if ridge < 0:
            raise ValueError(f"GaussianInit.fit: ridge must be >= 0, got {ridge}")
        xf = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
        yc = y.detach().to("cpu", torch.int64)
        if yc.numel() and (int(yc.min()) < 0 or int(yc.max()) >= num_classes):
            raise ValueError(f"GaussianInit.fit: labels must lie in [0, {num_classes})")
        d = xf.shape[1]
        means, chols, counts = [], [], []
        eye = torch.eye(d, dtype=torch.float64)
        for k in range(num_classes):
            xk = xf[yc == k]
            if xk.shape[0] < 2:
                raise ValueError(
                    f"GaussianInit.fit: class {k} has {xk.shape[0]} samples; need at least 2"
                )
            mu = xk.mean(0)
            xc = xk - mu
            cov = xc.t() @ xc / (xk.shape[0] - 1) + ridge * eye
            chol, info = torch.linalg.cholesky_ex(cov)
            if int(info) != 0:
                raise ValueError(
                    f"GaussianInit.fit: covariance of class {k} is not positive definite; "
                    "use a larger ridge"
                )
            means.append(mu)
            chols.append(chol)
            counts.append(xk.shape[0])
        prior = torch.tensor(counts, dtype=torch.float64)
        return cls(
            torch.stack(means), torch.stack(chols), prior / prior.sum(), tuple(x.shape[1:]), clamp
        )

    def to(self, device: Any) -> GaussianInit:
        """Move the fitted parameters to ``device`` (in place); returns self."""
        self.mean = self.mean.to(device)
        self.chol = self.chol.to(device)
        self.prior = self.prior.to(device)
        return self

    def __call__(
        self,
        n: int,
        sample_shape: Sequence[int] | None = None,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: Any = None,
    ) -> Tensor:
        """``n`` samples of class ``y`` (int64 ``[n]``; drawn from the prior when None).

        ``sample_shape`` may be omitted; when given it must match the fitted shape.
        """
        if sample_shape is not None and tuple(sample_shape) != self.sample_shape:
            raise ValueError(
                f"GaussianInit: fitted for samples of shape {self.sample_shape}, "
                f"asked for {tuple(sample_shape)}"
            )
        device = self.mean.device if device is None else torch.device(device)
        if self.mean.device != device:
            self.to(device)
        c, d = self.mean.shape
        if y is None:
            gd = _gen_device(generator, device)
            y = torch.multinomial(self.prior.to(gd), n, replacement=True, generator=generator)
        y = y.to(device, torch.int64)
        z = _randn((n, d), generator, device)
        # every class' sample for each row, then pick row b's class: [n, C, D] -> [n, D]
        all_k = (z @ self._chol_t).view(n, c, d)
        x = all_k.gather(1, y.view(n, 1, 1).expand(n, 1, d)).squeeze(1) + self.mean[y]
        if self.clamp is not None:
            x = x.clamp_(self.clamp[0], self.clamp[1])
        return x.view(n, *self.sample_shape)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (``torch.load(weights_only=True)``-safe)."""
        return {
            "kind": "gaussian",
            "mean": self.mean.cpu(),
            "chol": self.chol.cpu(),
            "prior": self.prior.cpu(),
            "sample_shape": list(self.sample_shape),
            "clamp": None if self.clamp is None else list(self.clamp),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (keeps the current device)."""
        device = self.mean.device
        self.__init__(
            d["mean"],
            d["chol"],
            d["prior"],
            d["sample_shape"],
            None if d["clamp"] is None else tuple(d["clamp"]),
        )
        self.to(device)

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> GaussianInit:
        """Build from :meth:`state_dict` output."""
        return cls(
            d["mean"],
            d["chol"],
            d["prior"],
            d["sample_shape"],
            None if d["clamp"] is None else tuple(d["clamp"]),
        )

    def __repr__(self) -> str:
        return f"GaussianInit(num_classes={self.num_classes}, sample_shape={self.sample_shape})"


class MixedInit:
    """Chains from ``informative`` (e.g. per-class Gaussians), each of them started from
    ``noise`` instead with probability ``noise_frac``.

    Chains that start near the data reach it in a few SGLD steps, but a model trained only on
    such negatives never sees noise as one and may rate it likelier than the data; the noise
    chains keep it shown. Each chain's choice is drawn with ``generator``.

    Args:
        informative: the main initializer.
        noise: the initializer of the noise chains (``UniformInit`` on the data range).
        noise_frac: probability that a chain starts from ``noise``, in ``[0, 1]``.
    """

    def __init__(self, informative: Any, noise: UniformInit, noise_frac: float) -> None:
        if not 0.0 <= noise_frac <= 1.0:
            raise ValueError(f"MixedInit: noise_frac must be in [0, 1], got {noise_frac}")
        self.informative = informative
        self.noise = noise
        self.noise_frac = float(noise_frac)

    @property
    def num_classes(self) -> int:
        return self.informative.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.informative.sample_shape

    def __call__(
        self,
        n: int,
        sample_shape: Sequence[int] | None = None,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: Any = None,
    ) -> Tensor:
        """``n`` chains' starts: the informative init's, a ``noise_frac`` share replaced."""
        x = self.informative(n, sample_shape, y=y, generator=generator, device=device)
        u = self.noise(n, x.shape[1:], generator=generator, device=x.device)
        pick = _rand((n,), generator, x.device) < self.noise_frac
        return torch.where(pick.view(n, *([1] * (x.dim() - 1))), u, x)

    def to(self, device: Any) -> MixedInit:
        """Move the informative init's parameters to ``device``; returns self."""
        if hasattr(self.informative, "to"):
            self.informative.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": "mixed", "noise_frac", "informative", "noise"}`` (nested states)."""
        return {
            "kind": "mixed",
            "noise_frac": self.noise_frac,
            "informative": self.informative.state_dict(),
            "noise": self.noise.state_dict(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.informative.load_state_dict(d["informative"])
        self.noise.load_state_dict(d["noise"])
        self.noise_frac = float(d["noise_frac"])

    def __repr__(self) -> str:
        return f"MixedInit({self.informative!r}, {self.noise!r}, noise_frac={self.noise_frac})"


def _init_from_state(d: dict[str, Any] | None):
    if d is None:
        return None
    if d.get("kind") == "mixed":
        return MixedInit(
            _init_from_state(d["informative"]), _init_from_state(d["noise"]), d["noise_frac"]
        )
    if d.get("kind") == "uniform":
        return UniformInit(d["low"], d["high"])
    if d.get("kind") == "gaussian":
        return GaussianInit.from_state_dict(d)
    raise ValueError(f"unknown initializer state kind {d.get('kind')!r}")
