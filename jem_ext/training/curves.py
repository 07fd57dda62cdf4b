"""``curves.png``: a run's training curves, drawn from its ``metrics.jsonl``.

:func:`write_curves` reads the run folder's metrics rows and draws, against iterations, the loss
terms (loss, cross-entropy, the p(x) term ``E(x) - E(x_q)``), the training batch accuracy and
the validation accuracy, the energies of data and samples, the learning rate and the p(x)
weight. The events the trainer records in the same file are marked on every panel: resumes
(``--resume`` and torchrun restarts), recoveries from a divergence, the iteration where the
energies of data and samples split, and a stop. It is a pure function of the files: the trainer
calls it when a run ends, stops on its budget or is interrupted, and it can be called on any run
folder afterwards (``python -c "from jem_ext.training.curves import write_curves;
write_curves('runs/RUN')"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

from .._io import atomic_path

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

__all__ = ["CURVES", "EVENT_STYLES", "draw_curves", "px_weights", "read_metrics", "write_curves"]

CURVES = "curves.png"

# event name in metrics.jsonl -> (label, colour, line style)
EVENT_STYLES: dict[str, tuple[str, str, str]] = {
    "resume": ("resume", "tab:green", ":"),
    "recovery": ("recovery", "tab:red", "--"),
    "energy_split": ("energy split", "tab:purple", "-."),
    "stopped": ("stopped (diverged)", "black", "-"),
}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON rows of a ``metrics.jsonl`` (lines that are not a JSON object, such as one cut
    short by a kill, are skipped; a missing file has none)."""
    rows = []
    try:
        with Path(path).open(encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("iteration"), (int, float)):
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows


def _value(row: dict[str, Any], key: str) -> float:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]] | None:
    """``(iterations, values)`` of ``key`` over ``rows``, or None when no row has a finite one."""
    xs = [float(r["iteration"]) for r in rows]
    ys = [_value(r, key) for r in rows]
    if not any(math.isfinite(y) for y in ys):
        return None
    return xs, ys


def px_weights(rows: list[dict[str, Any]], config: dict[str, Any]) -> list[float]:
    """The p(x) weight of each training row: its own ``w_px`` when it has one, else the config's
    weight with its step decay at the row's epoch (rows written before the weight was logged)."""
    base = _value(config, "w_px")
    rate = _value(config, "w_px_decay_rate")
    epochs = config.get("w_px_decay_epochs") or []
    out = []
    for r in rows:
        w = _value(r, "w_px")
        if not math.isfinite(w) and math.isfinite(base):
            epoch = _value(r, "epoch")
            cuts = sum(1 for e in epochs if isinstance(e, (int, float)) and epoch >= e)
            w = base * (rate**cuts if math.isfinite(rate) else 1.0)
        out.append(w)
    return out


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _mark_events(ax: Any, events: Iterable[dict[str, Any]]) -> None:
    for e in events:
        _, colour, style = EVENT_STYLES[e["event"]]
        ax.axvline(float(e["iteration"]), color=colour, linestyle=style, linewidth=1.0, alpha=0.8)


def _plot(ax: Any, series: tuple[list[float], list[float]] | None, label: str, **kw: Any) -> bool:
    if series is None:
        return False
    ax.plot(*series, label=label, linewidth=0.9, **kw)
    return True


def _event_text(event: dict[str, Any]) -> str:
    it = event["iteration"]
    kind = event["event"]
    if kind == "resume":
        overrides = event.get("overrides") or {}
        changed = f", changed {', '.join(sorted(overrides))}" if overrides else ""
        return f"it {it}: resumed{changed}"
    if kind == "recovery":
        scale = event.get("lr_scale")
        lr = f", lr x{scale:g}" if isinstance(scale, (int, float)) else ""
        return f"it {it}: recovery{lr} ({event.get('reason', '')})"
    if kind == "energy_split":
        return (
            f"it {it}: energies split (data {_value(event, 'energy_data'):.3g}, "
            f"samples {_value(event, 'energy_sample'):.3g})"
        )
    return f"it {it}: stopped ({event.get('reason', '')})"


def draw_curves(
    rows: list[dict[str, Any]], config: dict[str, Any], name: str, status: str | None = None
) -> Figure:
    """The figure of :func:`write_curves` for metrics ``rows`` and a run's ``config`` (the
    caller closes it): five panels against iterations, each with the events marked as vertical
    lines, and a sixth listing the events."""
    train = [r for r in rows if "event" not in r and "loss" in r]
    val = [r for r in rows if "event" not in r and "val_accuracy" in r]
    events = [r for r in rows if r.get("event") in EVENT_STYLES]

    fig, axes = plt.subplots(3, 2, figsize=(11, 10), dpi=80)
    (ax_loss, ax_acc), (ax_energy, ax_lr), (ax_wpx, ax_events) = axes
    title = f"{name}: {config.get('dataset', '?')}/{config.get('objective', '?')}, "
    title += f"model {config.get('model', '?')}"
    last = max((float(r["iteration"]) for r in rows), default=0.0)
    title += f"; {status}" if status else ""
    title += f" at iteration {last:g}" if rows else "; no iteration logged yet"
    fig.suptitle(title, fontsize=11)

    _plot(ax_loss, _series(train, "loss"), "loss")
    _plot(ax_loss, _series(train, "ce"), "cross-entropy")
    _plot(ax_loss, _series(train, "px"), "p(x) term E(x) - E(x_q)")
    ax_loss.set_title("loss terms")

    _plot(ax_acc, _series(train, "accuracy"), "train (batch)", alpha=0.7)
    val_acc = _series(val, "val_accuracy")
    if val_acc is not None:
        ax_acc.plot(*val_acc, "o-", label="validation", markersize=3)
    ax_acc.set_title("accuracy")

    _plot(ax_energy, _series(train, "energy_data"), "data E(x)")
    _plot(ax_energy, _series(train, "energy_sample"), "samples E(x_q)")
    ax_energy.set_title("energies")

    _plot(ax_lr, _series(train, "lr"), "learning rate")
    ax_lr.set_title("learning rate")

    if config.get("objective") == "ce":
        ax_wpx.text(0.5, 0.5, "no p(x) term (objective ce)", ha="center", va="center")
    elif train:
        ax_wpx.plot(
            [float(r["iteration"]) for r in train], px_weights(train, config), label="p(x) weight"
        )
    ax_wpx.set_title("p(x) weight")

    for ax in (ax_loss, ax_acc, ax_energy, ax_lr, ax_wpx):
        _mark_events(ax, events)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")

    ax_events.axis("off")
    ax_events.set_title("events")
    lines = [_event_text(e) for e in events] or ["none (no resume, recovery or split)"]
    if len(lines) > 18:
        lines = lines[:17] + [f"... and {len(lines) - 17} more (see metrics.jsonl)"]
    ax_events.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace")
    kinds = [k for k in EVENT_STYLES if any(e["event"] == k for e in events)]
    if kinds:
        handles = [
            Line2D([], [], color=EVENT_STYLES[k][1], linestyle=EVENT_STYLES[k][2]) for k in kinds
        ]
        ax_events.legend(handles, [EVENT_STYLES[k][0] for k in kinds], loc="lower left", fontsize=8)
    # a fixed layout: tight_layout measures every tick label and costs more than the drawing
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.06, top=0.93, hspace=0.42, wspace=0.22)
    return fig


def write_curves(
    run_dir: str | Path, status: str | None = None, out: str | Path | None = None
) -> Path:
    """Draw the run's curves into ``run_dir/curves.png`` (or ``out``), atomically.

    Args:
        run_dir: the run folder (its ``metrics.jsonl`` and ``config.json`` are read).
        status: how the run stands (e.g. ``"budget"``, ``"interrupted"``), shown in the title.
        out: where to write (default ``run_dir/curves.png``).

    Returns:
        The path written.

    Raises:
        OSError: the file cannot be written.
    """
    run_dir = Path(run_dir)
    out = run_dir / CURVES if out is None else Path(out)
    rows = read_metrics(run_dir / "metrics.jsonl")
    fig = draw_curves(rows, _read_config(run_dir), run_dir.name, status)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return out
