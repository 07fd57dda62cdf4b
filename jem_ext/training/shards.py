"""Each process's share of a data-parallel run (see :mod:`.distributed`), and the checkpoint
that holds every share.

- The replay buffer is sharded: each process owns ``1/N`` of the chains (of every class' rows
  for a class-split buffer), ``--buffer-size`` in total, and its own generators (sampler and
  augmentation), seeded from the seed and the rank (:func:`generator_seed`).
- The SGLD chains run on the underlying module (their gradients are with respect to ``x``):
  no gradient reduction and no unused-parameter check, and the chains need no communication.
- Checkpoints: rank 0 gathers every shard and every process's RNG states. The ``sampler`` entry
  holds the whole buffer in the single-process layout (what evaluation reads) and the
  ``distributed`` entry the world size, shard rows and per-process RNG states. ``--resume``
  with the same N continues exactly; with another N the buffer is re-sharded and the
  generators are re-seeded from (seed, rank, iteration), and the run says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import Dist

_SEED_STRIDE = 1_000_003  # separates the generator seeds of ranks (and of resume points)


def generator_seed(base: int, rank: int, iteration: int = 0) -> int:
    """Seed of a process's generator: ``base`` for rank 0 at the start, distinct otherwise."""
    return (base + _SEED_STRIDE * (rank + 7919 * iteration)) % (2**63)


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, count)`` of rank's contiguous share of ``rows`` (the first ranks get the
    remainder)."""
    base, extra = divmod(rows, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def buffer_shard_size(size: int, classes: int, d: Dist) -> int:
    """Chains of this process's buffer shard (whole rows of every class)."""
    return shard_rows(size // classes, d.world_size, d.rank)[1] * classes


def merge_buffer(shards: list[Tensor], classes: int) -> Tensor:
    """The whole buffer, in the single-process layout, from the shards in rank order."""
    parts = [s.reshape(classes, -1, *s.shape[1:]) for s in shards]
    whole = torch.cat(parts, dim=1)
    return whole.reshape(-1, *whole.shape[2:])


def split_buffer(whole: Tensor, classes: int, d: Dist) -> Tensor:
    """This process's shard of a whole buffer (inverse of :func:`merge_buffer`)."""
    rows = whole.reshape(classes, -1, *whole.shape[1:])
    start, count = shard_rows(rows.shape[1], d.world_size, d.rank)
    return rows[:, start : start + count].reshape(-1, *whole.shape[1:]).clone()


def _buffer_classes(buffer_state: dict[str, Any]) -> int:
    return buffer_state.get("num_classes") or 1


def gather_checkpoint(state: dict[str, Any], d: Dist) -> dict[str, Any]:
    """Rank 0: ``state`` with every process's buffer shard and RNG states; others: ``state``.

    Every process must call it (it is a collective).
    """
    if not d.parallel:
        return state
    buffer = (state.get("sampler") or {}).get("buffer")
    local = {"buffer": None if buffer is None else buffer["data"], "rng": state["rng"]}
    parts: list[Any] | None = [None] * d.world_size if d.is_main else None
    dist.gather_object(local, parts, dst=0)
    if not d.is_main:
        return state
    assert parts is not None
    merged = dict(state)
    shard_rows_saved = None
    if buffer is not None:
        classes = _buffer_classes(buffer)
        whole = merge_buffer([p["buffer"] for p in parts], classes)
        shard_rows_saved = [len(p["buffer"]) // classes for p in parts]
        merged["sampler"] = {
            **state["sampler"],
            "buffer": {**buffer, "data": whole, "per_class": len(whole) // classes},
        }
    merged["distributed"] = {
        "world_size": d.world_size,
        "shard_rows": shard_rows_saved,
        "rng": [p["rng"] for p in parts],
    }
    return merged


@dataclass
class LocalShare:
    """What one process resumes from a checkpoint.

    Attributes:
        sampler: the sampler state with this process's buffer shard (or None).
        rng: this process's RNG states, or None when the world size changed (re-seed).
        saved_world_size: how many processes wrote the checkpoint.
    """

    sampler: dict[str, Any] | None
    rng: dict[str, Any] | None
    saved_world_size: int


def saved_world_size(ckpt: dict[str, Any]) -> int:
    """How many processes wrote a checkpoint."""
    return int((ckpt.get("distributed") or {}).get("world_size", 1))


def local_share(ckpt: dict[str, Any], d: Dist) -> LocalShare:
    """This process's part of a checkpoint (single-process checkpoints included)."""
    saved = ckpt.get("distributed") or {}
    saved_world = saved_world_size(ckpt)
    sampler = ckpt.get("sampler")
    same = saved_world == d.world_size
    rng = (saved["rng"][d.rank] if saved else ckpt["rng"]) if same else None
    if d.world_size == 1 and saved_world == 1:
        return LocalShare(sampler, rng, saved_world)
    buffer = (sampler or {}).get("buffer")
    if buffer is not None:
        classes = _buffer_classes(buffer)
        shard = split_buffer(buffer["data"], classes, d)
        sampler = {
            **sampler,
            "buffer": {**buffer, "data": shard, "per_class": len(shard) // classes},
        }
    return LocalShare(sampler, rng, saved_world)


def reshard_note(saved_world: int, d: Dist, chains: int | None) -> str:
    """The line printed when a run resumes with another number of processes."""
    what = f"the replay buffer ({chains} chains) is re-sharded and " if chains else ""
    return (
        f"--resume: the checkpoint was written by {saved_world} process"
        f"{'es' if saved_world != 1 else ''} and this run has {d.world_size}: {what}"
        "each process's generators are re-seeded from (seed, rank, iteration)"
    )
