"""jem_ext.ops is the ops' one public face: the names it always had, whichever part of
jem_ext._ops defines them, and importing it registers the fake, autograd and vmap rules."""

from __future__ import annotations

import pytest
import torch

from jem_ext import _ops, ops

FACE = {
    "sgld_step_": _ops.sgld,
    "sgld_step_philox_": _ops.sgld,
    "energy": _ops.energy,
    "energy_ce": _ops.energy,
    "raise_label_errors": _ops.energy,
    "label_error_record": _ops.energy,
    "check_label_record": _ops.energy,
    "_LABEL_ERROR_OPS": _ops.energy,
}


def test_the_face_keeps_its_names():
    assert ops.__all__ == ["sgld_step_", "energy", "energy_ce", "raise_label_errors"]
    for name, part in FACE.items():
        assert getattr(ops, name) is getattr(part, name), name
    public = {n for n in vars(ops) if not n.startswith("_")} - {"annotations"}
    assert public == {n for n in FACE if not n.startswith("_")}


def test_importing_the_face_registers_every_rule():
    for op in ("energy", "energy_ce", "energy_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"jem_ext::{op}", "Autograd"), op
    # fake kernels: a meta tensor goes through the op's shape checks and gets its output shape
    logits = torch.empty(5, 3, device="meta")
    assert ops.energy(logits).shape == (5,)
    x = torch.empty(2, 4, device="meta")
    with pytest.raises(RuntimeError, match="sgld_step_: grad must have x's shape"):
        torch.ops.jem_ext.sgld_step_(x, x[:1], 0.1, 0.0)
    # vmap rule: a batch of row-wise calls is one call on all rows
    batch = torch.randn(3, 4, 5, dtype=torch.float64)
    got = torch.func.vmap(ops.energy)(batch)
    assert torch.allclose(got, -torch.logsumexp(batch, dim=2))
