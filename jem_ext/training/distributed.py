"""Data-parallel training: one JEM trained by N processes that torchrun launches.

Launch::

    torchrun --nproc-per-node N -m jem_ext.train ...                     # one machine
    torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d \\
        --rdzv-endpoint HOST:PORT --rdzv-id JOB -m jem_ext.train ...      # M machines

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init_from_env` reads them
and joins the job: NCCL on CUDA (process ``LOCAL_RANK`` drives GPU ``LOCAL_RANK``), gloo on the
CPU. Without ``WORLD_SIZE`` (the plain ``python -m jem_ext.train``) nothing here touches
``torch.distributed`` and training is the single-process one, unchanged. A job of one process
trains exactly as a single process does.

What N processes compute (every rule is a function of the config, the rank and N):

- ``--batch-size`` is the *global* batch. Every process draws each epoch's order from
  ``(seed, epoch)`` exactly as a single process does and takes rows ``rank, rank + N, ...``
  of every batch (``batch_size / N`` rows; the batch size must be a multiple of N; an epoch's
  last batch is skipped when it has fewer than N rows). DistributedDataParallel averages the
  gradients, so an iteration is one update on the global batch: iterations per epoch and the
  learning rate (schedule included) are the single-process ones, not scaled.
- The replay buffer is sharded: each process owns ``1/N`` of the chains (of every class' rows
  for a class-split buffer), ``--buffer-size`` in total, and its own generators (sampler and
  augmentation), seeded from the seed and the rank.
- The SGLD chains run on the underlying module (their gradients are with respect to ``x``):
  no gradient reduction and no unused-parameter check. The loss's forward passes go through
  the DistributedDataParallel wrapper. Communication per iteration: one all-reduce of the
  gradients and one of the divergence guard's flag; the chains need none.
- Rank 0 writes the run folder (config.json, metrics.jsonl, sample grids, checkpoints,
  summary.json; config.json and summary.json record the world size and the global batch).
  Metrics rows average the loss terms over the processes. Validation and test accuracy are
  reduced: each process predicts its share of the evaluation batches and the correct counts
  are summed, so the figure is the one a single process computes for the same weights.
- Checkpoints: rank 0 gathers every shard and every process's RNG states. The ``sampler`` entry
  holds the whole buffer in the single-process layout (what evaluation reads) and the
  ``distributed`` entry the world size, shard rows and per-process RNG states. ``--resume``
  with the same N continues exactly; with another N the buffer is re-sharded and the
  generators are re-seeded from (seed, rank, iteration), and the run says so.
- The divergence guard decides together: if any process sees divergence, all restore the same
  last good state.
- A process that dies or stops answering ends the job: collectives time out after
  ``--dist-timeout`` seconds with an error naming this process.

On a multi-machine job, ``--resume`` reads the run folder on every machine (keep runs on a
shared file system); a fresh run writes only on rank 0's machine.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .. import data as jdata
from .. import metrics
from ..models import predict_logits
from .runconfig import RunConfig

T = TypeVar("T")
_TRANSPORT_ERROR = re.compile(
    r"gloo|nccl|c10d|connection (reset|closed|refused)|timed out", re.IGNORECASE
)
DistError = dist.DistError  # what a failed or timed-out collective raises

EVAL_BATCH = 500  # rows per prediction batch; shards are whole batches, so logits match
_SEED_STRIDE = 1_000_003  # separates the generator seeds of ranks (and of resume points)


class LaunchError(ValueError):
    """The launch does not fit the config or the machine (too many processes, a batch that
    does not split)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 writes the run folder).
        world_size: number of processes (1: single-process training).
        local_rank: rank on this machine (its GPU index on CUDA).
        backend: ``"nccl"``, ``"gloo"``, or None when torch.distributed is not initialised.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """Whether there are other processes to talk to."""
        return self.world_size > 1


SINGLE = Dist()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def _launcher_int(name: str) -> int:
    """The launcher's integer environment variable ``name`` (0 when unset or not a number)."""
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched): known before
    the process joins the job, so that a command-line error is printed once, by rank 0."""
    return _launcher_int("RANK")


def restart_count() -> int:
    """How many times torchrun has restarted the job's processes (``--max-restarts``): 0 for
    the first launch and without torchrun."""
    return _launcher_int("TORCHELASTIC_RESTART_COUNT") if launched() else 0


def max_restarts() -> int:
    """torchrun's ``--max-restarts`` (0 without torchrun)."""
    return _launcher_int("TORCHELASTIC_MAX_RESTARTS") if launched() else 0


def current() -> Dist:
    """The job of this process, from torch.distributed's state (single when not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Dist(
        dist.get_rank(),
        dist.get_world_size(),
        int(os.environ.get("LOCAL_RANK", 0)),
        dist.get_backend(),
    )


def check_devices(processes_per_node: int, visible: int) -> None:
    """One GPU per process on each machine.

    Raises:
        LaunchError: more processes per machine than visible CUDA devices.
    """
    if processes_per_node > visible:
        raise LaunchError(
            f"--nproc-per-node {processes_per_node}: only {visible} CUDA device"
            f"{'s are' if visible != 1 else ' is'} visible on this machine (one GPU per "
            f"process); launch at most {visible} processes per machine or pass --device cpu"
        )


def check_config(cfg: RunConfig, world_size: int, classes: int = 1) -> None:
    """The config fits a job of ``world_size`` processes.

    Raises:
        LaunchError: the batch is not a multiple of the world size, or the buffer has fewer
            chains (per class, for a class-split buffer) than there are processes.
    """
    batch, chains = cfg.optim.batch_size, cfg.chain.buffer_size
    if batch % world_size:
        raise LaunchError(
            f"--batch-size {batch}: the global batch must be a multiple of the "
            f"{world_size} processes"
        )
    sharded = world_size > 1 and cfg.generative and chains > 0
    if sharded and chains // classes < world_size:
        raise LaunchError(
            f"--buffer-size {chains}: too small to give each of the {world_size} processes a shard"
        )


def init_from_env(cfg: RunConfig) -> Dist:
    """Join the job torchrun launched (nothing happens without ``WORLD_SIZE``).

    Raises:
        LaunchError: too many processes for the visible GPUs, or a config that cannot be split.
    """
    if not launched():
        return SINGLE
    if dist.is_initialized():
        return current()
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    check_config(cfg, world)
    device = cfg.optim.device
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        check_devices(int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=cfg.distributed.timeout)
    backend = "nccl" if cuda else "gloo"
    store = _attempt_store(world, timeout)
    if store is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        rank = int(os.environ["RANK"])
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return current()


def _attempt_store(world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The store of this attempt of a job torchrun may restart, or None (``env://``).

    torchrun's agent keeps one store for the whole job (static rendezvous, the default with
    ``--master-addr``/``--master-port``), and ``env://`` reads and writes the same keys at
    every attempt: after a restart, a process reads the address its dead peer published at
    the previous attempt, and gloo fails with "connectFullMesh failed ... Connection
    refused". Keys under an attempt prefix keep the attempts apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"jem_ext/attempt_{restart_count()}", client)


def on_main(fn: Callable[[], T], d: Dist) -> T:
    """Run ``fn`` on rank 0 only and give every process its result (or raise its error)."""
    if not d.parallel:
        return fn()
    outcome: list[Any] = [None]
    if d.is_main:
        try:
            outcome[0] = (fn(), None)
        except Exception as err:  # every process raises it, not only rank 0
            outcome[0] = (None, err)
    dist.broadcast_object_list(outcome, src=0)
    value, error = outcome[0]
    if error is not None:
        raise error
    return value


def shutdown() -> None:
    """Leave the job together (a no-op for a single process).

    The barrier keeps a process from tearing its process group down while another one still
    talks to it: gloo aborts a process whose connections close under a pending operation.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:
            pass  # another process is gone: leave anyway
        dist.destroy_process_group()


def abandon(status: int) -> NoReturn:
    """Exit at once with ``status`` after a lost process: the broken process group cannot be
    torn down cleanly (gloo's teardown aborts the process when a peer vanished), and the job is
    over anyway, so the interpreter's teardown is skipped once the output is flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def describe(d: Dist, batch_size: int) -> str:
    """The job's line printed at start: processes, backend, global and per-process batch."""
    return (
        f"distributed: {d.world_size} processes ({d.backend}); --batch-size "
        f"{batch_size} is the global batch, {batch_size // d.world_size} per "
        f"process; learning rate as configured (gradients are averaged)"
    )


def local_device(device: torch.device, d: Dist) -> torch.device:
    """This process's device: its own GPU on CUDA."""
    if d.backend == "nccl":
        return torch.device("cuda", d.local_rank)
    return device


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """The module the loss goes through: DistributedDataParallel(model), or model alone."""
    if not d.parallel:
        return model
    ids = [d.local_rank] if d.backend == "nccl" else None
    return DistributedDataParallel(model, device_ids=ids)


def generator_seed(base: int, rank: int, iteration: int = 0) -> int:
    """Seed of a process's generator: ``base`` for rank 0 at the start, distinct otherwise."""
    return (base + _SEED_STRIDE * (rank + 7919 * iteration)) % (2**63)


# ----------------------------------------------------------------------------------- sharding


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


# -------------------------------------------------------------------------------- collectives


def _tensor(values: list[float] | list[int], dtype: torch.dtype, d: Dist) -> Tensor:
    device = torch.device("cuda", d.local_rank) if d.backend == "nccl" else None
    return torch.tensor(values, dtype=dtype, device=device)


def agree_on_divergence(reason: str | None, d: Dist) -> str | None:
    """Every process's verdict on the iteration: the first diverged process's reason, or None.

    One all-reduce of a flag; the reason's text travels only when some process diverged.
    """
    if not d.parallel:
        return reason
    flag = _tensor([0 if reason is None else 1], torch.int64, d)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return None
    reasons: list[Any] = [None] * d.world_size
    dist.all_gather_object(reasons, reason)
    rank = next(r for r, text in enumerate(reasons) if text is not None)
    return f"process {rank}: {reasons[rank]}"


def mean_terms(terms: dict[str, float], d: Dist) -> dict[str, float]:
    """The loss terms averaged over the processes (each process's own terms when single)."""
    if not d.parallel:
        return terms
    keys = sorted(terms)
    values = _tensor([terms[k] for k in keys], torch.float64, d)
    dist.all_reduce(values)
    return dict(zip(keys, (values / d.world_size).tolist()))


def accuracy(model: nn.Module, data: jdata.ImageData, d: Dist = SINGLE) -> float:
    """Classification accuracy of ``model`` on ``data``, shared out over the processes.

    Process ``r`` predicts evaluation batches ``r, r + N, ...`` (whole batches, so every logit
    is the one a single process computes) and the correct counts are summed.
    """
    if not d.parallel:
        return metrics.accuracy(predict_logits(model, data.x, EVAL_BATCH), data.y)
    correct = 0
    for start in range(d.rank * EVAL_BATCH, len(data), d.world_size * EVAL_BATCH):
        logits = predict_logits(model, data.x[start : start + EVAL_BATCH], EVAL_BATCH)
        labels = data.y[start : start + EVAL_BATCH].cpu()
        correct += int((logits.argmax(1) == labels).sum())
    counts = _tensor([correct], torch.int64, d)
    dist.all_reduce(counts)
    return int(counts.item()) / len(data) if len(data) else float("nan")


def is_communication_failure(err: BaseException, d: Dist) -> bool:
    """Whether ``err`` is a failed collective of a job with several processes.

    A failed all-reduce inside DistributedDataParallel's backward reaches Python through the
    autograd engine as a plain RuntimeError carrying the backend's text, hence the pattern.
    """
    if not d.parallel:
        return False
    return isinstance(err, DistError) or bool(_TRANSPORT_ERROR.search(str(err)))


def fail_message(err: BaseException, d: Dist, timeout: float) -> str:
    """The one line a process prints when a collective fails (a peer died or hung)."""
    text = str(err).strip()
    first = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
    return (
        f"error: process {d.rank} of {d.world_size}: communication with the other "
        f"processes failed ({first}); another process probably died or stopped answering "
        f"(collectives time out after --dist-timeout {timeout:g} s)"
    )


def print_main(line: str, d: Dist) -> None:
    """Print ``line`` to stderr on rank 0 only."""
    if d.is_main:
        print(line, file=sys.stderr)
