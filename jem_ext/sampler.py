"""SGLD sampling from a JEM classifier read as an energy model.

The pieces, in the order the paper's algorithm uses them:

* :class:`UniformInit`, :class:`GaussianInit` -- where chains start: uniform noise on
  ``[-1, 1]^D`` (JEM) or per-class Gaussians fitted to the data ("informative" init, JEM++).
* :class:`ReplayBuffer` -- the persistent contrastive-divergence buffer: chains start from
  stored samples, a fraction ``reinit_prob`` of them re-initialised each time; optionally split
  into one sub-buffer per class for class-conditional sampling.
* :func:`sgld_chain` -- ``n_steps`` of ``x <- x - s * dE/dx + sigma * N(0, I)`` (optionally with
  the gradient clipped and ``x`` clamped: the proximal SGLD of JEM++), with the energy
  ``E(x) = -logsumexp f(x)`` or ``E(x, y) = -f(x)[y]`` of :mod:`jem_ext.ops`.
* :class:`SGLDSampler` -- buffer (or short-run init) + chain + write-back, with a state dict.

Everything that runs per step or per batch stays on the model's device and never reads a tensor
value on the host (no ``.item()``, no branching on tensor values, no CPU-side buffer), so the
chain can be captured in a CUDA graph. Random numbers come from the ``generator`` argument when
one is given: it should live on the buffer's / model's device (a CPU generator also works with a
CUDA buffer, at the cost of host-to-device copies of the random draws).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from . import ops

__all__ = [
    "INITS",
    "Initializer",
    "UniformInit",
    "GaussianInit",
    "ReplayBuffer",
    "SGLDSampler",
    "sgld_chain",
    "sgld_steps_",
    "sample_from_noise",
]


# Names of the chain initialisations (:class:`UniformInit`, :class:`GaussianInit`).
INITS = ("uniform", "gaussian")


# ------------------------------------------------------------------ random helpers


def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """The device to draw on: the generator's if given, else ``device``."""
    return device if generator is None else generator.device


def _rand(shape: Sequence[int], generator, device, dtype=torch.float32) -> Tensor:
    device = torch.device(device)
    out = torch.rand(tuple(shape), generator=generator, device=_gen_device(generator, device),
                     dtype=dtype)
    return out.to(device, non_blocking=True)


def _randn(shape: Sequence[int], generator, device, dtype=torch.float32) -> Tensor:
    device = torch.device(device)
    out = torch.randn(tuple(shape), generator=generator, device=_gen_device(generator, device),
                      dtype=dtype)
    return out.to(device, non_blocking=True)


def _randint(high: int, shape: Sequence[int], generator, device) -> Tensor:
    device = torch.device(device)
    out = torch.randint(0, high, tuple(shape), generator=generator,
                        device=_gen_device(generator, device))
    return out.to(device, non_blocking=True)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


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
    """Uniform noise on ``[low, high]^D``, the JEM initialisation (``[-1, 1]`` for images).

    Args:
        low, high: bounds, ``low < high``.
    """

    def __init__(self, low: float = -1.0, high: float = 1.0) -> None:
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
        clamp: tuple[float, float] | None = (-1.0, 1.0),
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
        clamp: tuple[float, float] | None = (-1.0, 1.0),
    ) -> "GaussianInit":
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

    def to(self, device: Any) -> "GaussianInit":
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
        self.__init__(d["mean"], d["chol"], d["prior"], d["sample_shape"],
                      None if d["clamp"] is None else tuple(d["clamp"]))
        self.to(device)

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "GaussianInit":
        """Build from :meth:`state_dict` output."""
        return cls(d["mean"], d["chol"], d["prior"], d["sample_shape"],
                   None if d["clamp"] is None else tuple(d["clamp"]))

    def __repr__(self) -> str:
        return f"GaussianInit(num_classes={self.num_classes}, sample_shape={self.sample_shape})"


def _init_from_state(d: dict[str, Any] | None):
    if d is None:
        return None
    if d.get("kind") == "uniform":
        return UniformInit(d["low"], d["high"])
    if d.get("kind") == "gaussian":
        return GaussianInit.from_state_dict(d)
    raise ValueError(f"unknown initializer state kind {d.get('kind')!r}")


# ----------------------------------------------------------------------- buffer


class ReplayBuffer:
    """Persistent SGLD replay buffer living on ``device``.

    Args:
        size: number of stored samples. With ``num_classes`` the buffer is split into
            ``size // num_classes`` rows per class (class ``k`` owns rows
            ``[k * per_class, (k + 1) * per_class)``), so ``.data`` has
            ``per_class * num_classes`` rows.
        sample_shape: shape of one sample, e.g. ``(3, 32, 32)``.
        num_classes: split the buffer by class (for class-conditional sampling), or None.
        device: where the samples live (the model's device).
        reinit_prob: probability that a drawn chain restarts from ``init`` instead.
        init: an initializer (default ``UniformInit(-1, 1)``); also fills the buffer at start.
        generator: optional generator for the initial fill.
    """

    def __init__(
        self,
        size: int,
        sample_shape: Sequence[int],
        num_classes: int | None = None,
        device: Any = "cpu",
        reinit_prob: float = 0.05,
        init: Initializer | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"ReplayBuffer: num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"ReplayBuffer: reinit_prob must lie in [0, 1], got {reinit_prob}")
        per = size // num_classes if num_classes else size
        if per < 1:
            raise ValueError(
                f"ReplayBuffer: size {size} too small"
                + (f" for {num_classes} classes" if num_classes else "")
            )
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.num_classes = num_classes
        self.per_class = per
        self.size = per * (num_classes or 1)
        self.device = torch.device(device)
        self.reinit_prob = float(reinit_prob)
        self.init = UniformInit() if init is None else init
        labels = self.labels
        self.data = self.init(self.size, self.sample_shape, y=labels, generator=generator,
                              device=self.device).to(self.device, torch.float32)

    @property
    def labels(self) -> Tensor | None:
        """Class of each row ``[size]`` (int64), or None for an unconditional buffer."""
        if self.num_classes is None:
            return None
        return torch.arange(self.num_classes, device=self.device).repeat_interleave(self.per_class)

    def sample(
        self,
        batch_size: int,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``batch_size`` chain starts; returns ``(x0, idx)``.

        Rows are drawn uniformly (from class ``y[b]``'s slice for a split buffer, where ``y`` is
        required); each row independently restarts from ``init`` with probability
        ``reinit_prob``. ``x0`` is a fresh tensor; pass ``idx`` to :meth:`update`.
        """
        if self.num_classes is not None:
            if y is None:
                raise ValueError("ReplayBuffer.sample: a class-split buffer needs labels y")
            y = y.to(self.device, torch.int64)
            if y.shape != (batch_size,):
                raise ValueError(
                    f"ReplayBuffer.sample: y must have shape [{batch_size}], got {tuple(y.shape)}"
                )
            idx = y * self.per_class + _randint(self.per_class, (batch_size,), generator,
                                                self.device)
        else:
            idx = _randint(self.size, (batch_size,), generator, self.device)
        x0 = self.data[idx]
        if self.reinit_prob > 0:
            fresh = self.init(batch_size, self.sample_shape, y=y, generator=generator,
                              device=self.device).to(x0.dtype)
            mask = _rand((batch_size,), generator, self.device) < self.reinit_prob
            x0 = torch.where(mask.view(-1, *([1] * len(self.sample_shape))), fresh, x0)
        return x0, idx

    def update(self, idx: Tensor, x: Tensor) -> None:
        """Write samples ``x`` back to rows ``idx`` (no host sync)."""
        self.data[idx.to(self.device)] = x.detach().to(self.device, self.data.dtype)

    def state_dict(self) -> dict[str, Any]:
        """``{"data", "num_classes", "per_class", "reinit_prob"}`` (weights_only-safe)."""
        return {
            "data": self.data.detach().cpu().clone(),
            "num_classes": self.num_classes,
            "per_class": self.per_class,
            "reinit_prob": self.reinit_prob,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore samples saved by :meth:`state_dict`; the layout must match.

        Raises:
            ValueError: different shape or class split.
        """
        data = d["data"]
        if tuple(data.shape) != tuple(self.data.shape) or d.get("num_classes") != self.num_classes:
            raise ValueError(
                f"ReplayBuffer.load_state_dict: saved buffer {tuple(data.shape)} with "
                f"num_classes={d.get('num_classes')} does not match {tuple(self.data.shape)} "
                f"with num_classes={self.num_classes}"
            )
        self.data.copy_(data.to(self.device))
        self.reinit_prob = float(d.get("reinit_prob", self.reinit_prob))

    def __len__(self) -> int:
        return self.size


# ------------------------------------------------------------------------ chain


def sgld_chain(
    model: nn.Module,
    x: Tensor,
    n_steps: int,
    step_size: float = 1.0,
    noise_std: float = 0.01,
    y: Tensor | None = None,
    clamp: tuple[float, float] | None = None,
    grad_clip: float | None = None,
    generator: torch.Generator | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Tensor:
    """Run ``n_steps`` SGLD steps on the energy of ``model`` from ``x``; returns a detached tensor.

    Each step: ``E = ops.energy(model(x), y)``, ``g = dE/dx`` by ``torch.autograd.grad`` (no
    parameter ``.grad`` is touched, no graph retained), then
    ``ops.sgld_step_(x, g, step_size, noise_std, *clamp, grad_clip, generator)``. ``x`` itself is
    not modified (the chain runs on a copy). The model is in eval mode during the chain and its
    previous mode is restored afterwards. The loop never reads tensor values on the host.

    Args:
        model: maps ``[B, *shape]`` to logits ``[B, C]``.
        x: chain starts.
        n_steps: number of steps (0 returns a copy of ``x``).
        step_size: ``s`` in ``x - s * dE/dx``.
        noise_std: standard deviation of the added Gaussian noise.
        y: int64 ``[B]`` labels for the class-conditional energy ``E(x, y) = -f(x)[y]``.
        clamp: ``(lo, hi)`` bounds applied after each step, or None.
        grad_clip: clip ``dE/dx`` element-wise to ``[-grad_clip, grad_clip]``, or None.
        generator: generator for the noise (on ``x``'s device).
        autocast: returns the context manager the forward and input-gradient run in (mixed
            precision); the chain state ``x`` keeps its dtype. None: full precision.
    """
    if n_steps < 0:
        raise ValueError(f"sgld_chain: n_steps must be >= 0, got {n_steps}")
    if y is not None:
        y = y.to(device=x.device, dtype=torch.int64)
    was_training = model.training
    model.eval()
    x = x.detach().clone()
    try:
        sgld_steps_(model, x, n_steps, step_size, noise_std, y, clamp, grad_clip, generator,
                    autocast)
    finally:
        model.train(was_training)
    return x


def sgld_steps_(
    model: nn.Module,
    x: Tensor,
    n_steps: int,
    step_size: float,
    noise_std: float,
    y: Tensor | None,
    clamp: tuple[float, float] | None,
    grad_clip: float | None,
    generator: torch.Generator | None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Tensor:
    """The body of :func:`sgld_chain`: ``n_steps`` SGLD steps on ``x`` in place (model mode as
    given, ``y`` already on ``x``'s device). Nothing here reads the host, so the loop can be
    captured in a CUDA graph (:mod:`jem_ext.graphs`)."""
    lo, hi = (None, None) if clamp is None else (float(clamp[0]), float(clamp[1]))
    precision = nullcontext if autocast is None else autocast
    with torch.enable_grad():
        for _ in range(n_steps):
            xg = x.detach().requires_grad_(True)
            with precision():
                e = ops.energy(model(xg), y)
            (g,) = torch.autograd.grad(e.sum(), [xg])
            with torch.no_grad():
                ops.sgld_step_(x, g.to(x.dtype), step_size, noise_std, lo, hi, grad_clip,
                               generator)
    return x


def sample_from_noise(
    model: nn.Module,
    n: int,
    shape: Sequence[int],
    n_steps: int,
    step_size: float = 1.0,
    noise_std: float = 0.01,
    *,
    y: Tensor | None = None,
    clamp: tuple[float, float] | None = None,
    grad_clip: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    chain: Callable[..., Tensor] | None = None,
) -> Tensor:
    """``n`` samples from fresh SGLD chains started at U(-1, 1)^shape; returned on the CPU.

    The one "chain from uniform noise" of the package (sample grids during training, the
    evaluation's generation task). Deterministic in ``seed`` on a given device: the starts are
    drawn on the CPU, the chains' noise from a generator on the model's device seeded with
    ``seed``. Chains run ``batch_size`` at a time; ``on_batch(k)`` is called after each batch of
    ``k`` chains (e.g. a progress bar's ``update``). With ``y`` (int64 ``[n]``), chain ``i``
    follows ``E(x, y_i)``. ``chain`` replaces :func:`sgld_chain` (e.g. a
    :class:`jem_ext.graphs.GraphedChain`). Other arguments as in :func:`sgld_chain`.
    """
    if n < 0 or batch_size < 1:
        raise ValueError(
            f"sample_from_noise: need n >= 0 and batch_size >= 1, got {n}, {batch_size}"
        )
    device = _model_device(model)
    starts = torch.Generator().manual_seed(seed)
    x0 = torch.rand((n, *shape), generator=starts) * 2 - 1
    noise = torch.Generator(device=device).manual_seed(seed)
    out = []
    for s in range(0, n, batch_size):
        yb = None if y is None else y[s : s + batch_size].to(device)
        xb = x0[s : s + batch_size].to(device)
        run = sgld_chain if chain is None else chain
        out.append(run(model, xb, n_steps, step_size, noise_std, y=yb, clamp=clamp,
                       grad_clip=grad_clip, generator=noise, autocast=autocast).cpu())
        if on_batch is not None:
            on_batch(len(xb))
    return torch.cat(out) if out else x0


# ---------------------------------------------------------------------- sampler


class SGLDSampler:
    """SGLD sampler with a persistent buffer (PCD, JEM) or fresh starts (short-run).

    Args:
        n_steps, step_size, noise_std, clamp, grad_clip: chain settings (see :func:`sgld_chain`);
            JEM: 20, 1.0, 0.01, None, None; proximal SGLD (JEM++): ``grad_clip`` set and
            ``clamp=(-1, 1)``, typically 5 to 10 steps.
        buffer: a :class:`ReplayBuffer`, or None for short-run sampling from ``init``.
        init: initializer for short-run mode (default ``UniformInit(-1, 1)``); ignored when a
            buffer is given (the buffer has its own).
        conditional: sample from ``p(x | y)`` with ``E(x, y)``; then :meth:`sample` needs ``y``.
        sample_shape: shape of one sample; needed in short-run mode unless ``init`` knows it
            (a :class:`GaussianInit` does).

    Attributes ``chain`` (a callable with :func:`sgld_chain`'s signature, e.g. a
    :class:`jem_ext.graphs.GraphedChain`) and ``autocast`` (see :func:`sgld_chain`) choose how
    the chain runs; they are not part of the state dict.
    """

    def __init__(
        self,
        n_steps: int = 20,
        step_size: float = 1.0,
        noise_std: float = 0.01,
        clamp: tuple[float, float] | None = None,
        grad_clip: float | None = None,
        buffer: ReplayBuffer | None = None,
        init: Initializer | None = None,
        conditional: bool = False,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        if n_steps < 0:
            raise ValueError(f"SGLDSampler: n_steps must be >= 0, got {n_steps}")
        if noise_std < 0:
            raise ValueError(f"SGLDSampler: noise_std must be >= 0, got {noise_std}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"SGLDSampler: grad_clip must be > 0, got {grad_clip}")
        if clamp is not None and not clamp[0] < clamp[1]:
            raise ValueError(f"SGLDSampler: clamp must be (lo, hi) with lo < hi, got {clamp}")
        self.n_steps = int(n_steps)
        self.step_size = float(step_size)
        self.noise_std = float(noise_std)
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.buffer = buffer
        if buffer is not None:
            self.init = buffer.init  # the buffer re-initialises its own chains
        else:
            self.init = init if init is not None else UniformInit()
        self.conditional = bool(conditional)
        if sample_shape is None:
            if buffer is not None:
                sample_shape = buffer.sample_shape
            elif isinstance(self.init, GaussianInit):
                sample_shape = self.init.sample_shape
        self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        if buffer is None and self.sample_shape is None:
            raise ValueError("SGLDSampler: short-run mode (no buffer) needs sample_shape")
        # How the chain runs, not what it computes (set by jem_ext.training.accel): the chain
        # function (sgld_chain, or a CUDA-graph replay of it) and the autocast of its forwards.
        self.chain: Callable[..., Tensor] = sgld_chain
        self.autocast: Callable[[], AbstractContextManager[Any]] | None = None

    def sample(
        self,
        model: nn.Module,
        batch_size: int,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``batch_size`` samples ``x_q`` (detached, on the model's device).

        Chains start from the buffer (and the results are written back) or, in short-run mode,
        from ``init``. ``y`` (int64 ``[batch_size]``) is required for a conditional sampler or a
        class-split buffer.
        """
        device = _model_device(model)
        if y is not None:
            y = y.to(device)
        if self.conditional and y is None:
            raise ValueError("SGLDSampler.sample: a conditional sampler needs labels y")
        idx = None
        if self.buffer is not None:
            x0, idx = self.buffer.sample(
                batch_size, y if self.buffer.num_classes is not None else None, generator
            )
            x0 = x0.to(device)
        else:
            x0 = self.init(batch_size, self.sample_shape, y=y, generator=generator, device=device)
        x_q = self.chain(
            model,
            x0,
            self.n_steps,
            self.step_size,
            self.noise_std,
            y=y if self.conditional else None,
            clamp=self.clamp,
            grad_clip=self.grad_clip,
            generator=generator,
            autocast=self.autocast,
        )
        if self.buffer is not None:
            self.buffer.update(idx, x_q)
        return x_q

    def state_dict(self) -> dict[str, Any]:
        """Settings, buffer contents and initializer state (weights_only-safe)."""
        init_state = self.init.state_dict() if hasattr(self.init, "state_dict") else None
        return {
            "n_steps": self.n_steps,
            "step_size": self.step_size,
            "noise_std": self.noise_std,
            "clamp": None if self.clamp is None else list(self.clamp),
            "grad_clip": self.grad_clip,
            "conditional": self.conditional,
            "sample_shape": None if self.sample_shape is None else list(self.sample_shape),
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "init": init_state,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore settings, buffer and initializer from :meth:`state_dict`.

        Raises:
            ValueError: the saved state has a buffer and this sampler has none (or the other
                way round), or the buffer layouts differ.
        """
        if (d.get("buffer") is None) != (self.buffer is None):
            raise ValueError(
                "SGLDSampler.load_state_dict: saved sampler "
                + ("has" if d.get("buffer") is not None else "has no")
                + " replay buffer but this one "
                + ("has" if self.buffer is not None else "has none")
            )
        self.n_steps = int(d["n_steps"])
        self.step_size = float(d["step_size"])
        self.noise_std = float(d["noise_std"])
        self.clamp = None if d["clamp"] is None else (float(d["clamp"][0]), float(d["clamp"][1]))
        self.grad_clip = None if d["grad_clip"] is None else float(d["grad_clip"])
        self.conditional = bool(d["conditional"])
        if d.get("sample_shape") is not None:
            self.sample_shape = tuple(d["sample_shape"])
        if self.buffer is not None:
            self.buffer.load_state_dict(d["buffer"])
        init = _init_from_state(d.get("init"))
        if init is not None:
            if isinstance(self.init, GaussianInit):
                init.to(self.init.mean.device)
            self.init = init
            if self.buffer is not None:
                self.buffer.init = init
