"""The parts of :mod:`jem_ext.ops`, one concern each; import them through :mod:`jem_ext.ops`.

- :mod:`~jem_ext._ops.sgld`: ``sgld_step_`` / ``sgld_step_philox_`` and their argument checks.
- :mod:`~jem_ext._ops.energy`: ``energy`` / ``energy_ce`` and the deferred label check.
- :mod:`~jem_ext._ops.fake`: the fake (meta) kernels of every op.
- :mod:`~jem_ext._ops.autograd`: the energy ops' autograd Functions, their vmap rules and
  the Autograd kernels that apply them.
"""
