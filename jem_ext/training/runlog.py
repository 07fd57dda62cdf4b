"""What a run writes as it goes: metrics rows, progress on stderr, sample pictures."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import matplotlib
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import data as jdata
from .._io import atomic_path, atomic_write_text, with_filename
from ..chain import ChainSpec
from ..sampler import sample_from_noise
from .tensorboard import NullTensorBoard

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

GRID_COLUMNS = 8  # images per row of a sample grid
GRID_IMAGES = 64
GRID_CHAINS = 64  # chains drawn for a sample grid when the run has no samples of its own
PLAIN_STEP = 5  # percent of the run between two plain progress lines


def json_default(obj: Any) -> Any:
    """JSON for the non-JSON values a config or a row may hold (paths, tensors)."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def finite_or_none(value: Any) -> float | None:
    """JSON-safe float: NaN/inf (e.g. terms an objective does not compute) become null."""
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLog:
    """Appends JSON rows to ``metrics.jsonl``, one per line, flushed as written.

    Use as a context manager: the file is open inside the ``with`` block. Disabled (the
    processes of a distributed job other than rank 0), it writes nothing. Every row also goes
    to ``tensorboard`` (``--tensorboard``; see :func:`mirror_row`).
    """

    def __init__(
        self, path: Path, enabled: bool = True, tensorboard: NullTensorBoard | None = None
    ) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.tensorboard = tensorboard if tensorboard is not None else NullTensorBoard()
        self._file: TextIO | None = None

    def __enter__(self) -> MetricsLog:
        if self.enabled:
            self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as err:
                if exc_type is None:  # else the error in flight already says what failed
                    raise with_filename(err, self.path) from None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._file is not None, "MetricsLog.write outside its with block"
        try:
            self._file.write(json.dumps(row, default=json_default) + "\n")
            self._file.flush()
        except OSError as err:  # a full disk: say which file
            raise with_filename(err, self.path) from None
        mirror_row(self.tensorboard, row)


# metrics-row keys that are positions, not measurements
_POSITION_KEYS = ("iteration", "epoch", "seconds")


def mirror_row(tb: NullTensorBoard, row: dict[str, Any]) -> None:
    """A metrics row in TensorBoard at its iteration: an event (resume, recovery, energy
    split, stop) as text under ``events``; a validation row's ``val_accuracy`` as
    ``val/accuracy``; every other number of a training row as ``train/<key>``."""
    if not tb.enabled:
        return
    step = int(row.get("iteration", 0))
    if "event" in row:
        details = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("event", "iteration"))
        tb.text("events", f"{row['event']} at iteration {step}: {details}", step)
    elif "val_accuracy" in row:
        tb.scalars(step, {"accuracy": row["val_accuracy"]}, prefix="val")
    else:
        tb.scalars(step, {k: v for k, v in row.items() if k not in _POSITION_KEYS})


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metrics rows written after ``iteration`` (by the run that was interrupted)."""
    if not path.is_file():
        return
    kept = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
            if isinstance(row, dict) and row.get("iteration", 0) <= iteration:
                kept.append(line.rstrip("\n"))
    atomic_write_text(path, "".join(k + "\n" for k in kept))


class Progress:
    """Progress on stderr; a context manager.

    On a terminal, a tqdm bar updated in place. Elsewhere (a log file, a pipe), carriage-return
    updates would pile up, so a plain line is printed each time another :data:`PLAIN_STEP`
    percent of the run is done. Disabled, nothing is printed.
    """

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._plain = enabled and not self._stream.isatty()
        self.total, self.done, self.desc = total, min(initial, total), desc
        self._last_percent = self._percent()
        self._postfix = ""
        if enabled and not self._plain:
            self._bar = tqdm(
                total=total,
                initial=self.done,
                desc=desc,
                unit="it",
                dynamic_ncols=True,
                file=self._stream,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def _percent(self) -> int:
        return 100 * self.done // max(1, self.total)

    def step(self, terms: dict[str, float] | None) -> None:
        """One iteration done; ``terms`` (None after a recovery) are shown beside the count."""
        self.done += 1
        if terms is not None:
            self._postfix = (
                f"loss={terms['loss']:.3g}, acc={terms.get('accuracy', float('nan')):.2f}"
            )
        if self._bar is not None:
            self._bar.update(1)
            if terms is not None:
                self._bar.set_postfix_str(self._postfix, refresh=False)
        elif self._plain and self._percent() >= self._last_percent + PLAIN_STEP:
            self._last_percent = self._percent() - self._percent() % PLAIN_STEP
            self._line(
                f"{self.desc}: {self.done}/{self.total} it ({self._percent()}%) "
                f"{self._postfix}".rstrip()
            )

    def describe(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def note(self, message: str) -> None:
        """A message line that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        elif self._plain:
            self._line(message)

    def _line(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()


def save_samples(x: torch.Tensor, path: Path, data: jdata.ImageData) -> None:
    """Write a sample grid (images, full rows only) or a scatter plot over the data (2-D)."""
    if x.dim() == 4:
        n = min(len(x), GRID_IMAGES)
        if n >= GRID_COLUMNS:
            n -= n % GRID_COLUMNS
        jdata.save_image_grid(x[:n], path, nrow=min(n, GRID_COLUMNS))
        return
    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    d = data.x[:1000].cpu()
    ax.scatter(d[:, 0], d[:, 1], s=2, c="lightgray", label="data")
    s = x.detach().cpu()
    ax.scatter(s[:, 0], s[:, 1], s=4, c="tab:red", label="samples")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_aspect("equal")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


class SampleGrids:
    """The run's sample grids, ``samples/samples_<tag>.png`` (and TensorBoard's ``samples``).

    A grid shows :attr:`latest`, the run's latest SGLD samples, or, without any (CE runs, or
    nothing sampled yet), :data:`GRID_CHAINS` chains from noise (``chain``, at least one
    step, seeded from ``seed`` and the iteration). Disabled (the processes of a distributed
    job other than rank 0), it writes nothing.
    """

    def __init__(
        self,
        folder: Path,
        data: jdata.ImageData,
        chain: ChainSpec,
        seed: int,
        tensorboard: NullTensorBoard | None = None,
        enabled: bool = True,
    ) -> None:
        self.folder, self.data, self.chain, self.seed = Path(folder), data, chain, seed
        self.tensorboard = tensorboard if tensorboard is not None else NullTensorBoard()
        self.enabled = enabled
        self.latest: Tensor | None = None

    def write(self, tag: str, model: nn.Module, iteration: int) -> None:
        """Save the grid ``samples_<tag>.png`` of ``model`` at ``iteration``."""
        if not self.enabled:
            return
        x = self.latest
        if x is None:
            x = sample_from_noise(
                model,
                GRID_CHAINS,
                self.data.shape,
                spec=self.chain.with_steps(max(1, self.chain.n_steps)),
                seed=self.seed * 7 + iteration,
            )
        path = self.folder / f"samples_{tag}.png"
        save_samples(x, path, self.data)
        self.tensorboard.image_file("samples", path, iteration)
