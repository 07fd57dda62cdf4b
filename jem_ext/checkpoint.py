"""Checkpoints of jem_ext runs: atomic save, validated load, run-folder resolution.

A checkpoint is a plain dict saved with :func:`torch.save` and read back with
``torch.load(weights_only=True)``, so it may hold only tensors, numbers, strings, None and
(nested) lists, tuples and dicts. Its keys:

- ``"format"``: always :data:`FORMAT` (``"jem_ext.checkpoint"``); ``"version"``: :data:`VERSION`.
- ``"model_spec"``: :func:`jem_ext.models.model_spec` of the network; ``"model"``: its state dict.
  A model from a factory has the factory's ``"PACKAGE.MODULE:FACTORY"`` as its spec's name; it
  is rebuilt only by naming that factory again (see :func:`model_from_checkpoint`).
- ``"optimizer"``: optimiser state dict; ``"sampler"``: ``SGLDSampler.state_dict()`` (or None).
- ``"rng"``: RNG states (see :func:`capture_rng` / :func:`restore_rng`).
- ``"iteration"``, ``"epoch"``: training progress; ``"config"``: the run's full config dict,
  with its identity: ``config["run_id"]`` names the run (a resume refuses a checkpoint of
  another run) and ``config["data_fingerprint"]`` the data it trained on (see
  :func:`jem_ext.data.data_fingerprint`; a resume refuses changed data, an evaluation warns);
  checkpoints written before they existed lack both and are accepted;
  ``"best_val_accuracy"``: best validation accuracy so far.
- ``"distributed"`` (checkpoints of a job of several processes only): ``{"world_size",
  "shard_rows", "rng"}``: the number of processes, each one's replay-buffer rows (per class for
  a class-split buffer) and each one's RNG states (:func:`capture_rng`). Their buffer shards
  are merged into ``"sampler"``, which then holds the whole buffer in the single-process layout
  (see :mod:`jem_ext.training.distributed`).
- ``"checksum"``: :func:`state_checksum` of the rest, verified on load (checkpoints written
  before it existed have none and load unchecked).

A run folder looks like ``RUN/config.json``, ``RUN/metrics.jsonl``,
``RUN/checkpoints/{last.pt,best.pt}``, ``RUN/samples/*.png``, ``RUN/summary.json``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import atomic_path, torch_save
from .factory import is_factory
from .models import build_from_spec, meta_model

FORMAT = "jem_ext.checkpoint"
CHECKSUM_KEY = "checksum"
VERSION = 1
KNOWN_VERSIONS = frozenset({1})

__all__ = [
    "CheckpointError",
    "FORMAT",
    "VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "model_from_checkpoint",
    "replay_buffer_samples",
    "state_checksum",
    "weights_mismatch",
    "new_state",
    "capture_rng",
    "restore_rng",
]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, or not a jem_ext checkpoint."""


def new_state(**fields: Any) -> dict[str, Any]:
    """A checkpoint dict with ``format`` and ``version`` filled in, plus ``fields``."""
    state: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    state.update(fields)
    return state


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save ``state`` to ``path`` atomically.

    The dict is written to a temporary file in the same folder, flushed and fsync'ed, then
    renamed over ``path`` with :func:`os.replace`, so a crash leaves either the old file or the
    new one, never a truncated one. ``format``/``version`` are added when missing. Parent folders
    are created.

    Raises:
        CheckpointError: ``state`` is not a dict.
        OSError: the file cannot be written (no space, a read-only file system).
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"save_checkpoint: expected a dict, got {type(state).__name__}")
    state = {"format": FORMAT, "version": VERSION, **state}
    state[CHECKSUM_KEY] = state_checksum(state)
    with atomic_path(path) as tmp:
        torch_save(state, tmp)  # a full disk raises its OSError, not torch's RuntimeError


def _first_sentence(err: BaseException, limit: int = 160) -> str:
    """The first line/sentence of an exception message, shortened, for one-line errors."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    if not text:
        return type(err).__name__
    text = text.splitlines()[0]
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint written by :func:`save_checkpoint`.

    Uses ``torch.load(weights_only=True)``: no arbitrary code runs while loading.

    Args:
        path: the ``.pt`` file.
        map_location: passed to :func:`torch.load`.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: one clear message if the file is missing, unreadable, corrupt or
            truncated, or is not a dict with ``format == "jem_ext.checkpoint"`` and a known
            ``version``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: expected a file, got a directory or device")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = _first_sentence(err)
        raise CheckpointError(
            f"checkpoint {path}: not a jem_ext checkpoint or unsafe to load "
            f"(weights_only load refused it: {first})"
        ) from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        KeyError,
        AttributeError,
        TypeError,
        IndexError,
        io.UnsupportedOperation,
    ) as err:
        first = _first_sentence(err)
        raise CheckpointError(
            f"checkpoint {path}: corrupt or truncated file, cannot be read ({first})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: not a jem_ext checkpoint (expected a dict with format={FORMAT!r})"
        )
    if state.get("version") not in KNOWN_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path}: unsupported version {state.get('version')!r} "
            f"(this jem_ext reads versions {sorted(KNOWN_VERSIONS)})"
        )
    if CHECKSUM_KEY in state and state[CHECKSUM_KEY] != state_checksum(state):
        raise CheckpointError(
            f"checkpoint {path}: checksum mismatch (the file was modified or damaged after "
            "it was written)"
        )
    return state


def state_checksum(state: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` over a checkpoint's content (every key but the checksum itself).

    Tensors contribute their dtype, shape and bytes; dicts their entries in key order; lists and
    tuples their items; other values their type and ``repr``.
    """
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return "sha256:" + digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        digest.update(b"D%d" % len(obj))
        for key in sorted(obj, key=repr):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(b"L%d" % len(obj))
        for item in obj:
            _feed(digest, item)
    else:
        digest.update(f"S{type(obj).__name__}:{obj!r}".encode())


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Turn a checkpoint file or a run folder into a checkpoint file path.

    A file is returned as is; a run folder gives ``RUN/checkpoints/best.pt`` if present, else
    ``RUN/checkpoints/last.pt``.

    Raises:
        CheckpointError: the path does not exist, or is a folder holding neither checkpoint.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"{path}: a folder without checkpoints/best.pt or checkpoints/last.pt "
            "(expected a checkpoint file or a run folder)"
        )
    raise CheckpointError(f"{path}: no such checkpoint file or run folder")


def model_from_checkpoint(
    state: dict[str, Any], device: Any = "cpu", factory: Any = None, flag: str = "--model"
) -> nn.Module:
    """Rebuild the network of a loaded checkpoint, with its weights, in eval mode.

    A model that came from a factory (``--model PACKAGE.MODULE:FACTORY``) is rebuilt only when
    ``factory`` names the same one (the string, or the callable): a checkpoint never imports
    code by itself. ``flag`` is the command-line flag that names it, for the messages.

    Raises:
        CheckpointError: the checkpoint lacks ``model_spec``/``model`` or they do not match; its
            model comes from a factory that ``factory`` does not name, or the factory fails or
            builds a model that does not fit the weights; a factory given for a built-in model.
    """
    if "model_spec" not in state or "model" not in state:
        raise CheckpointError("checkpoint: expected keys 'model_spec' and 'model'")
    spec = state["model_spec"]
    if isinstance(spec, dict) and is_factory(spec.get("name")):
        return _factory_model(spec, state["model"], factory, flag).to(device).eval()
    _check_spec_matches_weights(spec, state["model"])
    try:
        model = build_from_spec(spec, factory=factory)
        model.load_state_dict(state["model"])
    except (ValueError, TypeError, RuntimeError, KeyError) as err:
        first = _first_sentence(err)
        raise CheckpointError(f"checkpoint: cannot rebuild the model ({first})") from None
    return model.to(device).eval()


def _factory_model(spec: dict[str, Any], weights: Any, factory: Any, flag: str) -> nn.Module:
    """The model of a factory spec, built by the factory the caller named, with its weights."""
    if not isinstance(weights, dict):
        raise CheckpointError("checkpoint: model_spec and model must be dicts")
    try:
        model = build_from_spec(spec, factory=factory, flag=flag)
    except ValueError as err:  # FactoryError included: one line already
        raise CheckpointError(f"checkpoint: {err}") from None
    diff = weights_mismatch(model, weights)
    if diff is not None:
        raise CheckpointError(
            f"checkpoint: the model that {spec['name']} builds does not match the saved weights "
            f"(first difference: {diff})"
        )
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, KeyError) as err:
        first = _first_sentence(err)
        raise CheckpointError(f"checkpoint: cannot rebuild the model ({first})") from None
    return model


def weights_mismatch(model: nn.Module, weights: dict[str, Any]) -> str | None:
    """The first entry whose name or shape differs between ``model``'s state dict and
    ``weights`` (as ``"name (shape)"``), or None when they match. ``model`` may live on the meta
    device, so nothing needs to be allocated to check."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if expected == saved:
        return None
    name, shape = sorted(set(expected.items()) ^ set(saved.items()))[0]
    return f"{name} {shape}"


def _check_spec_matches_weights(spec: Any, weights: Any) -> None:
    """Check a checkpoint's model spec against its weights before building anything.

    Raises:
        CheckpointError: the spec is invalid, or its parameter names or shapes differ from the
            saved weights.
    """
    if not isinstance(spec, dict) or not isinstance(weights, dict):
        raise CheckpointError("checkpoint: model_spec and model must be dicts")
    try:
        model = meta_model(spec)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"checkpoint: invalid model spec ({_first_sentence(err)})") from None
    diff = weights_mismatch(model, weights)
    if diff is not None:
        raise CheckpointError(
            f"checkpoint: the model spec does not match the saved weights (first difference: "
            f"{diff})"
        )


def replay_buffer_samples(state: dict[str, Any]) -> torch.Tensor | None:
    """The replay buffer's samples ``[N, *shape]`` saved in a checkpoint, or None.

    They live at ``state["sampler"]["buffer"]["data"]`` (see :meth:`ReplayBuffer.state_dict`),
    the whole buffer also for a checkpoint of several processes (their shards merged); CE runs
    and short-run samplers have no buffer.
    """
    sampler = state.get("sampler") or {}
    buffer = sampler.get("buffer") or {}
    data = buffer.get("data")
    return data if isinstance(data, torch.Tensor) and data.numel() > 0 else None


# ----------------------------------------------------------------------------------------------
# RNG states (stored as tensors / ints so they survive a weights_only load)
# ----------------------------------------------------------------------------------------------


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot the global torch (CPU and CUDA), numpy and python RNGs, plus named generators.

    Returns:
        A weights_only-safe dict: ``{"torch", "cuda", "numpy", "python", "generators"}``.
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [int(py_state[0]), list(py_state[1]), py_state[2]],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def restore_rng(
    state: dict[str, Any], generators: dict[str, torch.Generator] | None = None
) -> None:
    """Restore RNG states saved by :func:`capture_rng` (named generators matched by key)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state.get("numpy")
    if npst:
        np.random.set_state(
            (
                npst["name"],
                npst["keys"].numpy().astype(np.uint32),
                npst["pos"],
                npst["has_gauss"],
                npst["cached_gaussian"],
            )
        )
    py = state.get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    for key, gen in (generators or {}).items():
        if key in state.get("generators", {}):
            gen.set_state(state["generators"][key])
