"""Figures of the JEM experiments, each written to one PNG file.

Figures are drawn with matplotlib's object API and the Agg renderer (no pyplot, so the global
backend is untouched and nothing needs a display). Every file is written atomically: the PNG
goes to a temporary name in the destination folder and is then renamed with ``os.replace``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._io import atomic_path
from .metrics import CalibrationResult

__all__ = ["reliability_diagram", "logpx_histograms", "robustness_curve"]


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure attached to an Agg canvas."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_atomically(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> None:
    """Write ``fig`` as PNG to ``path`` atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def reliability_diagram(
    results: Mapping[str, CalibrationResult], path: str | os.PathLike, title: str | None = None
) -> None:
    """Reliability diagrams of one or more models side by side, written to ``path``.

    One column per model (e.g. JEM and its cross-entropy twin): the top panel shows the
    accuracy of each confidence bin as bars against the diagonal of perfect calibration, with
    the gap to the bin's mean confidence hatched in red; the small bottom panel shows
    how many samples fall in each bin. Each column's title gives the model's ECE in percent.
    """
    if not results:
        raise ValueError("reliability_diagram needs at least one result")
    fig = _new_figure((4.0 * len(results), 5.0))
    axes = fig.subplots(
        2, len(results), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for column, (label, res) in enumerate(results.items()):
        top, bottom = axes[0, column], axes[1, column]
        left = res.bin_edges[:-1]
        width = np.diff(res.bin_edges)
        filled = res.counts > 0
        accuracy = np.where(filled, res.accuracy, 0.0)
        confidence = np.where(filled, res.confidence, 0.0)
        top.bar(
            left,
            accuracy,
            width=width,
            align="edge",
            edgecolor="black",
            color="tab:blue",
            label="accuracy",
        )
        top.bar(
            left[filled],
            (confidence - accuracy)[filled],
            bottom=accuracy[filled],
            width=width[filled],
            align="edge",
            fill=False,
            hatch="//",
            edgecolor="tab:red",
            linewidth=0.5,
            label="gap to confidence",
        )
        top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        top.set(
            xlim=(0, 1),
            ylim=(0, 1),
            ylabel="accuracy",
            title=f"{label}: ECE = {100 * res.ece:.1f}%",
        )
        top.legend(loc="upper left", fontsize="small")
        bottom.bar(left, res.counts, width=width, align="edge", color="gray", edgecolor="black")
        bottom.set(xlabel="confidence max p(y|x)", ylabel="count")
    if title:
        fig.suptitle(title)
    _save_atomically(fig, path)


def logpx_histograms(scores: Mapping[str, np.ndarray], path: str | os.PathLike, title: str) -> None:
    """Overlaid, normalised histograms of log p(x) (up to a constant) for several data sets.

    All sets share the same bins, spanning the finite values of every set.
    """
    if not scores:
        raise ValueError("logpx_histograms needs at least one score set")
    arrays = {label: np.asarray(s, dtype=np.float64).ravel() for label, s in scores.items()}
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays.values()])
    if finite.size == 0:
        raise ValueError("logpx_histograms got no finite scores")
    bins = np.histogram_bin_edges(finite, bins=60)
    fig = _new_figure((6.0, 4.0))
    ax = fig.subplots()
    for label, a in arrays.items():
        ax.hist(a[np.isfinite(a)], bins=bins, density=True, alpha=0.5, label=label)
    ax.set(xlabel="log p(x) (up to a constant)", ylabel="density", title=title)
    ax.legend()
    _save_atomically(fig, path)


def robustness_curve(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    title: str,
    xlabel: str = "eps",
) -> None:
    """Accuracy against attack radius, one line per model (``[(eps, accuracy), ...]``)."""
    if not curves:
        raise ValueError("robustness_curve needs at least one curve")
    fig = _new_figure((6.0, 4.0))
    ax = fig.subplots()
    for label, points in curves.items():
        eps, acc = zip(*sorted(points))
        ax.plot(eps, acc, marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel="accuracy", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save_atomically(fig, path)
