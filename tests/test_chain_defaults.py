"""JEM's chain defaults (steps 20, step size 1, noise 0.01, clamp [-1, 1], a buffer of 10000
chains, re-initialisation 0.05) are written once, in :mod:`jem_ext.chain`: every other module
of the package (the trainer's settings, its recipes, the replay buffer, the sampler, the
initialisers, the bench) refers to them by name.

The check reads the source with ``ast``: a chain setting's default (a parameter default, a
``setting(...)`` field of the options, a dataclass field, a recipe's ``Setting(...)``) written
as a literal equal to JEM's value is a second copy of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import jem_ext
from jem_ext import chain, recipes
from jem_ext.training import options

PACKAGE = Path(jem_ext.__file__).resolve().parent

JEM = {
    "steps": chain.DEFAULT_N_STEPS,
    "step_size": chain.DEFAULT_STEP_SIZE,
    "noise": chain.DEFAULT_NOISE_STD,
    "clamp": chain.DEFAULT_CLAMP,
    "buffer_size": chain.DEFAULT_BUFFER_SIZE,
    "reinit_prob": chain.DEFAULT_REINIT_PROB,
}
# The names a chain setting goes by: function parameters, option fields, config keys.
NAMES = {
    "n_steps": "steps",
    "steps": "steps",
    "sgld_steps": "steps",
    "step_size": "step_size",
    "sgld_step_size": "step_size",
    "noise_std": "noise",
    "noise": "noise",
    "sgld_noise": "noise",
    "clamp": "clamp",
    "buffer_size": "buffer_size",
    "buffer": "buffer_size",
    "reinit_prob": "reinit_prob",
}
# Every module but the defaults' home must name them.
CHECKED = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "chain.py")


def _literal(node: ast.AST | None) -> object:
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        return None  # a name, a call: not a literal


def _copy_of_default(name: str, node: ast.AST | None) -> bool:
    concept = NAMES.get(name)
    if concept is None or not isinstance(node, (ast.Constant, ast.Tuple, ast.UnaryOp)):
        return False
    value = _literal(node)
    return value is not None and not isinstance(value, bool) and value == JEM[concept]


def copies(source: str, where: str) -> list[str]:
    """Each place in ``source`` that writes one of JEM's chain defaults as a literal."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            found += [
                f"{where}:{d.lineno} {node.name}({a.arg}=...)"
                for a, d in pairs
                if _copy_of_default(a.arg, d)
            ]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name, value = node.target.id, node.value
            if isinstance(value, ast.Call) and value.args:
                if _copy_of_default(name, value.args[0]):
                    found.append(f"{where}:{node.lineno} {name} = setting(...)")
            elif _copy_of_default(name, value):  # a dataclass field's default
                found.append(f"{where}:{node.lineno} {name} = ...")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                name = _literal(key)
                if isinstance(name, str) and isinstance(value, ast.Call) and value.args:
                    if _copy_of_default(name, value.args[0]):
                        found.append(f"{where}:{value.lineno} {name!r}: Setting(...)")
    return found


def test_the_training_side_names_the_chain_defaults():
    offenders = [
        c
        for path in CHECKED
        for c in copies(path.read_text(), path.relative_to(PACKAGE).as_posix())
    ]
    assert offenders == [], "write jem_ext.chain's constant instead:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "source",
    [
        "def f(x, n_steps=20):\n    pass\n",
        "def f(x, *, clamp=(-1.0, 1.0)):\n    pass\n",
        "class C:\n    buffer_size: int = setting(10000, 'help')\n",
        "class C:\n    steps: int = 20\n",
        "R = {'reinit_prob': Setting(0.05, 'source')}\n",
        "R = {'sgld_noise': Setting(0.01, 'source')}\n",
    ],
)
def test_the_check_sees_a_copied_default(source):
    assert len(copies(source, "m.py")) == 1


def test_the_check_leaves_other_values_and_names_alone():
    source = (
        "def f(x, n_steps=DEFAULT_N_STEPS, step_size=0.5, lr=0.05):\n    pass\n"
        "R = {'sgld_steps': Setting(10, 's'), 'w_px': Setting(1.0, 's')}\n"
        "class C:\n    reinit_prob: float = setting(DEFAULT_REINIT_PROB, 'help')\n"
    )
    assert copies(source, "m.py") == []


def test_the_defaults_reach_the_options_and_the_jem_recipe():
    chain_options = options.ChainOptions()
    assert (chain_options.steps, chain_options.step_size, chain_options.noise) == (
        chain.DEFAULT_N_STEPS,
        chain.DEFAULT_STEP_SIZE,
        chain.DEFAULT_NOISE_STD,
    )
    assert (chain_options.buffer_size, chain_options.reinit_prob) == (
        chain.DEFAULT_BUFFER_SIZE,
        chain.DEFAULT_REINIT_PROB,
    )
    jem = recipes.recipe_values("jem")
    assert (jem["sgld_steps"], jem["sgld_step_size"], jem["sgld_noise"]) == (20, 1.0, 0.01)
    assert (jem["buffer_size"], jem["reinit_prob"]) == (10000, 0.05)
