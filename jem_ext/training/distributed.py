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

What N processes compute (every rule is a function of the config, the rank and N) is told
where it is done: this module joins the job, splits the batch and handles a lost process;
:mod:`.shards` gives each process its share of the replay buffer and generators and gathers
the checkpoint; :mod:`.collectives` holds what the processes compute together at each
iteration (the divergence verdict, the metrics row, the accuracy).

- ``--batch-size`` is the *global* batch. Every process draws each epoch's order from
  ``(seed, epoch)`` exactly as a single process does and takes rows ``rank, rank + N, ...``
  of every batch (``batch_size / N`` rows; the batch size must be a multiple of N; an epoch's
  last batch is skipped when it has fewer than N rows). DistributedDataParallel averages the
  gradients, so an iteration is one update on the global batch: iterations per epoch and the
  learning rate (schedule included) are the single-process ones, not scaled.
- Rank 0 writes the run folder (config.json, metrics.jsonl, sample grids, checkpoints,
  summary.json; config.json and summary.json record the world size and the global batch).
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .runconfig import RunConfig

T = TypeVar("T")
_TRANSPORT_ERROR = re.compile(
    r"gloo|nccl|c10d|connection (reset|closed|refused)|timed out", re.IGNORECASE
)
DistError = dist.DistError  # what a failed or timed-out collective raises


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


# ------------------------------------------------------------------------------ a lost process


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
