"""The ``env`` and ``ops`` stages: build facts, and the bandwidth of the fused ops."""

from __future__ import annotations

import platform
from dataclasses import asdict
from typing import Any

import torch

import jem_ext

from .. import ops
from .config import Sizes
from .timing import _gbps, time_call


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
    """Bandwidth of sgld_step_ and of the energy's forward + backward against a copy."""
    n, gen = sizes.sgld_elements, torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device)
    g = torch.randn(n, device=device)
    dst = torch.empty_like(x)
    copy = time_call(lambda: dst.copy_(x), device, sizes.op_reps)
    sgld = time_call(lambda: ops.sgld_step_(x, g, 1.0, 0.01, generator=gen), device, sizes.op_reps)
    copy_gbps = _gbps(2 * 4 * n, copy["median_s"])
    sgld_gbps = _gbps(3 * 4 * n, sgld["median_s"])  # read x and g, write x

    rows, classes = sizes.energy_rows, sizes.energy_classes
    logits = torch.randn(rows, classes, device=device, requires_grad=True)
    small = torch.empty(rows * classes, device=device)
    src = torch.randn(rows * classes, device=device)
    e_copy = time_call(lambda: small.copy_(src), device, sizes.op_reps)

    def energy_fb() -> None:
        (grad,) = torch.autograd.grad(ops.energy(logits).sum(), [logits])

    energy = time_call(energy_fb, device, sizes.op_reps)
    # forward reads the logits; backward reads them again and writes their gradient
    energy_bytes = 3 * 4 * rows * classes + 3 * 4 * rows
    e_copy_gbps = _gbps(2 * 4 * rows * classes, e_copy["median_s"])
    energy_gbps = _gbps(energy_bytes, energy["median_s"])
    return {
        "copy": {**copy, "gbps": copy_gbps, "elements": n},
        "sgld_step_": {**sgld, "gbps": sgld_gbps, "fraction_of_copy": sgld_gbps / copy_gbps},
        "energy_copy": {**e_copy, "gbps": e_copy_gbps},
        "energy_fwd_bwd": {
            **energy,
            "gbps": energy_gbps,
            "rows": rows,
            "classes": classes,
            "fraction_of_copy": energy_gbps / e_copy_gbps,
        },
    }
