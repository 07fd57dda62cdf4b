"""jem_ext: Joint Energy-based Models with fused C++/CUDA ops.

Importing the package loads the compiled op library (``jem_ext._C``), which
registers ``torch.ops.jem_ext.*``; :mod:`jem_ext.ops` is their Python face.
"""

import torch as _torch

try:
    from . import _build_info
except ImportError as exc:  # pragma: no cover - only in a broken checkout
    raise ImportError(
        "jem_ext's compiled part is missing: this is the source tree, not a build. "
        "Set up with `bash scripts/setup.sh` (an editable build), or `pip install .` "
        "and run from outside the source checkout (see README.md)"
    ) from exc

if _torch.__version__ != _build_info.TORCH_VERSION:
    raise ImportError(
        f"jem_ext was built against torch {_build_info.TORCH_VERSION} but torch "
        f"{_torch.__version__} is installed; rebuild it against this torch with "
        "`pip install --no-build-isolation --force-reinstall .`"
    )

from . import (
    _C,  # noqa: E402  (registers the ops)
    ops,  # noqa: E402
)

__version__: str = _build_info.VERSION
build_info: dict = dict(_C.build_info)

__all__ = ["__version__", "build_info", "load", "ops"]


def __getattr__(name: str):
    # jem_ext.load (jem_ext.trained.load) is imported on first use: it pulls in the data
    # readers and the sampler, which a plain `import jem_ext` does not need.
    if name == "load":
        from .trained import load

        return load
    raise AttributeError(f"module 'jem_ext' has no attribute {name!r}")
