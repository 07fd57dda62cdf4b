"""A package of model factories that tests write into their tmp_path (``--model
jemtest_factories.models:NAME``): good ones, one with BatchNorm, and each way a factory can fail."""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = "jemtest_factories"
MODULE = f"{PACKAGE}.models"

SOURCE = '''
import math

import torch
from torch import nn


def tiny(num_classes, in_shape):
    """A two-layer perceptron over the flattened input."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(in_shape), 16), nn.SiLU(), nn.Linear(16, num_classes)
    )


def conv(num_classes, in_shape):
    """A small convolutional network (LeakyReLU, no normalisation)."""
    return nn.Sequential(
        nn.Conv2d(in_shape[0], 8, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def with_batchnorm(num_classes, in_shape):
    """conv with a BatchNorm layer."""
    return nn.Sequential(
        nn.Conv2d(in_shape[0], 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.LeakyReLU(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def wider(num_classes, in_shape):
    """tiny with 32 hidden units: another architecture for the same name's weights."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(in_shape), 32), nn.SiLU(), nn.Linear(32, num_classes)
    )


def wrong_classes(num_classes, in_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes + 1))


def no_flatten(num_classes, in_shape):
    """Fails in forward: a linear layer on an unflattened image."""
    return nn.Linear(3, num_classes)


def raises(num_classes, in_shape):
    raise RuntimeError("this factory needs a GPU")


def not_a_module(num_classes, in_shape):
    return 42


class Nets:
    @staticmethod
    def tiny(num_classes, in_shape):
        return tiny(num_classes, in_shape)


NOT_CALLABLE = 3
'''

BROKEN = "import a_package_that_is_not_installed\n"


def write_factories(root: Path, monkeypatch) -> str:
    """Write the package under ``root`` (imported from there, by this process and by child
    processes through PYTHONPATH) and return the module name ``jemtest_factories.models``."""
    folder = root / "factory_src"
    pkg = folder / PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(SOURCE)
    (pkg / "broken.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    forget_factories()
    return MODULE


def forget_factories() -> None:
    """Drop the package from the import cache (as if this process had never imported it)."""
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
