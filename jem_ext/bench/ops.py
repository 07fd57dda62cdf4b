"""The ``env`` and ``ops`` stages: build facts, and the bandwidth of the fused ops."""

from __future__ import annotations

import platform
from dataclasses import asdict
from typing import Any

import torch

import jem_ext

from .. import ops
from .config import Sizes
from .timing import _gbps, time_stream


def stage_env(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Versions, build facts and the device's name."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "jem_ext": jem_ext.__version__,
        "build": dict(jem_ext.build_info),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "sizes": asdict(sizes),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def stage_ops(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Bandwidth of sgld_step_ and of the energy's forward + backward, as fractions of the
    device's measured device-to-device copy bandwidth.

    Every figure is the mean of ``op_reps`` back-to-back calls timed with CUDA events (the wall
    clock on the CPU), on tensors of ``sgld_elements`` floats (64 MB at the default 16M), more
    than the 50-60 MB L2 cache of an H100, so that the cache does not flatter them.
    """
    n = sizes.sgld_elements
    copy, sgld = _copy_and_sgld(device, n, sizes.op_reps)
    copy_gbps = _gbps(2 * 4 * n, copy["mean_s"])
    out: dict[str, Any] = {"copy": {**copy, "gbps": copy_gbps, "elements": n}}

    def add(name: str, timing: dict[str, float], nbytes: int, **facts: Any) -> None:
        gbps = _gbps(nbytes, timing["mean_s"])
        out[name] = {**timing, **facts, "gbps": gbps, "fraction_of_copy": gbps / copy_gbps}

    add("sgld_step_", sgld, 3 * 4 * n, elements=n)  # read x and g, write x
    for rows, classes in ((sizes.energy_rows, sizes.energy_classes), *sizes.energy_wide):
        name = "energy_fwd_bwd" if classes == sizes.energy_classes else f"energy_fwd_bwd_c{classes}"
        logits = torch.randn(rows, classes, device=device, requires_grad=True)

        def energy_fb(logits: torch.Tensor = logits) -> None:
            torch.autograd.grad(ops.energy(logits).sum(), [logits])

        # forward reads the logits; backward reads them again and writes their gradient
        nbytes = 3 * 4 * rows * classes + 3 * 4 * rows
        add(name, time_stream(energy_fb, device, sizes.op_reps), nbytes, rows=rows, classes=classes)
        del logits, energy_fb
    return out


def _copy_and_sgld(
    device: torch.device, n: int, reps: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Timings of a copy of ``n`` floats and of sgld_step_ on ``n`` floats (the tensors are
    freed on return, before the energy figures)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device)
    g = torch.randn(n, device=device)
    dst = torch.empty_like(x)
    copy = time_stream(lambda: dst.copy_(x), device, reps)
    sgld = time_stream(lambda: ops.sgld_step_(x, g, 1.0, 0.01, generator=gen), device, reps)
    return copy, sgld
