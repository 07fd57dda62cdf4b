"""TensorBoard event files for a run (``--tensorboard``), through ``torch.utils.tensorboard``.

:func:`open_tensorboard` gives a :class:`TensorBoardLog` writing into ``RUN/tensorboard/`` (on
the process that writes the run folder: rank 0 under torchrun), or a :class:`NullTensorBoard`
with the same methods that writes nothing. The trainer sends it what it logs: every scalar of
a metrics row (``train/loss``, ``train/ce``, ``train/px``, ``train/energy_data``,
``train/energy_sample``, ``train/accuracy``, ``train/lr``, ``train/w_px``, ``val/accuracy``),
the sample grids when they are drawn (``samples``) and histograms of the energies of the data
batch and of the samples (``energy/data``, ``energy/samples``), each at its iteration, plus the
run's events (resumes, recoveries, an energy split) as text.

``tensorboard`` is an optional extra (``pip install 'jem_ext[tensorboard]'``):
:func:`missing_message` says in one line when it is absent, so a run can refuse the flag before
it starts instead of failing mid-run. A resumed run opens its writer with ``purge_step`` one past
the checkpoint's iteration, so TensorBoard drops what the interrupted run logged after that
checkpoint, as ``metrics.jsonl`` is cut back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..modules import eval_mode

__all__ = [
    "TENSORBOARD_DIR",
    "energy_histograms",
    "NullTensorBoard",
    "TensorBoardLog",
    "missing_message",
    "open_tensorboard",
]

TENSORBOARD_DIR = "tensorboard"
INSTALL = "pip install 'jem_ext[tensorboard]' (or pip install tensorboard)"


def missing_message(flag: str = "--tensorboard") -> str | None:
    """None when ``torch.utils.tensorboard`` can write event files here; else one line saying
    what is missing and how to install it."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if getattr(err, "name", None) == "tensorboard":
            text = "the tensorboard package is not installed"
        return f"{flag}: {text}; install it with {INSTALL}"
    return None


class NullTensorBoard:
    """The writer of a run without ``--tensorboard`` (or of a process that does not write the
    run folder): every method does nothing."""

    enabled = False

    def __enter__(self) -> NullTensorBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        """Log each finite number of ``values`` as ``prefix/key`` at ``step``."""

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """Log a histogram of ``values`` at ``step``."""

    def image_file(self, tag: str, path: str | Path, step: int) -> None:
        """Log the picture in the PNG file ``path`` at ``step``."""

    def text(self, tag: str, text: str, step: int) -> None:
        """Log a line of text at ``step``."""

    def flush(self) -> None:
        """Write what is buffered to disk."""

    def close(self) -> None:
        """Flush and close the event file."""


class TensorBoardLog(NullTensorBoard):
    """Writes TensorBoard event files into ``log_dir`` (created when missing).

    Args:
        log_dir: the folder of the event files (``RUN/tensorboard``).
        purge_step: on a resume, the first iteration the resumed run logs again: events of
            this step or later in earlier files are dropped by TensorBoard.
    """

    enabled = True

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer: Any = SummaryWriter(
            log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=30
        )

    def __enter__(self) -> TensorBoardLog:
        return self

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        v = values.detach().float().flatten().cpu()
        v = v[torch.isfinite(v)]
        if v.numel() > 0:
            self._writer.add_histogram(tag, v.numpy(), step)

    def image_file(self, tag: str, path: str | Path, step: int) -> None:
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        self._writer.add_image(tag, pixels, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()


def energy_histograms(
    tb: NullTensorBoard,
    model: torch.nn.Module,
    x: torch.Tensor,
    x_q: torch.Tensor | None,
    step: int,
) -> None:
    """Histograms of ``E(x)`` over a data batch (``energy/data``) and over samples
    (``energy/samples``), the model in eval mode (as the chains see it), without gradients."""
    if not tb.enabled:
        return
    from .. import ops

    with eval_mode(model), torch.no_grad():
        tb.histogram("energy/data", ops.energy(model(x).float()), step)
        if x_q is not None:
            tb.histogram("energy/samples", ops.energy(model(x_q).float()), step)


def open_tensorboard(
    run_dir: str | Path, enabled: bool, purge_step: int | None = None
) -> NullTensorBoard:
    """The run's TensorBoard writer: a :class:`TensorBoardLog` into ``run_dir/tensorboard`` when
    ``enabled`` (check :func:`missing_message` first), else a :class:`NullTensorBoard`."""
    if not enabled:
        return NullTensorBoard()
    return TensorBoardLog(Path(run_dir) / TENSORBOARD_DIR, purge_step=purge_step)
