"""The trainer behind ``python -m jem_ext.train``, one concern per module.

- :mod:`.flags`: the command-line flags (one parser).
- :mod:`.config`: config files, merging, validation of every value.
- :mod:`.setup`: :func:`~.setup.build_run` gathers data, model, optimiser, sampler and
  generators into a :class:`~.setup.Run`; :func:`~.setup.build_context` builds the
  :class:`~.step.StepContext`, the seam for precision, CUDA-graph and distributed options.
- :mod:`.step`: :func:`~.step.train_step`, JEM's Algorithm 1.
- :mod:`.loop`: :func:`~.loop.train`, the epochs, validation, summary.
- :mod:`.state`: :class:`~.state.RunState`, the run's progress.
- :mod:`.saver`: :class:`~.saver.CheckpointSaver`, best/last checkpoints and resume.
- :mod:`.guard`: :class:`~.guard.DivergenceGuard`.
- :mod:`.runlog`: metrics rows, progress, sample pictures.
- :mod:`.folder`: :class:`~.folder.RunFolder`, one training process per run folder.
- :mod:`.cli`: :func:`~.cli.main`, checks every input before writing anything.
"""
