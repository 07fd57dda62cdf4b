"""The two fused ops of jem_ext, as torch ops with a documented Python face.

* :func:`sgld_step_`: one in-place SGLD update with Gaussian noise drawn
  inside the kernel (counter-based Philox, seeded from a torch Generator).
* :func:`energy` / :func:`energy_ce`: the JEM energy ``-logsumexp(logits)``
  (or ``-logits[y]``), and the energy together with the per-sample
  cross-entropy from one pass over the logits.

The kernels live in ``csrc/`` and are registered as ``torch.ops.jem_ext.*``
when :mod:`jem_ext._C` loads; this module adds what PyTorch needs around
them: fake (meta) kernels for ``torch.compile``, and the energy ops'
autograd (reverse and forward mode, first and second order) and vmap rules,
so that autograd, ``torch.autograd.forward_ad`` and the ``torch.func``
transforms differentiate them. The CPU kept-softmax path's autograd is C++
(``csrc/autograd/energy_autograd.cpp``).

The parts live in :mod:`jem_ext._ops`: ``sgld`` (the SGLD op and its argument checks),
``energy`` (the energy ops and the deferred label check), ``fake`` (the fake kernels) and
``autograd`` (the energy ops' autograd and vmap rules); importing this module registers them.
"""

from __future__ import annotations

from ._ops import autograd as _autograd  # noqa: F401  (registers the autograd and vmap rules)
from ._ops import fake as _fake  # noqa: F401  (registers the fake kernels)
from ._ops.energy import _LABEL_ERROR_OPS as _LABEL_ERROR_OPS
from ._ops.energy import check_label_record as check_label_record
from ._ops.energy import energy, energy_ce, raise_label_errors
from ._ops.energy import label_error_record as label_error_record
from ._ops.sgld import sgld_step_
from ._ops.sgld import sgld_step_philox_ as sgld_step_philox_

__all__ = ["sgld_step_", "energy", "energy_ce", "raise_label_errors"]
# Also part of the face, outside __all__ (imported "as" themselves above): sgld_step_philox_
# (the explicit-Philox hook), label_error_record and check_label_record (a label check batched
# with other reads) and _LABEL_ERROR_OPS (the record's op codes).
