"""Timing helpers, the machine's name, and the guards that keep a failing or late bench stage
from losing the others."""

from __future__ import annotations

import platform
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a clock read after it counts
    that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1
) -> dict[str, float]:
    """Median and best wall seconds of ``fn()`` over ``reps`` runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "best_s": min(times)}


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    reps: int,
    device: torch.device | None = None,
    clock: Callable[[], float] = time.perf_counter,
    warmup: int = 1,
) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, by name, over ``reps`` repeats.

    The functions take turns within each repeat, so a change in the machine's load slows all of
    them alike and their ratios stay fair. ``warmup`` untimed rounds come first. ``clock``:
    ``time.perf_counter`` (wall) or ``time.thread_time`` (the calling thread's CPU time: on a
    shared machine the time spent descheduled is left out). On CUDA each call is waited for.
    """
    device = device if device is not None else torch.device("cpu")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            sync(device)
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_name() -> str:
    """The CPU's model name (``model name`` in /proc/cpuinfo, as lscpu shows it), else what
    :mod:`platform` knows (the processor, else the architecture)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_stream(fn: Callable[[], Any], device: torch.device, reps: int) -> dict[str, float]:
    """Mean seconds per call of ``fn()`` over ``reps`` back-to-back calls.

    On CUDA two events bracket the calls, so the figure is device time without a host
    synchronisation between calls (the launch overhead hides behind the kernels, as in a real
    loop); elsewhere the wall clock. One untimed call first.
    """
    fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        seconds = time.perf_counter() - t0
    return {"mean_s": seconds / reps, "reps": reps}


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _within(deadline: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``_guarded(fn)`` when there is time left before ``deadline``, else a skip record."""
    if time.perf_counter() > deadline:
        return {"skipped": "time budget (--budget-s) spent"}
    return _guarded(fn)


def _guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or ``{"error": ...}`` when it raises (the other stages still run)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 -- a bench stage must not lose the others
        tb = traceback.format_exc(limit=3).strip().splitlines()
        return {"error": f"{type(err).__name__}: {err}".strip(), "where": tb[-3:]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
