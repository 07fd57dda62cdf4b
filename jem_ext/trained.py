"""A trained JEM, ready to use: ``jem_ext.load(RUN_OR_CHECKPOINT)``.

:func:`load` reads a checkpoint (verified, ``weights_only``) or a run folder (its
``checkpoints/best.pt``, else ``checkpoints/last.pt``, as ``python -m jem_ext.eval`` does) and
returns a :class:`Trained`: the model in eval mode on the chosen device, the training
preprocessing (:meth:`Trained.read_image`, :meth:`Trained.from_array`) and the JEM read-outs,

* class probabilities ``p(y|x) = exp(f(x)[y] - logsumexp f(x))``,
* ``log p(x) = logsumexp_y f(x)[y]`` (up to the model's unknown log-normaliser),
* energies ``E(x) = -logsumexp f(x)`` and ``E(x, y) = -f(x)[y]``,
* samples by SGLD, unconditional or class-conditional, from uniform noise or from the replay
  buffer saved with the checkpoint, with the chain settings the run trained with.

All of them come from one op, :func:`jem_ext.ops.energy`, the function the training loss and the
evaluation's scores use. The methods take a batch ``[N, *in_shape]``, run it ``batch_size`` rows
at a time on the model's device and return tensors on that device; nothing inside reads a tensor
value on the host (no ``.item()``, no ``.cpu()``), so calls queue up on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import ops
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    replay_buffer_samples,
    resolve_checkpoint,
)
from .data_files import GREY_MODES, decode_image, probe_image
from .image_data import DataError
from .sampler import (
    DEFAULT_CLAMP,
    DEFAULT_N_STEPS,
    DEFAULT_NOISE_STD,
    DEFAULT_STEP_SIZE,
    ChainSpec,
    run_chain,
)

__all__ = ["Chain", "InputError", "Scores", "Trained", "load"]


class InputError(ValueError):
    """An input that cannot be read or does not fit the model; the message names it."""


Chain = ChainSpec  # the SGLD chain samples are drawn with (the run's sampler's)


@dataclass
class Scores:
    """What one forward pass gives per input (tensors on the model's device).

    Attributes:
        logits: float32 ``[N, K]`` ``f(x)``.
        probs: float32 ``[N, K]`` ``p(y|x)``.
        pred: int64 ``[N]`` the most probable class.
        max_prob: float32 ``[N]`` ``max_y p(y|x)``.
        log_px: float32 ``[N]`` ``log p(x)`` up to the constant, ``logsumexp f(x) = -E(x)``.
    """

    logits: Tensor
    probs: Tensor
    pred: Tensor
    max_prob: Tensor
    log_px: Tensor


def _default_device(config: dict[str, Any]) -> torch.device:
    """The device the run trained on where this machine has it, else the CPU."""
    wanted = str(config.get("device") or "cpu")
    if wanted in ("cuda", "auto") or wanted.startswith("cuda:"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cpu")


def _chain_of(state: dict[str, Any]) -> ChainSpec:
    """The chain settings recorded by the checkpoint's sampler (jem_ext.sampler's JEM
    defaults when it has none: a CE-only run)."""
    s = state.get("sampler") if isinstance(state.get("sampler"), dict) else {}
    cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
    steps = s.get("n_steps", cfg.get("sgld_steps") or DEFAULT_N_STEPS)
    clamp = s["clamp"] if "clamp" in s else DEFAULT_CLAMP
    return ChainSpec(
        n_steps=int(steps),
        step_size=float(s.get("step_size", DEFAULT_STEP_SIZE)),
        noise_std=float(s.get("noise_std", DEFAULT_NOISE_STD)),
        clamp=None if clamp is None else (clamp[0], clamp[1]),
        grad_clip=None if s.get("grad_clip") is None else float(s["grad_clip"]),
    )


class Trained:
    """A trained JEM: its model (eval mode, no parameter gradients), input shape, classes, chain
    settings and saved replay buffer. Made by :func:`load`.

    Attributes:
        model: the network ``f``, in eval mode on :attr:`device`.
        path: the checkpoint file read.
        config: the run's recorded configuration (data set, data root, seed, ...).
        in_shape: the shape of one input, e.g. ``(3, 32, 32)``.
        num_classes: ``K``.
        chain: the SGLD settings :meth:`sample` uses by default.
        buffer: the saved replay buffer ``[M, *in_shape]`` on :attr:`device`, or None.
    """

    def __init__(self, path: Path, state: dict[str, Any], model: nn.Module, device: torch.device):
        spec = state["model_spec"]
        self.path = path
        self.state = state
        self.config: dict[str, Any] = (
            state["config"] if isinstance(state.get("config"), dict) else {}
        )
        self.model = model.eval().requires_grad_(False)
        self.device = device
        self.in_shape: tuple[int, ...] = tuple(int(s) for s in spec["in_shape"])
        self.num_classes = int(spec["num_classes"])
        self.chain = _chain_of(state)
        buffer = replay_buffer_samples(state)
        self.buffer = None if buffer is None else buffer.to(device, torch.float32)
        saved = (state.get("sampler") or {}).get("buffer") or {}
        self.buffer_classes: int | None = saved.get("num_classes") if buffer is not None else None

    def __repr__(self) -> str:
        return (
            f"Trained({str(self.path)!r}, in_shape={self.in_shape}, "
            f"num_classes={self.num_classes}, device={str(self.device)!r})"
        )

    @property
    def is_image(self) -> bool:
        """Whether inputs are images (``[C, H, W]`` with 1 or 3 channels)."""
        return len(self.in_shape) == 3 and self.in_shape[0] in (1, 3)

    # ------------------------------------------------------------------ preprocessing

    def read_image(self, path: str | os.PathLike) -> Tensor:
        """An image file as the training data reader makes it: float32 ``[C, H, W]`` in
        ``[-1, 1]``, scaled by its bit depth, grey or RGB as the model takes (on the CPU).

        Raises:
            InputError: unreadable, transparent, or another size or colour than the model's.
        """
        path = Path(path)
        if not self.is_image:
            raise InputError(
                f"{path}: the model takes samples of shape {self.in_shape}, not images "
                "(give a .npy array)"
            )
        c, h, w = self.in_shape
        try:
            mode, (width, height) = probe_image(path)
            if (width, height) != (w, h):
                raise InputError(
                    f"{path}: a {width}x{height} image; the model takes {w}x{h} images"
                )
            if c == 1 and mode not in GREY_MODES:
                raise InputError(
                    f"{path}: a colour image (mode {mode}); the model takes grey images"
                )
            pixels, _ = decode_image(path, grey=c == 1)
        except DataError as err:  # "image folder: PATH is not ..." -> "PATH: is not ..."
            reason = str(err).removeprefix("image folder: ").removeprefix(f"{path} ")
            raise InputError(f"{path}: {reason}") from None
        return torch.from_numpy(pixels)

    def from_array(self, array: np.ndarray, name: str = "array") -> Tensor:
        """A numpy batch as model inputs (float32 on the CPU).

        Accepted layouts: floating ``[N, *in_shape]`` (channels first, as the model takes)
        with values in ``[-1, 1]``; or, for image models, uint8 ``[N, H, W, C]`` (``[N, H, W]``
        for grey) with values 0..255, scaled as the training data are (``v / 127.5 - 1``).

        Raises:
            InputError: another dtype or shape, or values outside ``[-1, 1]`` / not finite
                (naming the first offending row).
        """
        a = np.asarray(array)
        if a.dtype == np.uint8 and self.is_image:
            c, h, w = self.in_shape
            if a.ndim == 3 and c == 1:
                a = a[..., None]
            if a.ndim != 4 or a.shape[1:] != (h, w, c):
                raise InputError(
                    f"{name}: a uint8 array of shape {a.shape}; expected [N, H, W, C] = "
                    f"[N, {h}, {w}, {c}]"
                )
            x = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
            return x.float().div_(127.5).sub_(1.0)
        if a.dtype.kind != "f":
            raise InputError(
                f"{name}: an array of dtype {a.dtype}; expected float values in [-1, 1]"
                + (" or uint8 pixels" if self.is_image else "")
            )
        if a.ndim != 1 + len(self.in_shape) or tuple(a.shape[1:]) != self.in_shape:
            raise InputError(
                f"{name}: a float array of shape {a.shape}; expected [N, "
                + ", ".join(str(s) for s in self.in_shape)
                + "]"
            )
        x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        bad = ~(torch.isfinite(x) & (x.abs() <= 1)).flatten(1).all(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise InputError(f"{name}[{i}]: values outside [-1, 1] or not finite")
        return x

    # ---------------------------------------------------------------------- read-outs

    def _batches(self, x: Tensor, batch_size: int):
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"expected inputs [N, {self.in_shape}], got {tuple(x.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for s in range(0, x.shape[0], batch_size):
            yield x[s : s + batch_size].to(self.device, torch.float32)

    @torch.no_grad()
    def logits(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """``f(x)``: float32 ``[N, K]`` on the model's device."""
        out = [self.model(xb).float() for xb in self._batches(x, batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.num_classes, device=self.device)

    def scores(self, x: Tensor, batch_size: int = 500) -> Scores:
        """Probabilities, prediction, ``max p(y|x)`` and ``log p(x)`` from one forward pass."""
        logits = self.logits(x, batch_size)
        log_px = -ops.energy(logits)
        probs = torch.exp(logits - log_px[:, None])  # p(y|x) = exp(f(x)[y] - logsumexp f(x))
        max_prob, pred = probs.max(1)
        return Scores(logits=logits, probs=probs, pred=pred, max_prob=max_prob, log_px=log_px)

    def probs(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """``p(y|x)``: float32 ``[N, K]``."""
        return self.scores(x, batch_size).probs

    def log_px(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """``log p(x) + log Z = logsumexp_y f(x)[y]``: float32 ``[N]``."""
        return -self.energy(x, batch_size=batch_size)

    def energy(self, x: Tensor, y: Tensor | int | None = None, batch_size: int = 500) -> Tensor:
        """``E(x) = -logsumexp f(x)``, or ``E(x, y) = -f(x)[y]`` with labels ``y`` (one class
        for all rows, or int64 ``[N]``): float32 ``[N]``."""
        logits = self.logits(x, batch_size)
        return ops.energy(logits, self._labels(y, logits.shape[0]))

    # ------------------------------------------------------------------------ samples

    def _labels(self, y: Tensor | int | None, n: int) -> Tensor | None:
        if y is None:
            return None
        if isinstance(y, (int, np.integer)):
            if not 0 <= int(y) < self.num_classes:
                raise ValueError(f"y: expected a class in 0 .. {self.num_classes - 1}, got {y}")
            return torch.full((n,), int(y), dtype=torch.int64, device=self.device)
        y = torch.as_tensor(y).to(self.device, torch.int64)
        if y.shape != (n,):
            raise ValueError(f"y: expected one label per sample, shape [{n}], got {tuple(y.shape)}")
        return y

    def sample(
        self,
        n: int,
        y: Tensor | int | None = None,
        *,
        from_buffer: bool = False,
        n_steps: int | None = None,
        seed: int | None = None,
        batch_size: int = 256,
    ) -> Tensor:
        """``n`` samples by SGLD with the run's chain settings: float32 ``[n, *in_shape]`` on
        the model's device.

        Args:
            n: number of samples.
            y: None for ``p(x)`` (energy ``E(x)``); a class, or int64 labels ``[n]``, for
                ``p(x|y)`` (energy ``E(x, y)``). A label tensor is checked by the energy op
                (on CUDA, later: :func:`jem_ext.ops.raise_label_errors`).
            from_buffer: start the chains from rows of the saved replay buffer (of class
                ``y`` for a buffer split by class) instead of ``U(-1, 1)`` noise.
            n_steps: chain length (default: the run's, :attr:`chain`).
            seed: seeds the starts and the chains' noise (a generator on the model's device);
                None draws from torch's global generators.
            batch_size: chains run at a time.
        """
        if n < 0 or batch_size < 1:
            raise ValueError(f"sample: need n >= 0 and batch_size >= 1, got {n}, {batch_size}")
        steps = self.chain.n_steps if n_steps is None else int(n_steps)
        if steps < 0:
            raise ValueError(f"sample: n_steps must be >= 0, got {steps}")
        labels = self._labels(y, n)
        gen = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        x0 = self._starts(n, labels, from_buffer, gen)
        chain, out = self.chain.with_steps(steps), []
        for s in range(0, n, batch_size):
            yb = None if labels is None else labels[s : s + batch_size]
            out.append(run_chain(self.model, x0[s : s + batch_size], chain, y=yb, generator=gen))
        return torch.cat(out) if out else x0

    def _starts(
        self, n: int, y: Tensor | None, from_buffer: bool, gen: torch.Generator | None
    ) -> Tensor:
        """Chain starts on the model's device: U(-1, 1) noise, or saved buffer rows."""
        if not from_buffer:
            return torch.rand((n, *self.in_shape), generator=gen, device=self.device) * 2 - 1
        if self.buffer is None:
            raise ValueError(
                f"sample(from_buffer=True): {self.path} holds no replay buffer (a CE run or a "
                "short-run sampler); sample from noise instead"
            )
        if self.buffer_classes and y is not None:  # the rows of class y[i]'s slice
            per_class = self.buffer.shape[0] // self.buffer_classes
            offset = torch.randint(per_class, (n,), generator=gen, device=self.device)
            idx = y * per_class + offset
        else:
            idx = torch.randint(self.buffer.shape[0], (n,), generator=gen, device=self.device)
        return self.buffer[idx]


def load(
    run_or_checkpoint: str | os.PathLike,
    device: str | torch.device | None = None,
    model: str | Callable[..., nn.Module] | None = None,
) -> Trained:
    """Load a trained JEM from a checkpoint file or a run folder.

    A run folder gives its ``checkpoints/best.pt`` (the best validation accuracy), else
    ``checkpoints/last.pt``. The checkpoint is read with ``weights_only=True`` and its checksum
    verified; the model is rebuilt from its recorded spec. ``device`` defaults to the one the
    run trained on when this machine has it (a CUDA run on a machine without CUDA: the CPU).

    A run whose model came from a factory (``--model PACKAGE.MODULE:FACTORY``) needs ``model``:
    the same ``"PACKAGE.MODULE:FACTORY"`` (imported here) or the factory itself. A checkpoint
    never imports code by itself.

    Raises:
        CheckpointError: no such file or folder, not a jem_ext checkpoint, corrupt, or a spec
            that does not match its weights; a factory's run without ``model``, with another
            factory, or whose factory fails; ``model`` given for a built-in model (one line).
    """
    file = Path(os.path.abspath(resolve_checkpoint(run_or_checkpoint)))
    state = load_checkpoint(file, map_location="cpu")
    cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
    dev = _default_device(cfg) if device is None else torch.device(device)
    try:  # refuses a spec without in_shape/classes
        net = model_from_checkpoint(state, device=dev, factory=model)
    except CheckpointError as err:
        raise CheckpointError(f"{file}: {str(err).removeprefix('checkpoint: ')}") from None
    return Trained(file, state, net, dev)
