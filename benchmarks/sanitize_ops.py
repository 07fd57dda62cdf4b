"""Every jem_ext op, every dtype, once forward and once backward, on the shapes that reach the
kernels' edge cases: the workload of benchmarks/gpu_check.sh's compute-sanitizer pass.

    python benchmarks/sanitize_ops.py [--device cuda] [--only energy]

Shapes: C = 1, C not a multiple of 32 (3, 37), C = 1,000 (warp and block layouts), C = 100,000
(block per row), B = 0, rows that start off a 16-byte boundary, a channels-last SGLD input,
grad that is x, and a bad label (a NaN row and a deferred error on CUDA). Small batches keep
the sanitizer's slow-down to seconds. ``--only energy`` runs the reduction kernels alone (the
racecheck pass). Prints one line per group and ``sanitize_ops: ok`` at the end; any mismatch
against a float64 reference raises.
"""

from __future__ import annotations

import argparse
import sys

import torch

from jem_ext import ops

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (rows, classes): sub-warp, warp, block layouts and the empty batch
ENERGY_SHAPES = ((5, 1), (4, 3), (33, 37), (3, 1000), (1100, 1000), (2, 100_000), (0, 10))
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOL[dtype]
    if not torch.allclose(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol):
        err = (got.double().cpu() - want.double().cpu()).abs().max().item()
        raise AssertionError(f"{what}: max error {err:.3g} over tolerance {tol}")


def energy_ops(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for rows, classes in ENERGY_SHAPES:
            for offset in (0, 1):  # 1: every row starts off a 16-byte boundary
                flat = torch.randn(rows * classes + 1, generator=gen).to(device, dtype)
                logits = flat[offset : offset + rows * classes].view(rows, classes)
                logits.requires_grad_(True)
                y = torch.randint(0, classes, (rows,), generator=gen).to(device)
                ref, y_ref = logits.detach().cpu().double(), y.cpu()  # no extra device work
                what = f"{dtype} {rows}x{classes} offset {offset}"
                e = ops.energy(logits)
                (g,) = torch.autograd.grad(e.sum(), [logits])
                _close(e, -torch.logsumexp(ref, 1), dtype, f"energy {what}")
                _close(g, -torch.softmax(ref, 1), dtype, f"energy grad {what}")
                e_y = ops.energy(logits, y)
                (g_y,) = torch.autograd.grad(e_y.sum(), [logits])
                _close(e_y, -ref.gather(1, y_ref[:, None]).squeeze(1), dtype, f"energy(y) {what}")
                e2, ce = ops.energy_ce(logits, y)
                (g_ce,) = torch.autograd.grad(ce.sum() + e2.sum(), [logits])
                want_ce = torch.nn.functional.cross_entropy(ref, y_ref, reduction="none")
                _close(ce, want_ce, dtype, f"energy_ce {what}")
                del g_y, g_ce
        print(f"sanitize_ops: energy, energy(y), energy_ce and backward in {dtype}", flush=True)
    # a bad label: NaN row, error raised now (CPU) or from the device's record (CUDA)
    logits = torch.zeros(3, 40, device=device)
    y = torch.tensor([0, 40, 1], device=device)
    try:
        ops.energy_ce(logits, y)
        ops.raise_label_errors(device)
    except RuntimeError as err:
        assert "y[1] = 40 is out of range for 40 classes" in str(err), err
    else:
        raise AssertionError("a label out of range went unreported")
    ops.raise_label_errors(device)  # cleared
    print("sanitize_ops: bad label reported", flush=True)


def sgld_ops(device: torch.device) -> None:
    for dtype in DTYPES:
        for shape in ((0,), (1,), (7,), (4099,), (2, 3, 5, 7)):
            x = torch.rand(shape, device=device).to(dtype)
            g = torch.randn(shape, device=device).to(dtype)
            ops.sgld_step_(x, g, 0.1, 0.01, clamp_min=-1.0, clamp_max=1.0)
            ops.sgld_step_philox_(x, g, 0.1, 0.01, seed=1, offset=8, grad_clip=0.5)
            ops.sgld_step_(x, x, 0.1, 0.0)  # grad is x
            assert not torch.isnan(x).any(), f"sgld_step_ {dtype} {shape}: NaN"
        cl = torch.rand(4, 3, 9, 9, device=device).to(dtype)
        cl = cl.contiguous(memory_format=torch.channels_last)
        ops.sgld_step_(cl, torch.randn_like(cl), 0.1, 0.01)
        unaligned = torch.rand(4101, device=device).to(dtype)[1:]  # off a 16-byte boundary
        ops.sgld_step_(unaligned, unaligned.clone(), 0.1, 0.01)
        # the autograd wrapper refuses a differentiable grad: the forward path is all there is
        print(f"sanitize_ops: sgld_step_ and _sgld_step_philox_ in {dtype}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=("energy", "sgld"), default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.only in (None, "energy"):
        energy_ops(device)
    if args.only in (None, "sgld"):
        sgld_ops(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"sanitize_ops: ok ({device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
