"""Seeded fuzz of the trainer's flags and config files: every invalid input is refused cleanly.

Each case is a valid base command plus one invalid element (a flag value of the wrong type,
non-finite, out of range, not a choice, an unknown flag, a bad combination, or the same in a
config file). Every case must exit with status 2, print exactly one line on stderr, and leave
no run folder behind.

Image folders are fuzzed too (random pixel modes, sizes and defects: each folder either loads
with exactly the expected values or is refused that way), and so are data and checkpoints that
change under a run (a resume refuses each change and leaves the run folder as it was).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jem_ext import train as jtrain
from jem_ext._cli import finite_float
from jem_ext.data import DataError, load_dataset
from jem_ext.settings import int_list
from jem_ext.training.runconfig import all_specs, build_parser

BASE = ["--dataset", "moons", "--model", "mlp", "--width", "8", "--depth", "1", "--no-progress"]
VALID_EXTRAS = [
    ["--epochs", "1"],
    ["--seed", "3"],
    ["--lr", "0.01"],
    ["--sgld-steps", "2"],
    ["--no-augment"],
    ["--objective", "ce"],
    ["--batch-size", "16"],
    ["--decay-epochs", "1,2"],
    ["--threads", "1"],
]
# Invocation flags that take paths: fuzzed separately (their values are not typed).
PATH_FLAGS = {"out", "config", "resume", "data_root"}


def _actions() -> dict[str, argparse.Action]:
    return {
        a.dest: a for a in build_parser()._actions if a.dest != "help" and a.dest not in PATH_FLAGS
    }


def _out_of_range(key: str, rng: random.Random) -> list:
    r = all_specs()[key].range  # each setting owns its range
    if r is None:
        return []
    bad = []
    if r.lo is not None:
        bad.append(r.lo if r.lo_open else r.lo - rng.choice([1, 7, 10**6]))
    if r.hi is not None:
        bad.append(r.hi if r.hi_open else r.hi + rng.choice([1, 3, 10**9]))
    return bad


def _bad_flag_values(action: argparse.Action, rng: random.Random) -> list[str]:
    """Text values the flag must refuse."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return ["yes"]  # --flag=yes: a switch takes no value
    if action.choices is not None:
        return ["bogus", "", str(rng.randint(0, 9)), action.choices[0].upper() + "x"]
    bad = [str(v) for v in _out_of_range(action.dest, rng)]
    if action.type is int:
        return bad + ["abc", "1.5", "", "nan", "0x10", "1e3"]
    if action.type is finite_float:
        return bad + ["nan", "inf", "-inf", "NaN", "1e400", "x", ""]
    if action.type is int_list:
        return bad + ["a,b", "1.5", "1,,x"]
    if action.dest == "model":  # a built-in name or PACKAGE.MODULE:FACTORY
        return ["bogus", "", "MLP", "pkg.mod:", ":net", "1pkg:net", "no_such_pkg.models:net"]
    raise AssertionError(f"untyped flag {action.dest}")


def _bad_config_values(action: argparse.Action, rng: random.Random) -> list:
    """JSON values the config key must refuse (strings, numbers, lists, objects, null)."""
    wrong = ["5", "abc", True, [1], {"a": 1}, 1.5]
    if action.default is not None:
        wrong.append(None)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return ["yes", 1, 0, [True]] + ([None] if action.default is not None else [])
    if action.choices is not None:
        return ["bogus", 3, ["jem"], True]
    out = _out_of_range(action.dest, rng)
    if action.type is int:
        return out + [w for w in wrong if not isinstance(w, int) or isinstance(w, bool)]
    if action.type is finite_float:
        return out + ["1.0", True, [1.0], "INF_LITERAL"]
    if action.type is int_list:
        return [["a", "b"], "1,2", [1.5], [True], 3] + [[v] for v in out]
    if action.dest == "model":
        return wrong + ["pkg.mod:", "no_such_pkg.models:net"]
    return wrong


def _assert_refused(capsys, argv: list[str], out: Path, case: str) -> None:
    code = jtrain.main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"{case}: exit {code}, stderr {err!r}"
    assert err.startswith("error: ") and err.count("\n") == 1, f"{case}: {err!r}"
    assert "Traceback" not in err, case
    assert not out.exists() and not Path("runs").exists(), f"{case}: a run folder was left"


def test_fuzz_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(20261125)
    actions = _actions()
    out = tmp_path / "run"
    cases = 0
    for dest in sorted(actions):
        action = actions[dest]
        flag = action.option_strings[0]
        for value in _bad_flag_values(action, rng):
            extras = [x for extra in rng.sample(VALID_EXTRAS, rng.randint(0, 3)) for x in extra]
            argv = BASE + extras + [f"{flag}={value}", "--out", str(out)]
            _assert_refused(capsys, argv, out, f"{flag}={value!r}")
            cases += 1
    combinations = [
        ["--no-such-flag"],
        ["--resume", str(tmp_path / "none")],
        ["--data-root", str(tmp_path)],
        ["--dataset", "digits", "--model", "mlp", "--data-root", str(tmp_path)],
        ["--model", "small_cnn"],
        ["--model", "wrn"],
        ["--sgld-steps", "0"],
        ["--config", str(tmp_path)],
        ["--config", str(tmp_path / "none.json")],
        ["--out", "/proc/jem-ext/run"],
        ["--width", "100000000"],
    ]
    if not torch.cuda.is_available():
        combinations.append(["--device", "cuda"])
    for argv in combinations:
        _assert_refused(
            capsys, BASE + argv + ["--out", str(out)] * ("--out" not in argv), out, " ".join(argv)
        )
        cases += 1
    assert cases > 150


def test_fuzz_config_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(7)
    actions = _actions()
    out = tmp_path / "run"
    path = tmp_path / "config.json"
    cases = 0
    for dest in sorted(actions) + sorted(PATH_FLAGS - {"out", "config", "resume"}):
        action = actions.get(dest) or next(a for a in build_parser()._actions if a.dest == dest)
        values = _bad_config_values(action, rng) if dest in actions else [5, [], True, {}]
        for value in values:
            cfg = {"dataset": "moons", "model": "mlp", "width": 8, "depth": 1}
            for key in rng.sample(["epochs", "seed", "lr", "batch_size"], rng.randint(0, 2)):
                cfg[key] = {"epochs": 1, "seed": 2, "lr": 0.01, "batch_size": 8}[key]
            cfg[dest] = value
            text = json.dumps(cfg).replace('"INF_LITERAL"', "1e999")
            path.write_text(text)
            _assert_refused(
                capsys, ["--config", str(path), "--out", str(out)], out, f"{dest}: {text}"
            )
            cases += 1
    for text in (
        "",
        "[]",
        "3",
        '{"epochs": NaN}',
        '{"lr": Infinity}',
        "{bad",
        '{"bogus": 1}',
        "\u00ff\u00fe",
        '{"epochs": 1, "epochs": "x"}',
    ):
        path.write_text(text)
        _assert_refused(capsys, ["--config", str(path), "--out", str(out)], out, repr(text))
        cases += 1
    assert cases > 150


@pytest.mark.parametrize("argv", [["--epochs", "1"], ["--config", "{cfg}"]])
def test_valid_inputs_are_not_refused(tmp_path, argv):
    """The fuzz's base inputs are valid: the refusals above come from the bad element."""
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "dataset": "moons",
                "model": "mlp",
                "width": 8,
                "depth": 1,
                "epochs": 1,
                "no_progress": True,
            }
        )
    )
    argv = [a.replace("{cfg}", str(cfg)) for a in argv]
    extra = BASE if "--config" not in argv else []
    assert jtrain.main(extra + argv + ["--out", str(tmp_path / "run"), "--sample-every", "0"]) == 0


# ---------------------------------------------------------------------------------------------
# Image folders: every pixel mode and defect either loads exactly or is refused cleanly
# ---------------------------------------------------------------------------------------------

FOLDER_RUN = [
    "--dataset", "folder", "--model", "mlp", "--width", "8", "--depth", "1", "--sgld-steps",
    "1", "--buffer-size", "40", "--batch-size", "16", "--no-progress", "--sample-every", "0",
    "--epochs", "1",
]  # fmt: skip
# modes written as PNG (PT: a palette with a transparent entry no pixel uses), and two that
# have no 8- or 16-bit scale (32-bit TIFFs named .png)
LOADABLE_MODES = ["1", "L", "LA", "I;16", "RGB", "RGBA", "P", "PT"]
UNSCALED_MODES = ["F", "I"]
GREY = {"1", "L", "LA", "I;16"}
# defects the data loader refuses, and those it accepts (skipped files) or the trainer refuses
REFUSED = {"transparent", "one_class", "truncated", "empty_file", "not_an_image", "mixed_size"}
REFUSED |= {"few_images", "unscaled_mode"}
DEFECTS = sorted(REFUSED) + ["hidden_files", "tiny"] + [None] * 6


def _make_image(mode: str, size: int, rng: random.Random) -> tuple[Image.Image, np.ndarray]:
    """A random image of ``mode`` and its expected values in [-1, 1] as ``[H, W, C]``."""
    g = np.random.default_rng(rng.randrange(2**32))
    shape = (size, size)
    if mode == "1":
        bits = g.integers(0, 2, shape).astype(bool)
        return Image.fromarray(bits), bits[..., None] * 2.0 - 1.0
    if mode == "I;16":
        v = g.integers(0, 65536, shape, dtype=np.uint16)
        return Image.fromarray(v), v[..., None] / 32767.5 - 1.0
    if mode in ("P", "PT"):
        palette = g.integers(0, 256, (256, 3), dtype=np.uint8)
        index = g.integers(1, 256, shape, dtype=np.uint8)
        image = Image.fromarray(index, "P")
        image.putpalette(palette.reshape(-1).tolist())
        if mode == "PT":
            image.info["transparency"] = 0
        return image, palette[index] / 127.5 - 1.0
    if mode in UNSCALED_MODES:
        return Image.new(mode, (size, size), 3), np.zeros((size, size, 1))
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    v = g.integers(0, 256, shape + (channels,), dtype=np.uint8)
    if mode in ("LA", "RGBA"):
        v[..., -1] = 255
    image = Image.fromarray(v[..., 0] if channels == 1 else v, mode)
    return image, v[..., : max(1, channels - 1) if mode in ("LA", "RGBA") else channels] / 127.5 - 1


def _levels(values: np.ndarray) -> tuple[int, ...]:
    """Values in [-1, 1] as 16-bit levels (an 8-bit value v is level 257 v): exact integers
    that float32 rounding does not move."""
    return tuple(np.rint((np.asarray(values, np.float64).reshape(-1) + 1) * 32767.5).astype(int))


def _fuzz_folder(root: Path, rng: random.Random, defect: str | None) -> list | None:
    """Write a random image folder with ``defect``; return its expected (label, values) rows,
    sorted, or None when it must be refused."""
    n_classes = 1 if defect == "one_class" else rng.randint(2, 3)
    size = rng.randint(1, 4) if defect == "tiny" else rng.randint(5, 9)
    per_class = 1 if defect == "few_images" else rng.randint(8, 12)
    modes = [rng.choice(LOADABLE_MODES) for _ in range(n_classes)]
    if defect == "unscaled_mode":
        modes[0] = rng.choice(UNSCALED_MODES)
    if defect == "transparent" and not set(modes) & {"LA", "RGBA", "PT"}:
        modes[0] = "RGBA"
    colour = any(m not in GREY for m in modes)
    rows, files = [], []
    for k, mode in enumerate(modes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image, values = _make_image(mode, size, rng)
            path = folder / f"{i:03d}.png"
            image.save(path, format="TIFF" if mode in UNSCALED_MODES else "PNG")
            files.append((path, mode))
            if colour and values.shape[-1] == 1:
                values = np.repeat(values, 3, axis=-1)
            rows.append((k, _levels(values.transpose(2, 0, 1))))
    path, mode = rng.choice(files)
    if defect == "transparent":
        path, mode = next(f for f in files if f[1] in ("LA", "RGBA", "PT"))
        image = Image.open(path)
        image.load()
        if mode == "PT":
            image.putpixel((0, 0), 0)
        else:
            image.putpixel((0, 0), (0,) * len(mode))
        image.save(path)
    elif defect == "truncated":
        path.write_bytes(path.read_bytes()[: max(20, path.stat().st_size // 2)])
    elif defect == "empty_file":
        path.write_bytes(b"")
    elif defect == "not_an_image":
        path.write_text("not an image\n")
    elif defect == "mixed_size":
        Image.new("L", (size + 1, size)).save(path)
    elif defect == "hidden_files":
        (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07")
        (path.parent / ".DS_Store").write_bytes(b"\x00\x00")
        (root / ".hidden_class").mkdir()
        (root / ".hidden_class" / "x.png").write_bytes(b"junk")
    return None if defect in REFUSED else sorted(rows)


def test_fuzz_image_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(20261205)
    out = tmp_path / "run"
    outcomes = {"loaded": 0, "refused": 0, "trained": 0}
    for case in range(40):
        defect = DEFECTS[case % len(DEFECTS)] if case < len(DEFECTS) else rng.choice(DEFECTS)
        root = tmp_path / f"folder{case}"
        expected = _fuzz_folder(root, rng, defect)
        argv = FOLDER_RUN + ["--data-root", str(root), "--out", str(out)]
        name = f"case {case} ({defect}): {sorted(p.name for p in root.iterdir())}"
        if expected is None:
            with pytest.raises(DataError):
                for split in ("train", "val", "test"):
                    load_dataset("folder", root, split)
            _assert_refused(capsys, argv, out, name)
            outcomes["refused"] += 1
            continue
        splits = [load_dataset("folder", root, s) for s in ("train", "val", "test")]
        got = sorted(
            (int(label), _levels(row.double().numpy()))
            for d in splits
            for label, row in zip(d.y, d.x.reshape(len(d), -1))
        )
        assert got == expected, name
        outcomes["loaded"] += 1
        if defect == "tiny":
            _assert_refused(capsys, argv, out, name)  # too small for the 4-pixel padding
        elif outcomes["trained"] < 3:
            assert jtrain.main(argv + ["--max-iters", "2"]) == 0, capsys.readouterr().err
            outcomes["trained"] += 1
            shutil.rmtree(out)
    assert min(outcomes.values()) >= 3, outcomes


# ---------------------------------------------------------------------------------------------
# Data and checkpoints that change under a run: a resume refuses them and changes nothing
# ---------------------------------------------------------------------------------------------


def _mutate(root: Path, rng: random.Random, kind: str) -> None:
    files = sorted(root.rglob("*.png"))
    path = rng.choice(files)
    if kind == "add":
        shutil.copy(path, path.with_name("added.png"))
    elif kind == "remove":
        path.unlink()
    elif kind == "rename":
        path.rename(path.with_name("renamed.png"))
    elif kind == "move_class":
        other = next(p for p in sorted(root.iterdir()) if p != path.parent)
        path.rename(other / f"moved_{path.name}")
    elif kind == "replace_bigger":
        image = Image.open(path)
        image.load()
        Image.effect_noise(image.size, 80).convert(image.mode).save(path, compress_level=0)
    elif kind == "add_class":
        (root / "zz").mkdir()
        for i in range(8):
            shutil.copy(files[i], root / "zz" / f"{i}.png")
    elif kind == "remove_class":
        shutil.rmtree(path.parent)


MUTATIONS = ["add", "remove", "rename", "move_class", "replace_bigger", "add_class"]
MUTATIONS += ["remove_class"]


def _files(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_fuzz_data_changed_under_a_run(tmp_path, capsys, monkeypatch):
    rng = random.Random(5)
    pristine = tmp_path / "pristine"
    for k in range(3):
        (pristine / f"c{k}").mkdir(parents=True)
        for i in range(12):
            image, _ = _make_image(rng.choice(["L", "I;16"]), 8, rng)
            image.save(pristine / f"c{k}" / f"{i:03d}.png")
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(pristine, data)
    assert jtrain.main(FOLDER_RUN + ["--data-root", str(data), "--out", str(run)]) == 0
    twin = tmp_path / "twin"
    argv = FOLDER_RUN + ["--data-root", str(data), "--out", str(twin), "--objective", "ce"]
    assert jtrain.main(argv) == 0
    capsys.readouterr()
    before = _files(run)
    for case in range(12):
        kind = MUTATIONS[case] if case < len(MUTATIONS) else rng.choice(MUTATIONS)
        _mutate(data, rng, kind)
        _assert_resume_refused(capsys, run, before, f"case {case} ({kind})")
        if case < 4 and kind != "remove_class":  # evaluation warns (a class less: refused)
            warnings = _evaluate(tmp_path / f"eval{case}", run, capsys)
            assert "differ from its training data" in warnings[0], (kind, warnings)
        shutil.rmtree(data)
        shutil.copytree(pristine, data)
    assert _evaluate(tmp_path / "eval_same", run, capsys) == []
    # another run's checkpoint in place of last.pt (refused) and best.pt (a warning)
    shutil.copy(twin / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    swapped = _files(run)
    _assert_resume_refused(capsys, run, swapped, "another run's last.pt")
    shutil.copy(twin / "checkpoints" / "best.pt", run / "checkpoints" / "best.pt")
    warnings = _evaluate(tmp_path / "eval_swapped", run, capsys)
    assert "belongs to another run than its run folder" in warnings[0]
    for name in ("last.pt", "best.pt"):  # the run's own checkpoints back
        (run / "checkpoints" / name).write_bytes(before[f"checkpoints/{name}"])
    # copying the data elsewhere (new times, same files) is the same data
    moved = tmp_path / "moved"
    shutil.copytree(pristine, moved)
    assert jtrain.main(["--resume", str(run), "--epochs", "2", "--data-root", str(moved)]) == 0


def _evaluate(out: Path, run: Path, capsys) -> list[str]:
    """Evaluate a run folder's accuracy; returns report.json's warnings (also on stderr)."""
    from jem_ext.eval import cli as eval_cli

    code = eval_cli.main(["--checkpoint", str(run), "--out", str(out), "--tasks", "accuracy"])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert err.count("jem_ext.eval: warning: ") == len(warnings)
    return warnings


def _assert_resume_refused(capsys, run: Path, before: dict[str, bytes], case: str) -> None:
    code = jtrain.main(["--resume", str(run), "--epochs", "2"])
    err = capsys.readouterr().err
    assert code == 2, f"{case}: exit {code}, stderr {err!r}"
    assert err.startswith("error: ") and err.count("\n") == 1, f"{case}: {err!r}"
    assert _files(run) == before, f"{case}: the run folder changed"
