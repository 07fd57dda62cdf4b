"""The trainer's inputs and run folder: checked up front, claimed once, resumed faithfully."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from toy_runs import TOY

from jem_ext import data as jdata
from jem_ext import train as jtrain
from jem_ext.checkpoint import load_checkpoint, save_checkpoint
from jem_ext.training import cli, loop, runlog, trainer
from jem_ext.training.folder import RunFolder


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _refused(capsys, argv: list[str], out: Path | None = None) -> str:
    """Run the trainer on bad input: exit 2, one line on stderr, no run folder. Returns it."""
    assert jtrain.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    if out is not None:
        assert not out.exists()
    return err


class _Killed(BaseException):
    """Stands in for the process being killed."""


def _die_at(monkeypatch, iteration: int) -> None:
    real = loop.learning_rate

    def dying(cfg, it, epoch, scale=1.0):
        if it == iteration:
            raise _Killed()
        return real(cfg, it, epoch, scale)

    monkeypatch.setattr(loop, "learning_rate", dying)


def test_resume_keeps_the_overrides_of_earlier_resumes(tmp_path, monkeypatch):
    run = tmp_path / "r"
    assert jtrain.main(TOY + ["--epochs", "1", "--ckpt-every", "7", "--out", str(run)]) == 0
    _die_at(monkeypatch, 45)  # in the 2nd epoch; last.pt is at iteration 42
    with pytest.raises(_Killed):
        jtrain.main(["--resume", str(run), "--epochs", "2"])
    monkeypatch.undo()
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert jtrain.main(["--resume", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["iterations"] == 64
    resumes = [r for r in _rows(run) if r.get("event") == "resume"]
    assert [(r["iteration"], r["overrides"]) for r in resumes] == [(32, {"epochs": 2}), (42, {})]
    # --config repeats what the run did: two epochs, the same weights
    again = tmp_path / "again"
    assert jtrain.main(["--config", str(run / "config.json"), "--out", str(again)]) == 0
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(again / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_and_config_keep_the_thread_count(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    run = tmp_path / "r"
    _die_at(monkeypatch, 20)
    with pytest.raises(_Killed):
        jtrain.main(
            TOY + ["--epochs", "1", "--ckpt-every", "7", "--threads", "2", "--out", str(run)]
        )
    monkeypatch.setattr(loop, "learning_rate", jtrain.learning_rate)
    calls.clear()
    assert jtrain.main(["--resume", str(run)]) == 0
    assert calls == [2]
    calls.clear()
    assert jtrain.main(["--config", str(run / "config.json"), "--out", str(tmp_path / "c")]) == 0
    assert calls == [2]


def test_help_says_results_depend_on_threads(capsys):
    with pytest.raises(SystemExit):
        jtrain.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "results can differ with the thread count" in text


def test_second_run_with_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    first = cli.prepare(TOY + ["--epochs", "1", "--out", str(out)])  # checked, not yet training
    try:
        assert out.is_dir()
        err = _refused(capsys, TOY + ["--epochs", "1", "--out", str(out)])
        assert "in use by another training process" in err or "not empty" in err
        err = _refused(capsys, ["--resume", str(out)])
    finally:
        first.folder.release(remove=True)
    assert not out.exists()


def test_an_empty_folder_held_by_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    held = RunFolder.claim_new(out)
    try:
        assert "in use by another training process" in _refused(capsys, TOY + ["--out", str(out)])
    finally:
        held.release()
    assert out.is_dir() and not any(out.iterdir())


def test_failed_check_after_the_claim_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "r"
    err = _refused(
        capsys,
        ["--dataset", "folder", "--data-root", str(tmp_path / "none"), "--out", str(out)],
        out,
    )
    assert "folder" in err


def test_unwritable_out_is_one_line(tmp_path, capsys):
    err = _refused(capsys, TOY + ["--out", "/proc/jem-ext-run/r"])
    assert "--out /proc/jem-ext-run/r: cannot create the run folder" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot create" in _refused(capsys, TOY + ["--out", str(blocker / "r")])


@pytest.mark.parametrize("where", ["prepare", "train"])
def test_ctrl_c_before_the_first_checkpoint_does_not_advise_resume(
    tmp_path, capsys, monkeypatch, where
):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        cli if where == "prepare" else trainer,
        "load_data" if where == "prepare" else "build_run",
        interrupt,
    )
    out = tmp_path / "r"
    assert jtrain.main(TOY + ["--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "nothing" in err
    assert not out.exists()


def test_resume_refuses_flags_it_would_ignore(tmp_path, capsys):
    run = tmp_path / "r"
    assert jtrain.main(TOY + ["--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    other = tmp_path / "s"
    assert "cannot be combined with --resume" in _refused(
        capsys, ["--resume", str(run), "--out", str(other)], other
    )
    assert "cannot be combined with --resume" in _refused(
        capsys, ["--resume", str(run), "--config", str(run / "config.json")]
    )


def test_config_that_is_a_directory(tmp_path, capsys):
    assert "is a directory" in _refused(capsys, ["--config", str(tmp_path)])


@pytest.mark.parametrize("dataset", ["digits", "moons", "rings", "gmm"])
def test_data_root_for_a_built_in_dataset_is_refused(tmp_path, capsys, dataset):
    argv = ["--dataset", dataset, "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]
    if dataset != "digits":
        argv += ["--model", "mlp"]
    assert "--data-root: the" in _refused(capsys, argv, tmp_path / "r")


def test_toy_set_with_an_image_model_suggests_mlp(tmp_path, capsys):
    err = _refused(capsys, ["--dataset", "gmm", "--out", str(tmp_path / "r")], tmp_path / "r")
    assert "--model mlp" in err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--width", "0", ">= 1"),
        ("--width", "-4", ">= 1"),
        ("--depth", "0", ">= 1"),
        ("--batch-size", "0", ">= 1"),
        ("--epochs", "-1", ">= 1"),
        ("--labels-per-class", "0", ">= 1"),
        ("--buffer-size", "-1", ">= 0"),
        ("--lr", "inf", "finite"),
        ("--lr", "0", "> 0"),
        ("--sgld-step-size", "nan", "finite"),
        ("--w-px", "nan", "finite"),
        ("--decay-rate", "nan", "finite"),
        ("--sgld-noise", "-inf", "finite"),
        ("--dropout", "1", "< 1"),
        ("--grad-clip", "0", "> 0"),
        ("--seed", "-1", ">= 0"),
        ("--reinit-prob", "1.5", "<= 1"),
        ("--divergence-threshold", "1e400", "finite"),
        ("--decay-epochs", "a,b", "integers"),
    ],
)
def test_bad_flag_values_are_refused_naming_the_flag(tmp_path, capsys, flag, value, message):
    out = tmp_path / "r"
    err = _refused(capsys, TOY + [f"{flag}={value}", "--out", str(out)], out)
    assert flag in err and message in err


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("labels_per_class", "5", "expected an integer"),
        ("width", "abc", "expected an integer"),
        ("grad_clip", "x", "expected a number"),
        ("data_root", 5, "expected a string"),
        ("decay_epochs", ["a", "b"], "list of integers"),
        ("depth", 2.5, "expected an integer"),
        ("no_augment", "yes", "true or false"),
        ("lr", 1e999, "finite"),
        ("width", 0, ">= 1"),
        ("epochs", True, "expected an integer"),
        ("norm", "group", "expected one of"),
        ("seed", None, "expected a value"),
    ],
)
def test_bad_config_values_are_refused_naming_the_key(tmp_path, capsys, key, value, message):
    cfg = tmp_path / "c.json"
    text = json.dumps({"dataset": "moons", "model": "mlp", key: value})
    cfg.write_text(text.replace("Infinity", "1e999"))  # a standard JSON number, read as inf
    out = tmp_path / "r"
    err = _refused(capsys, ["--config", str(cfg), "--out", str(out)], out)
    assert f"key {key!r}" in err and message in err and f"--{key}" not in err


def test_non_standard_json_constants_are_refused(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"lr": NaN}')
    assert "not valid JSON" in _refused(capsys, ["--config", str(cfg)])


def test_old_config_files_still_load(tmp_path):
    run = tmp_path / "r"
    assert jtrain.main(TOY + ["--epochs", "1", "--out", str(run)]) == 0
    old = json.loads((run / "config.json").read_text())
    old["debug_inject_nan_at"] = []  # a key older versions wrote
    (tmp_path / "old.json").write_text(json.dumps(old))
    cfg = jtrain.config_from_args(["--config", str(tmp_path / "old.json")])
    assert cfg.optim.epochs == 1 and "debug_inject_nan_at" not in cfg.flat()


def test_summary_names_the_test_accuracy_of_the_best_checkpoint(tmp_path):
    run = tmp_path / "r"
    assert jtrain.main(TOY + ["--epochs", "1", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert "best_test_accuracy" not in summary
    assert 0 <= summary["test_accuracy_at_best_val"] <= 1


def test_sample_grids_show_full_rows_only(tmp_path):
    data = jdata.load_dataset("digits", split="val")
    path = tmp_path / "g.png"
    runlog.save_samples(torch.zeros(42, 1, 8, 8), path, data)
    with Image.open(path) as im:
        full = im.size
    runlog.save_samples(torch.zeros(40, 1, 8, 8), path, data)
    with Image.open(path) as im:
        assert im.size == full  # 42 samples: 5 full rows of 8, the 2 extra left out
    runlog.save_samples(torch.zeros(3, 1, 8, 8), path, data)  # fewer than a row: one row
    with Image.open(path) as im:
        assert im.size[1] < full[1]


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_off_a_terminal_prints_plain_lines():
    stream = _Log()
    with runlog.Progress(200, 0, "moons/jem", stream=stream) as progress:
        for _ in range(200):
            progress.step({"loss": 1.0, "accuracy": 0.5})
        progress.note("recovery 1/5")
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 100 // runlog.PLAIN_STEP + 1
    assert lines[0] == "moons/jem: 10/200 it (5%) loss=1, acc=0.50"
    assert lines[-2].startswith("moons/jem: 200/200 it (100%)") and lines[-1] == "recovery 1/5"


def test_two_processes_with_the_same_out_one_runs(tmp_path):
    out = tmp_path / "r"
    argv = [sys.executable, "-m", "jem_ext.train", *TOY, "--epochs", "1", "--out", str(out)]
    procs = [
        subprocess.Popen(
            argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [code for code, _ in results] == [0, 2]
    refusal = results[1][1]
    assert "in use by another training process" in refusal or "not empty" in refusal
    assert refusal.count("\n") == 1
    rows = _rows(out)
    assert [r["iteration"] for r in rows if "loss" in r] == list(range(1, 33))  # one writer


# ---------------------------------------------------------------------------------------------
# Identity: the data a run trains on, the run a checkpoint belongs to, paths from anywhere
# ---------------------------------------------------------------------------------------------

FOLDER = [
    "--dataset", "folder", "--model", "mlp", "--width", "16", "--depth", "2",
    "--sgld-steps", "2", "--buffer-size", "60", "--warmup-iters", "2", "--batch-size", "16",
    "--no-progress", "--log-every", "1", "--sample-every", "0", "--epochs", "1",
]  # fmt: skip


def _image_folder(root: Path, classes: str = "abc", n: int = 20, size: int = 8) -> Path:
    rng = np.random.default_rng(len(classes) * 100 + n)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:03d}.png")
    return root


def _snapshot(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _strip_identity(run: Path) -> None:
    """Make a run look as if written before runs recorded their identity."""
    cfg = json.loads((run / "config.json").read_text())
    for key in ("run_id", "data_fingerprint"):
        cfg.pop(key)
    (run / "config.json").write_text(json.dumps(cfg))
    for ckpt in (run / "checkpoints").glob("*.pt"):
        state = load_checkpoint(ckpt)
        for key in ("run_id", "data_fingerprint"):
            state["config"].pop(key)
        state.pop("checksum")
        save_checkpoint(ckpt, state)


def test_run_records_its_identity_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path / "img")
    assert jtrain.main(FOLDER + ["--data-root", "img", "--out", "r"]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["data_root"] == str(tmp_path / "img") and cfg["out"] == str(tmp_path / "r")
    assert len(cfg["run_id"]) == 32
    fp = cfg["data_fingerprint"]
    assert fp["dataset"] == "folder" and fp["num_classes"] == 3 and fp["shape"] == [1, 8, 8]
    assert {s: v["n"] for s, v in fp["splits"].items()} == {"train": 48, "val": 6, "test": 6}
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert state["config"]["run_id"] == cfg["run_id"]
    assert state["config"]["data_fingerprint"] == fp
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["run_dir"] == str(tmp_path / "r")
    assert Path(summary["last_checkpoint"]).is_absolute()
    # --config repeats the experiment as a new run: its own id
    assert jtrain.main(["--config", "r/config.json", "--out", "again"]) == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["run_id"] != cfg["run_id"] and again["data_fingerprint"] == fp
    # a run folder from another directory: evaluation finds the data
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from jem_ext.eval import cli as eval_cli

    assert eval_cli.main(["--checkpoint", "../r", "--out", "ev", "--tasks", "accuracy"]) == 0
    report = json.loads((elsewhere / "ev" / "report.json").read_text())
    assert report["checkpoint"] == str(tmp_path / "r" / "checkpoints" / "best.pt")
    assert report["settings"]["out"] == str(elsewhere / "ev")
    assert report["warnings"] == [] and report["training_data"]["matches"] is True


@pytest.mark.parametrize("change", ["added", "removed", "renamed", "class_removed"])
def test_resume_refuses_data_that_changed(tmp_path, capsys, change):
    img = _image_folder(tmp_path / "img")
    run = tmp_path / "r"
    assert jtrain.main(FOLDER + ["--data-root", str(img), "--out", str(run)]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    if change == "added":
        (img / "a" / "000.png").rename(img / "a" / "new.png")
        _image_folder(img, "a", 1)
    elif change == "removed":
        (img / "b" / "003.png").unlink()
    elif change == "renamed":
        (img / "c" / "003.png").rename(img / "c" / "zzz.png")
    else:
        for f in (img / "c").iterdir():
            f.unlink()
        (img / "c").rmdir()
    err = _refused(capsys, ["--resume", str(run), "--epochs", "2"])
    assert "the data differ from those the run was trained on" in err
    if change == "class_removed":
        assert "the data now has 2 classes, trained on 3" in err
    assert _snapshot(run) == before  # nothing written, nothing lost


def test_resume_of_an_old_run_with_a_removed_class_names_the_classes(tmp_path, capsys):
    img = _image_folder(tmp_path / "img")
    run = tmp_path / "r"
    assert jtrain.main(FOLDER + ["--data-root", str(img), "--out", str(run)]) == 0
    _strip_identity(run)
    for f in (img / "c").iterdir():
        f.unlink()
    (img / "c").rmdir()
    err = _refused(capsys, ["--resume", str(run), "--epochs", "2"])
    assert "the data now has 2 classes, the checkpoint's model 3" in err


def test_old_runs_without_identity_keep_resuming(tmp_path, capsys):
    run = tmp_path / "r"
    assert jtrain.main(TOY + ["--epochs", "1", "--out", str(run)]) == 0
    _strip_identity(run)
    assert jtrain.main(["--resume", str(run), "--epochs", "2"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data_fingerprint"]["dataset"] == "moons"  # recorded from now on
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def test_resume_refuses_another_runs_checkpoint(tmp_path, capsys):
    jem, ce = tmp_path / "jem", tmp_path / "ce"
    assert jtrain.main(TOY + ["--epochs", "1", "--out", str(jem)]) == 0
    assert jtrain.main(TOY + ["--epochs", "1", "--objective", "ce", "--out", str(ce)]) == 0
    capsys.readouterr()
    shutil.copy(ce / "checkpoints" / "last.pt", jem / "checkpoints" / "last.pt")
    before = _snapshot(jem)
    err = _refused(capsys, ["--resume", str(jem), "--epochs", "2"])
    assert "checkpoints/last.pt belongs to another run" in err and "objective 'ce'" in err
    assert _snapshot(jem) == before
    # the run's own best.pt is its checkpoint: accepted
    shutil.copy(jem / "checkpoints" / "best.pt", jem / "checkpoints" / "last.pt")
    assert jtrain.main(["--resume", str(jem), "--epochs", "2"]) == 0


def test_identity_keys_in_a_config_file_are_checked(tmp_path, capsys):
    for key, value in (("run_id", 5), ("data_fingerprint", [1])):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({"dataset": "moons", "model": "mlp", key: value}))
        err = _refused(capsys, ["--config", str(path)], tmp_path / "runs")
        assert f"key '{key}'" in err


@pytest.mark.parametrize("size", [1, 4])
def test_images_too_small_for_augmentation_are_refused_up_front(tmp_path, capsys, size):
    img = _image_folder(tmp_path / "img", "ab", 10, size)
    out = tmp_path / "r"
    err = _refused(capsys, FOLDER + ["--data-root", str(img), "--out", str(out)], out)
    assert f"images are {size}x{size} pixels" in err and "--no-augment" in err
    assert jtrain.main(FOLDER + ["--data-root", str(img), "--out", str(out), "--no-augment"]) == 0


def test_hidden_files_are_skipped_and_one_class_is_refused(tmp_path, capsys):
    img = _image_folder(tmp_path / "img", "ab", 10)
    (img / "a" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert jtrain.main(FOLDER + ["--data-root", str(img), "--out", str(tmp_path / "r")]) == 0
    one = _image_folder(tmp_path / "one", "a", 20)
    out = tmp_path / "r1"
    err = _refused(capsys, FOLDER + ["--data-root", str(one), "--out", str(out)], out)
    assert "expected at least 2 sub-folders of classes" in err


def test_train_api_stores_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path / "img", "ab", 10)
    cfg = jtrain.config_from_args(FOLDER + ["--data-root", "img", "--out", "r"])
    cfg = cfg.replace(data_root="img", out="r")  # as a caller of the Python API may pass them
    summary = jtrain.train(cfg)
    assert summary["run_dir"] == str(tmp_path / "r")
    recorded = json.loads((tmp_path / "r" / "config.json").read_text())
    assert recorded["data_root"] == str(tmp_path / "img")
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert state["config"]["out"] == str(tmp_path / "r")
