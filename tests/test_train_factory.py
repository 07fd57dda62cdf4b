"""A model from a user's factory (``--model PACKAGE.MODULE:FACTORY``) trains, resumes (only when
named again), repeats from its config.json, evaluates and scores; every way a factory can be
wrong is one line and exit 2 before anything is written."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factory_models import MODULE, PACKAGE, forget_factories, write_factories
from PIL import Image

import jem_ext
from jem_ext import score
from jem_ext import train as jtrain
from jem_ext.checkpoint import load_checkpoint
from jem_ext.data import load_dataset
from jem_ext.eval import cli as eval_cli
from jem_ext.eval.inputs import load_model
from jem_ext.eval.tasks import ood_scores

ROOT = Path(__file__).resolve().parent.parent

# digits (8x8, 10 classes): 6 iterations of batches of 32, a fraction of a second each
FAST = [
    "--max-iters", "6", "--batch-size", "32", "--sgld-steps", "2", "--buffer-size", "100",
    "--warmup-iters", "2", "--no-progress", "--log-every", "2", "--sample-every", "0",
    "--threads", "1", "--seed", "2",
]  # fmt: skip


@pytest.fixture
def mod(tmp_path, monkeypatch) -> str:
    return write_factories(tmp_path, monkeypatch)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_factory_model_trains_resumes_evaluates_and_scores(mod, tmp_path, capsys):
    name = f"{mod}:conv"
    run = tmp_path / "run"
    assert jtrain.main([*FAST, "--model", name, "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["model"] == name
    last = run / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["model_spec"]["name"] == name
    capsys.readouterr()

    # a checkpoint never imports code by itself: --resume must name the factory again
    forget_factories()
    before = _files(run)
    assert jtrain.main(["--resume", str(run), "--max-iters", "10"]) == 2
    err = _one_line(capsys)
    assert "never imports code" in err and f"name it again with --model {name}" in err
    assert PACKAGE not in sys.modules and _files(run) == before
    assert jtrain.main(["--resume", str(run), "--max-iters", "10", "--model", f"{mod}:tiny"]) == 2
    assert f"trained the factory {name}" in _one_line(capsys)
    assert jtrain.main(["--resume", str(run), "--max-iters", "10", "--model", "small_cnn"]) == 2
    assert _files(run) == before
    assert jtrain.main(["--resume", str(run), "--max-iters", "10", "--model", name]) == 0
    assert load_checkpoint(last)["iteration"] == 10
    resumes = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    resumes = [r for r in resumes if r.get("event") == "resume"]
    assert [r["overrides"] for r in resumes] == [{"max_iters": 10}]  # naming it is no change
    capsys.readouterr()

    # --config repeats the run: the config file names the factory, as the flag would
    again = tmp_path / "again"
    assert jtrain.main(["--config", str(run / "config.json"), "--out", str(again)]) == 0
    first = load_checkpoint(again / "checkpoints" / "last.pt")
    assert first["model_spec"]["name"] == name and first["iteration"] == 10

    # evaluation: refused without the factory (nothing written), then with it
    report = tmp_path / "eval"
    args = ["--checkpoint", str(run), "--out", str(report), "--tasks", "accuracy,ood"]
    assert eval_cli.main([*args, "--no-progress"]) == 2
    assert "--model " + name in _one_line(capsys) and not report.exists()
    assert eval_cli.main([*args, "--no-progress", "--model", name]) == 0
    assert (report / "report.json").is_file()

    # jem_ext.load and jem_ext.score give the evaluation's log p(x) and max p(y|x)
    x = load_dataset("digits", split="test").x[:40]
    evaluated = ood_scores(load_model(str(run), "cpu", "--checkpoint", factory=name).model, x, 16)
    jem = jem_ext.load(run, model=name)
    s = jem.scores(x)
    np.testing.assert_allclose(s.log_px.double(), evaluated["logpx"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.max_prob.double(), evaluated["maxprob"], rtol=1e-5, atol=1e-6)
    np.save(tmp_path / "x.npy", x.numpy())
    out = tmp_path / "scores.csv"
    argv = ["--checkpoint", str(run), "--inputs", str(tmp_path / "x.npy"), "--out", str(out)]
    assert score.main([*argv, "--model", name]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose([float(r["log_px"]) for r in rows], evaluated["logpx"], rtol=1e-5)


@pytest.mark.parametrize(
    "factory, message",
    [
        ("nowhere.models:net", "--model nowhere.models:net: no module named 'nowhere'"),
        (f"{MODULE}:missing", f"{MODULE} has no attribute 'missing'"),
        (f"{MODULE}:NOT_CALLABLE", "is a int, not a callable"),
        (f"{MODULE}:raises", "the factory raised RuntimeError: this factory needs a GPU"),
        (f"{MODULE}:not_a_module", "returned a int; expected a torch.nn.Module"),
        (f"{MODULE}:wrong_classes", "gives a float32 tensor [2, 11] for a batch [2, 1, 8, 8]"),
        (f"{MODULE}:no_flatten", "the model fails on a batch [2, 1, 8, 8]"),
        ("not a factory", "expected one of wrn, small_cnn, mlp or PACKAGE.MODULE:FACTORY"),
    ],
)
def test_a_bad_factory_is_one_line_before_anything_is_written(
    mod, tmp_path, capsys, factory, message
):
    out = tmp_path / "run"
    assert jtrain.main([*FAST, "--model", factory, "--out", str(out)]) == 2
    assert message in _one_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("flag", [["--width", "8"], ["--depth", "2"], ["--norm", "batch"]])
def test_builtin_model_flags_are_refused_with_a_factory(mod, tmp_path, capsys, flag):
    out = tmp_path / "run"
    assert jtrain.main([*FAST, "--model", f"{mod}:conv", *flag, "--out", str(out)]) == 2
    assert f"{flag[0]}: shapes the built-in models" in _one_line(capsys)
    assert not out.exists()


def test_channels_last_needs_a_convolution(mod, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*FAST, "--model", f"{mod}:tiny", "--channels-last", "--out", str(out)]
    assert jtrain.main(argv) == 2
    assert "--channels-last: expected a convolutional model" in _one_line(capsys)
    assert not out.exists()


def test_batch_norm_gets_a_note_at_start(mod, tmp_path, capsys):
    argv = [*FAST, "--model", f"{mod}:with_batchnorm", "--out", str(tmp_path / "a")]
    assert jtrain.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("note: the model of") == 1 and "mix data and chain samples" in err
    assert jtrain.main([*FAST, "--model", f"{mod}:conv", "--out", str(tmp_path / "b")]) == 0
    assert "BatchNorm" not in capsys.readouterr().err


def _import_torchvision(monkeypatch) -> None:
    from test_factory import import_torchvision

    import_torchvision(monkeypatch)


def test_resnet18_example_trains(tmp_path, monkeypatch):
    """examples/resnet18_cifar.py trains a few iterations on 32x32 RGB images (where
    torchvision is installed)."""
    _import_torchvision(monkeypatch)
    monkeypatch.syspath_prepend(str(ROOT))
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k in ("a", "b"):
            (tmp_path / "img" / split / k).mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "img" / split / k / f"{i}.png")
    run = tmp_path / "run"
    argv = [
        "--dataset", "folder", "--data-root", str(tmp_path / "img"), "--no-augment",
        "--model", "examples.resnet18_cifar:resnet18_groupnorm", "--max-iters", "2",
        "--batch-size", "4", "--sgld-steps", "1", "--buffer-size", "8", "--no-progress",
        "--sample-every", "0", "--threads", "1", "--out", str(run),
    ]  # fmt: skip
    assert jtrain.main(argv) == 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["iteration"] == 2
    assert state["model_spec"]["name"] == "examples.resnet18_cifar:resnet18_groupnorm"
    jem = jem_ext.load(run, model="examples.resnet18_cifar:resnet18_groupnorm")
    assert jem.scores(torch.zeros(3, 3, 32, 32)).probs.shape == (3, 2)


def test_readme_snippets_run(tmp_path, monkeypatch, capsys):
    """The README's "Bring your own model": its factory file, a run trained with it (the
    section's first command, shortened) and its Python snippet, as written."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("### Bring your own model")
    section = text[start : text.index("\n### ", start + 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    module, rest = blocks[0], blocks[1:]
    file_name = re.match(r"# (\w+\.py)", module).group(1)
    assert rest, "the section shows how to load the run in Python"
    (tmp_path / file_name).write_text(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    train = re.search(r"python -m jem_ext\.train (--model \S+ --out \S+)", section).group(1)
    assert jtrain.main([*FAST, *train.split()]) == 0
    capsys.readouterr()
    for code in rest:
        exec(compile(code, "README.md", "exec"), {})
    assert "tensor(" in capsys.readouterr().out
