"""Seeded fuzz of the trainer's flags and config files: every invalid input is refused cleanly.

Each case is a valid base command plus one invalid element (a flag value of the wrong type,
non-finite, out of range, not a choice, an unknown flag, a bad combination, or the same in a
config file). Every case must exit with status 2, print exactly one line on stderr, and leave
no run folder behind.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

from jem_ext import train as jtrain
from jem_ext.training.config import RANGES
from jem_ext.training.flags import build_parser, finite_float, int_list

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
    r = RANGES.get(key)
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
