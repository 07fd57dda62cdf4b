"""curves.png: the training curves drawn from a run folder's metrics.jsonl, events marked."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from jem_ext.training.curves import EVENT_STYLES, draw_curves, px_weights, write_curves

CONFIG = {
    "dataset": "digits",
    "objective": "jem",
    "model": "small_cnn",
    "w_px": 1.0,
    "w_px_decay_rate": 0.1,
    "w_px_decay_epochs": [2],
}


def _rows() -> list[dict]:
    rows = []
    for it in range(1, 41):
        epoch = (it - 1) // 10
        rows.append(
            {
                "iteration": it,
                "epoch": epoch,
                "loss": 2.0 / it,
                "ce": 1.5 / it,
                "px": 0.1,
                "energy_data": -1.0,
                "energy_sample": -0.5 if it < 30 else None,
                "accuracy": min(1.0, it / 40),
                "lr": 1e-3,
                "seconds": it * 0.1,
            }
        )
        if it % 10 == 0:
            rows.append({"iteration": it, "epoch": epoch + 1, "val_accuracy": it / 50})
    rows.insert(15, {"event": "recovery", "iteration": 14, "reason": "loss nan", "lr_scale": 0.5})
    rows.insert(25, {"event": "resume", "iteration": 22, "overrides": {"lr": 1e-3}})
    rows.append({"event": "energy_split", "iteration": 33, "energy_data": -9, "energy_sample": 9})
    return rows


def _event_lines(ax) -> dict[float, tuple]:
    """x -> (colour, style) of the vertical lines of an axis."""
    out = {}
    for line in ax.get_lines():
        xs = list(line.get_xdata())
        if len(xs) == 2 and xs[0] == xs[1] and line.get_transform() != ax.transData:
            out[float(xs[0])] = (line.get_color(), line.get_linestyle())
    return out


def test_every_panel_marks_resumes_recoveries_and_the_split():
    fig = draw_curves(_rows(), CONFIG, "run", "budget")
    try:
        panels = [ax for ax in fig.axes if ax.get_title() != "events"]
        titles = [ax.get_title() for ax in panels]
        assert titles == ["loss terms", "accuracy", "energies", "learning rate", "p(x) weight"]
        expected = {
            14.0: EVENT_STYLES["recovery"][1],
            22.0: EVENT_STYLES["resume"][1],
            33.0: EVENT_STYLES["energy_split"][1],
        }
        for ax in panels:
            marks = _event_lines(ax)
            assert {x: c for x, (c, _) in marks.items()} == expected, ax.get_title()
        labels = {ax.get_title(): ax.get_legend_handles_labels()[1] for ax in panels}
        assert labels["loss terms"] == ["loss", "cross-entropy", "p(x) term E(x) - E(x_q)"]
        assert labels["accuracy"] == ["train (batch)", "validation"]
        assert labels["energies"] == ["data E(x)", "samples E(x_q)"]
        events = next(ax for ax in fig.axes if ax.get_title() == "events")
        text = events.texts[0].get_text()
        assert "it 14: recovery, lr x0.5 (loss nan)" in text
        assert "it 22: resumed, changed lr" in text and "it 33: energies split" in text
        assert "budget at iteration 40" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_px_weight_from_rows_or_from_the_config_schedule():
    rows = [{"iteration": 1, "epoch": 0}, {"iteration": 2, "epoch": 2}, {"iteration": 3, "w_px": 7}]
    assert px_weights(rows, CONFIG) == pytest.approx([1.0, 0.1, 7.0])


def test_write_curves_skips_broken_lines_and_writes_a_png(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    lines = [json.dumps(r) for r in _rows()] + ['{"iteration": 41, "loss"']  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    path = write_curves(tmp_path, status="interrupted")
    assert path == tmp_path / "curves.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (880, 800)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_run_without_rows_or_config_still_gets_curves(tmp_path):
    write_curves(tmp_path, status="interrupted")
    assert (tmp_path / "curves.png").is_file()


def test_ce_runs_have_no_px_weight():
    rows = [{**r, "px": None, "energy_sample": None} for r in _rows() if "event" not in r]
    fig = draw_curves(rows, {**CONFIG, "objective": "ce"}, "ce")
    try:
        ax = next(ax for ax in fig.axes if ax.get_title() == "p(x) weight")
        assert "no p(x) term" in ax.texts[0].get_text()
        energies = next(ax for ax in fig.axes if ax.get_title() == "energies")
        assert energies.get_legend_handles_labels()[1] == ["data E(x)"]
    finally:
        plt.close(fig)
