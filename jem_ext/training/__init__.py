"""The trainer behind ``python -m jem_ext.train``, one concern per module.

- :mod:`.options`: every setting, once, in its group (name, type, default, range, help).
- :mod:`.runconfig`: :class:`~.runconfig.RunConfig`, the validated config made of those groups;
  the parser, the defaults and the validation are generated from them.
- :mod:`.config`: the command line and config files merged into one validated config.
- :mod:`.setup`: :func:`~.setup.build_run` gathers data, model, optimiser, sampler and
  generators into a :class:`~.setup.Run`; :func:`~.setup.build_context` builds the
  :class:`~.step.StepContext`, the seam for precision, CUDA-graph and distributed options (the
  options themselves live in :mod:`jem_ext.accel`, shared with the evaluation).
- :mod:`.step`: :func:`~.step.train_step`, JEM's Algorithm 1.
- :mod:`.loop`: the epochs (:func:`~.loop.train_one_epoch` and :func:`~.loop.validate` take
  what they read as arguments and return their metrics); :mod:`.schedule`: the learning rate,
  the p(x) weight's decay, the data order and the budget, as pure functions.
- :mod:`.trainer`: :func:`~.trainer.train`, a run from start to summary.
- :mod:`.state`: :class:`~.state.RunState`, the run's progress.
- :mod:`.saver`: :class:`~.saver.CheckpointSaver`, best/last checkpoints and the last good state.
- :mod:`.resume`: a run's checkpoint dict, and a checkpoint loaded back into a run.
- :mod:`.guard`: :class:`~.guard.DivergenceGuard` (its verdicts) and the split watch.
- :mod:`.runlog`: metrics rows, progress, sample pictures.
- :mod:`.folder`: :class:`~.folder.RunFolder`, one training process per run folder.
- :mod:`.cli`: :func:`~.cli.main`, checks every input before writing anything.
- :mod:`.distributed`, :mod:`.shards`, :mod:`.collectives`: a job of several processes
  (joining it and losing a process; each process's share and the gathered checkpoint; what the
  processes compute together at each iteration).

Imports go downwards only: this package and :mod:`jem_ext.eval` use the modules at the
package's top level and never each other (``tests/test_layers.py`` draws the imports).
"""
