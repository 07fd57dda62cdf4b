"""Evaluation tools for JEM experiments.

Submodules (imported explicitly, so that e.g. matplotlib is only loaded when plotting):

- :mod:`jem_ext.eval.metrics`: expected calibration error, AUROC, FID and Inception Score.
- :mod:`jem_ext.eval.inception`: the FID Inception-v3 network, checkpoint loading, batched
  feature extraction and penultimate-layer features of any classifier.
- :mod:`jem_ext.eval.attacks`: PGD (L-inf and L2), the SGLD-refined classifier of the JEM
  robustness experiment, and robust-accuracy sweeps.
- :mod:`jem_ext.eval.plots`: reliability diagrams, log p(x) histograms and robustness curves.
"""
