"""Timing helpers and the guards that keep a failing or late bench stage from losing the others."""

from __future__ import annotations

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
