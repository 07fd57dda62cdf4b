"""Models from a user's factory (``--model PACKAGE.MODULE:FACTORY``): resolving and checking the
factory, recording it, and rebuilding it from a checkpoint only when the caller names it."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from factory_models import MODULE, PACKAGE, forget_factories, write_factories

import jem_ext
from jem_ext import factory as factories
from jem_ext import score
from jem_ext.checkpoint import CheckpointError, model_from_checkpoint, save_checkpoint
from jem_ext.factory import FactoryError
from jem_ext.models import build_from_spec, build_model, model_spec

SHAPE = (1, 8, 8)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def mod(tmp_path, monkeypatch) -> str:
    return write_factories(tmp_path, monkeypatch)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize("text", ["nocolon", "pkg.mod:", ":fn", "1pkg:fn", "pkg..mod:fn", "a:b:c"])
def test_malformed_names_are_refused(text):
    with pytest.raises(FactoryError, match="expected PACKAGE.MODULE:FACTORY") as err:
        factories.parse(text)
    assert _one_line(err).startswith(text)


def test_is_factory():
    assert factories.is_factory("a.b:c") and not factories.is_factory("small_cnn")
    assert not factories.is_factory(None)


def test_resolve_failures_name_what_is_wrong(mod):
    cases = {
        "no_such_pkg.models:tiny": "no module named 'no_such_pkg'",
        f"{PACKAGE}.nope:tiny": f"no module named '{PACKAGE}.nope'",
        f"{PACKAGE}.broken:tiny": "importing jemtest_factories.broken failed (ModuleNotFoundError",
        f"{MODULE}:missing": f"{MODULE} has no attribute 'missing'",
        f"{MODULE}:NOT_CALLABLE": "NOT_CALLABLE is a int, not a callable",
    }
    for text, message in cases.items():
        with pytest.raises(FactoryError) as err:
            factories.resolve(text)
        assert message in _one_line(err), (text, str(err.value))
    assert callable(factories.resolve(f"{MODULE}:Nets.tiny"))  # a dotted attribute


def test_build_checks_the_model_with_one_forward(mod):
    cases = {
        "raises": "the factory raised RuntimeError: this factory needs a GPU when called with "
        "(10, (1, 8, 8))",
        "not_a_module": "the factory returned a int; expected a torch.nn.Module",
        "wrong_classes": "gives a float32 tensor [2, 11] for a batch [2, 1, 8, 8]; expected float "
        "logits [2, 10]",
        "no_flatten": "the model fails on a batch [2, 1, 8, 8] (RuntimeError",
    }
    for name, message in cases.items():
        with pytest.raises(FactoryError) as err:
            factories.build(f"{MODULE}:{name}", 10, SHAPE)
        assert message in _one_line(err), (name, str(err.value))


def test_build_records_the_spec_and_leaves_the_model_in_train_mode(mod):
    model = build_model(f"{MODULE}:with_batchnorm", 10, SHAPE)
    assert model.training
    bn = model[1]
    assert int(bn.num_batches_tracked) == 0  # the check's forward ran in eval mode
    assert model_spec(model) == {
        "name": f"{MODULE}:with_batchnorm",
        "num_classes": 10,
        "in_shape": [1, 8, 8],
        "kwargs": {},
    }
    with pytest.raises(ValueError, match="takes no arguments"):
        build_model(f"{MODULE}:tiny", 10, SHAPE, width=8)


def test_batch_norm_note(mod):
    assert factories.batch_norm_note(build_model(f"{MODULE}:conv", 10, SHAPE), "x:y") is None
    note = factories.batch_norm_note(build_model(f"{MODULE}:with_batchnorm", 10, SHAPE), "m:f")
    assert note is not None and "\n" not in note
    assert "1 BatchNorm layer (1)" in note and "mix data and chain samples" in note


def _checkpoint(path, model) -> dict:
    state = {"model_spec": model_spec(model), "model": model.state_dict(), "config": {}}
    save_checkpoint(path, state)
    return state


def test_a_checkpoint_never_imports_its_factory(mod, tmp_path):
    torch.manual_seed(0)
    model = build_model(f"{MODULE}:tiny", 10, SHAPE)
    state = _checkpoint(tmp_path / "c.pt", model)
    forget_factories()
    with pytest.raises(CheckpointError) as err:
        model_from_checkpoint(state)
    text = _one_line(err)
    assert "never imports code" in text and f"--model {MODULE}:tiny" in text
    assert PACKAGE not in sys.modules  # nothing was imported
    with pytest.raises(CheckpointError, match=f"comes from the factory {MODULE}:tiny, not "):
        model_from_checkpoint(state, factory=f"{MODULE}:conv")
    assert PACKAGE not in sys.modules  # a mismatch imports nothing either
    x = torch.rand(4, *SHAPE) * 2 - 1
    for given in (f"{MODULE}:tiny", factories.resolve(f"{MODULE}:tiny")):
        rebuilt = model_from_checkpoint(state, factory=given)
        torch.testing.assert_close(rebuilt(x), model(x))


def test_a_changed_factory_is_refused_before_loading_weights(mod, tmp_path):
    model = build_model(f"{MODULE}:tiny", 10, SHAPE)
    state = _checkpoint(tmp_path / "c.pt", model)
    state["model_spec"]["name"] = f"{MODULE}:wider"  # the same name now builds another network
    with pytest.raises(CheckpointError, match="does not match the saved weights") as err:
        model_from_checkpoint(state, factory=f"{MODULE}:wider")
    _one_line(err)


def test_a_factory_for_a_builtin_model_is_refused(mod):
    model = build_model("small_cnn", 10, SHAPE, width=8)
    state = {"model_spec": model_spec(model), "model": model.state_dict()}
    with pytest.raises(CheckpointError, match="built-in 'small_cnn', not a factory's"):
        model_from_checkpoint(state, factory=f"{MODULE}:tiny")
    with pytest.raises(ValueError, match="never imports code"):
        build_from_spec({"name": f"{MODULE}:tiny", "num_classes": 10, "in_shape": [1, 8, 8]})


def test_load_and_score_need_the_factory_named(mod, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(f"{MODULE}:tiny", 10, SHAPE).eval()
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints" / "best.pt", model)
    with pytest.raises(CheckpointError, match="name it again") as err:
        jem_ext.load(run)
    assert str(run) in _one_line(err)
    jem = jem_ext.load(run, model=f"{MODULE}:tiny")
    x = torch.rand(5, *SHAPE) * 2 - 1
    torch.testing.assert_close(jem.probs(x), torch.softmax(model(x), 1))

    np.save(tmp_path / "x.npy", x.numpy())
    args = ["--checkpoint", str(run), "--inputs", str(tmp_path / "x.npy"), "--threshold=-1"]
    out = tmp_path / "s.csv"
    assert score.main([*args, "--out", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "--model" in message and not out.exists()
    assert score.main([*args, "--out", str(out), "--model", f"{MODULE}:conv"]) == 2
    assert "not jemtest_factories.models:conv" in capsys.readouterr().err
    assert score.main([*args, "--out", str(out), "--model", "not a factory"]) == 2
    assert "--model not a factory: expected PACKAGE.MODULE:FACTORY" in capsys.readouterr().err
    assert score.main([*args, "--out", str(out), "--model", f"{MODULE}:tiny"]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    log_px = torch.logsumexp(model(x), 1)
    np.testing.assert_allclose([float(r["log_px"]) for r in rows], log_px.detach(), rtol=1e-5)


def import_torchvision(monkeypatch) -> None:
    """Import torchvision, or skip the test when it is not installed.

    A CUDA build of torchvision on a CPU-only torch (CI installs it with ``--no-deps``) fails
    while registering fake kernels of its C ops (nms, roi_align, ...); ResNet-18 uses none of
    them, so that one registration module is stubbed out, as tests/test_inception.py does.
    """
    try:
        pytest.importorskip("torchvision")
        return
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "torchvision._meta_registrations", ModuleType("stub"))
    pytest.importorskip("torchvision")


def test_resnet18_example(monkeypatch):
    """examples/resnet18_cifar.py: torchvision's ResNet-18 with a CIFAR stem, as a factory."""
    import_torchvision(monkeypatch)
    monkeypatch.syspath_prepend(str(ROOT))
    for name, norm in (("resnet18", "BatchNorm2d"), ("resnet18_groupnorm", "GroupNorm")):
        model = factories.build(f"examples.resnet18_cifar:{name}", 10, (3, 32, 32))
        assert type(model.bn1).__name__ == norm
        assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
        out = model(torch.zeros(2, 3, 32, 32))
        assert out.shape == (2, 10)
    grey = factories.build("examples.resnet18_cifar:resnet18_groupnorm", 3, (1, 32, 32))
    assert grey.conv1.in_channels == 1
