"""Evaluation tools for JEM experiments.

Submodules (imported explicitly, so that e.g. matplotlib is only loaded when plotting):

- :mod:`jem_ext.eval.cli`: the command line of ``python -m jem_ext.eval``, generated from the
  settings' groups.
- :mod:`jem_ext.eval.options`: every evaluation setting, once, in its group (one ``--help``
  section each); the task table the registry fills.
- :mod:`jem_ext.eval.checks`: the checks of the flags that are more than a range.
- :mod:`jem_ext.eval.settings`: :class:`EvalError`, :class:`EvalSettings` (the groups, the
  speed group being the trainer's) and the SGLD chain the tasks use.
- :mod:`jem_ext.eval.registry`: the tasks, one entry each (how each runs, what it prepares,
  its report.md section and figures); the task names follow from it.
- :mod:`jem_ext.eval.inputs`: checkpoints, their models, the test data and the OOD sets.
- :mod:`jem_ext.eval.tasks`: accuracy, calibration, OOD detection and robustness tasks.
- :mod:`jem_ext.eval.generation`: generation and IS/FID tasks.
- :mod:`jem_ext.eval.report`: runs the tasks for each model and assembles the report.
- :mod:`jem_ext.eval.writers`: report.json (standard JSON) and report.md.
- :mod:`jem_ext.eval.sections`: each task's report.md section.
- :mod:`jem_ext.eval.metrics`: accuracy, expected calibration error, AUROC, FID and IS.
- :mod:`jem_ext.eval.inception`: the FID Inception-v3 network and the loading of its weights.
- :mod:`jem_ext.eval.features`: batched feature extraction and penultimate-layer features of
  any classifier.
- :mod:`jem_ext.eval.attacks`: PGD (L-inf and L2), the SGLD-refined classifier of the JEM
  robustness experiment, and robust-accuracy sweeps.
- :mod:`jem_ext.eval.plots`: reliability diagrams, log p(x) histograms and robustness curves.
- :mod:`jem_ext.eval.speed`: the speed options (precision, channels-last, compile, CUDA-graph
  chains), through the helpers it shares with training
  (:mod:`jem_ext.accel`).
"""
