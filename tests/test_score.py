"""End-to-end tests of ``python -m jem_ext.score`` on tiny runs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trained_runs import save_run, write_image_folder

import jem_ext
from jem_ext import score
from jem_ext.data import load_dataset
from jem_ext.eval import cli as eval_cli
from jem_ext.eval.tasks import ood_scores


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return save_run(tmp_path_factory.mktemp("score") / "run")


@pytest.fixture(scope="module")
def test_npy(run) -> Path:
    path = run.parent / "digits_test.npy"
    np.save(path, load_dataset("digits", split="test").x.numpy())
    return path


def _score(capsys, *argv) -> tuple[int, str, str]:
    status = score.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_scores_equal_the_evaluation(run, test_npy, tmp_path, capsys):
    """Same checkpoint, same test split: log p(x) and max p(y|x) as python -m jem_ext.eval."""
    out = tmp_path / "scores.csv"
    status, stdout, err = _score(
        capsys, "--checkpoint", run, "--inputs", test_npy, "--out", out, "--no-progress"
    )
    assert status == 0, err
    rows = _rows(out)
    x = load_dataset("digits", split="test").x
    assert len(rows) == len(x) and rows[5]["path"] == f"{test_npy}[5]"
    log_px = np.array([float(r["log_px"]) for r in rows])
    max_prob = np.array([float(r["max_prob"]) for r in rows])

    model = jem_ext.load(run).model
    ev = ood_scores(model, x, batch_size=100)
    np.testing.assert_allclose(log_px, ev["logpx"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(max_prob, ev["maxprob"], rtol=1e-5, atol=1e-6)
    assert [int(r["class"]) for r in rows] == model(x).argmax(1).tolist()
    assert {r["class_name"] for r in rows} <= {str(k) for k in range(10)}

    # the evaluation's own report: the mean log p(x) of the same test split
    report = tmp_path / "eval"
    eval_args = ["--checkpoint", str(run), "--out", str(report), "--tasks", "ood"]
    assert eval_cli.main([*eval_args, "--no-progress", "--max-samples", "1000"]) == 0
    capsys.readouterr()
    recorded = json.loads((report / "report.json").read_text())
    means = [v for k, v in _find(recorded, "logpx_mean").items() if k.startswith("digits")]
    assert means and abs(means[0] - log_px.mean()) < 1e-5


def _find(obj, key):
    """The first value of ``key`` anywhere in a nested JSON object."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def test_threshold_from_the_validation_split(run, test_npy, tmp_path, capsys):
    val = load_dataset("digits", split="val").x
    val_log_px = jem_ext.load(run).log_px(val).double().numpy()
    for q in (0.05, 0.2):
        out = tmp_path / f"s{q}.jsonl"
        status, stdout, _ = _score(
            capsys,
            *("--checkpoint", run, "--inputs", test_npy, "--out", out),
            *("--ood-quantile", q, "--no-progress"),
        )
        assert status == 0
        side = json.loads(Path(f"{out}.threshold.json").read_text())
        assert side["threshold"] == pytest.approx(np.quantile(val_log_px, q), rel=1e-9)
        assert side["quantile"] == q and side["n_validation"] == len(val)
        assert side["dataset"] == "digits" and side["checkpoint"].endswith("best.pt")
        assert side["validation_pass_rate"] == pytest.approx(1 - q, abs=0.01)
        rows = _rows(out)
        assert all(r["ood"] == (r["log_px"] < side["threshold"]) for r in rows)
        assert side["n_flagged"] == sum(r["ood"] for r in rows)
        assert f"{side['n_flagged']} flagged" in stdout


def test_folder_recursive_with_skips(tmp_path, capsys):
    """An image folder (recursive) is read as training reads it; what does not fit is one
    line naming it and the rest is scored; class names come from the data set."""
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    run = save_run(
        tmp_path / "run",
        num_classes=3,
        train_steps=0,
        config={"dataset": "folder", "data_root": str(root), "objective": "jem", "seed": 0},
    )
    inputs = tmp_path / "inputs"
    shutil.copytree(root / "test", inputs / "nested")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(inputs / "wrong_size.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / "colour.png")
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    np.save(inputs / "flat.npy", np.zeros((2, 64), np.float32))
    (inputs / ".hidden.png").write_bytes(b"junk")
    (inputs / "notes.txt").write_text("ignored")
    out = tmp_path / "out.csv"
    status, _, err = _score(
        capsys,
        *("--checkpoint", run, "--inputs", inputs, "--out", out, "--no-progress"),
        *("--batch-size", "7"),
    )
    assert status == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("jem_ext.score: skipped ")]
    assert len(skipped) == 4, err
    for name in ("wrong_size.png: a 9x9", "colour.png: a colour image", "broken.jpg:", "flat.npy:"):
        assert any(f"{inputs}/{name}" in line for line in skipped), (name, err)
    rows = _rows(out)
    expected = load_dataset("folder", root, "test")
    assert len(rows) == len(expected)
    assert [Path(r["path"]).relative_to(inputs / "nested") for r in rows] == sorted(
        p.relative_to(root / "test") for p in (root / "test").rglob("*.png")
    )
    s = jem_ext.load(run).scores(expected.x)
    np.testing.assert_allclose([float(r["log_px"]) for r in rows], s.log_px.numpy(), rtol=1e-6)
    assert [r["class_name"] for r in rows] == [expected.classes[k] for k in s.pred.tolist()]


def test_moved_data_needs_threshold(tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    run = save_run(
        tmp_path / "run",
        num_classes=3,
        train_steps=0,
        config={"dataset": "folder", "data_root": str(root), "objective": "jem", "seed": 0},
    )
    inputs = tmp_path / "one.png"
    shutil.copy(next((root / "test" / "one").iterdir()), inputs)
    shutil.move(root, tmp_path / "moved")
    out = tmp_path / "out.csv"
    status, _, err = _score(capsys, "--checkpoint", run, "--inputs", inputs, "--out", out)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "cannot load the validation split of data set 'folder'" in err
    assert "--threshold" in err and not out.exists()
    status, _, err = _score(
        capsys, "--checkpoint", run, "--inputs", inputs, "--out", out, "--threshold=-1e9"
    )
    assert status == 0, err
    side = json.loads(Path(f"{out}.threshold.json").read_text())
    assert side["threshold"] == -1e9 and side["chosen"] == "given with --threshold"
    (row,) = _rows(out)
    assert row["ood"] == "0" and row["class_name"] == ""


def test_uint8_npy_equals_float(run, tmp_path, capsys):
    u8 = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", u8)
    np.save(tmp_path / "f.npy", u8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    for name in ("u8", "f"):
        args = ("--inputs", tmp_path / f"{name}.npy", "--out", tmp_path / f"{name}.csv")
        assert _score(capsys, "--checkpoint", run, *args, "--threshold", "0")[0] == 0
    a, b = _rows(tmp_path / "u8.csv"), _rows(tmp_path / "f.csv")
    assert [r["log_px"] for r in a] == [r["log_px"] for r in b]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "x.txt"], "--out x.txt: expected a file name ending in .csv or .jsonl"),
        (["--ood-quantile", "nan"], "argument --ood-quantile: expected a finite number"),
        (["--ood-quantile", "1.5"], "--ood-quantile: expected a number in [0, 1]"),
        (["--threshold", "inf"], "expected a finite number"),
        (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
        (["--threads", "999"], "--threads 999: this machine has"),
        (["--device", "tpu9"], "--device: unknown device"),
        (["--inputs", "missing.png"], "--inputs missing.png: no such file or folder"),
        (["--checkpoint", "nowhere"], "--checkpoint: nowhere: no such checkpoint"),
    ],
)
def test_bad_flags_are_one_line(run, test_npy, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    base = {"--checkpoint": run, "--inputs": test_npy, "--out": "o.csv"}
    args = dict(base)
    flags = dict(zip(extra[::2], extra[1::2]))
    args.update(flags)
    status, _, err = _score(capsys, *[v for kv in args.items() for v in kv])
    assert status == 2
    assert err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "o.csv").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_nothing_scorable_writes_nothing(run, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((3, 2), np.float32))
    out = tmp_path / "o.jsonl"
    status, _, err = _score(
        capsys, "--checkpoint", run, "--inputs", tmp_path / "bad.npy", "--out", out
    )
    assert status == 2
    assert "skipped" in err and "none of the 1 input file(s) could be scored" in err
    assert not out.exists() and not Path(f"{out}.threshold.json").exists()


def test_interrupt_writes_nothing(run, test_npy, tmp_path, capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jem_ext.trained.Trained, "scores", stop)
    out = tmp_path / "o.csv"
    status, _, err = _score(capsys, "--checkpoint", run, "--inputs", test_npy, "--out", out)
    assert status == 130 and "interrupted; nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_help_explains_every_flag():
    proc = subprocess.run(
        [sys.executable, "-m", "jem_ext.score", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for flag in score.build_parser()._option_string_actions:
        assert flag in proc.stdout
    for action in score.build_parser()._actions:
        assert action.help, action.dest
    assert "[N, H, W, C]" in proc.stdout and "OUT.threshold.json" in proc.stdout


def test_device_flag(run, test_npy, tmp_path, capsys):
    out = tmp_path / "o.csv"
    status, _, err = _score(
        capsys, "--checkpoint", run, "--inputs", test_npy, "--out", out, "--device", "cpu"
    )
    assert status == 0, err
    assert torch.device(jem_ext.load(run, device="cpu").device).type == "cpu"


def test_warns_when_the_validation_data_changed(tmp_path, capsys):
    from jem_ext.data import data_fingerprint

    val = load_dataset("digits", split="val")
    recorded = data_fingerprint({"val": val})
    cfg = {"dataset": "digits", "data_root": None, "seed": 0, "data_fingerprint": recorded}
    x = tmp_path / "x.npy"
    np.save(x, val.x[:3].numpy())
    for changed in (False, True):
        if changed:
            recorded["splits"]["val"]["digest"] = "sha256:" + "0" * 64
        run = save_run(tmp_path / f"run{changed}", config=cfg, train_steps=0)
        out = tmp_path / f"o{changed}.csv"
        status, _, err = _score(capsys, "--checkpoint", run, "--inputs", x, "--out", out)
        assert status == 0
        side = json.loads(Path(f"{out}.threshold.json").read_text())
        if changed:
            assert "jem_ext.score: warning: the validation data differ from the run's" in err
            assert "holds other samples" in side["data_warnings"][0]
        else:
            assert "warning" not in err and side["data_warnings"] == []


def test_jsonl_is_standard_json_when_a_score_is_not_finite(run, tmp_path, capsys, monkeypatch):
    real = jem_ext.trained.Trained.logits

    def logits(self, x, batch_size=500):
        out = real(self, x, batch_size)
        out[0] = float("inf")
        return out

    monkeypatch.setattr(jem_ext.trained.Trained, "logits", logits)
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 1, 8, 8), np.float32))
    out = tmp_path / "o.jsonl"
    status, _, err = _score(
        capsys, "--checkpoint", run, "--inputs", x, "--out", out, "--threshold", "0"
    )
    assert status == 0, err
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    first = json.loads(text.splitlines()[0])
    assert first["log_px"] is None and first["ood"] is True


def test_the_command_s_names_stay_importable_from_jem_ext_score():
    """jem_ext.score is a package of parts (cli, inputs, threshold, scoring); what callers
    import from it stays where it was."""
    for name in ("ScoreError", "build_parser", "main", "ood_threshold", "list_inputs"):
        assert callable(getattr(score, name)), name
    assert score.side_file("a/b.csv") == Path("a/b.csv.threshold.json")
    assert score.ood_threshold(np.arange(101.0), 0.05) == 5.0
