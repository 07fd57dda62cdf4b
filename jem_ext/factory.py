"""Bring your own model: a classifier built by a factory, ``--model PACKAGE.MODULE:FACTORY``.

Any importable callable can supply the network JEM trains: it is called as
``factory(num_classes, in_shape)`` (``in_shape`` the shape of one input, e.g. ``(3, 32, 32)``)
and returns an ``nn.Module`` that maps a batch ``[B, *in_shape]`` to logits ``[B, num_classes]``.
:func:`build` imports it, calls it and checks the result with one forward pass on a batch of
zeros, so a missing module, a name that is not callable, an exception in the factory or a wrong
output shape is one :class:`FactoryError` line before anything is trained or written.

The built module carries the same ``jem_spec`` as the registered models (see
:func:`jem_ext.models.model_spec`), with the factory's ``"PACKAGE.MODULE:FACTORY"`` as its name
and no keyword arguments. A checkpoint records that name but never imports it by itself: whoever
rebuilds the model from a checkpoint (``--resume``, the evaluation, ``jem_ext.score``,
:func:`jem_ext.load`) names the factory again, and :func:`check_named` refuses one that differs.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .modules import eval_mode, model_device

__all__ = [
    "FactoryError",
    "PROBE_BATCH",
    "batch_norm_layers",
    "batch_norm_note",
    "build",
    "check_named",
    "factory_name",
    "is_factory",
    "parse",
    "rebuild",
    "resolve",
]

SEPARATOR = ":"
PROBE_BATCH = 2  # rows of the zero batch that checks a built model (BatchNorm needs 2 in train)
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_EXPECTED = "PACKAGE.MODULE:FACTORY (an importable module, a colon, a callable in it)"


class FactoryError(ValueError):
    """A model factory that cannot be used; the message is one line naming it."""


def is_factory(name: Any) -> bool:
    """Whether a model name names a factory (``"module:callable"``) rather than a built-in
    architecture."""
    return isinstance(name, str) and SEPARATOR in name


def parse(text: str) -> tuple[str, str]:
    """Split ``"PACKAGE.MODULE:FACTORY"`` into the module and the (dotted) attribute.

    Raises:
        FactoryError: not of that form.
    """
    module, sep, attr = str(text).partition(SEPARATOR)
    if not sep or not _DOTTED.match(module) or not _DOTTED.match(attr):
        raise FactoryError(f"{text}: expected {_EXPECTED}")
    return module, attr


def name_problem(text: str) -> str | None:
    """Why ``text`` is not of the form ``PACKAGE.MODULE:FACTORY`` (the error line of
    :func:`parse`), or None. Its form only: nothing is imported."""
    try:
        parse(text)
    except FactoryError as err:
        return str(err)
    return None


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve(text: str) -> Callable[..., Any]:
    """Import the factory that ``text`` names and return it.

    Raises:
        FactoryError: malformed name, module not importable (or raising on import), no such
            attribute, or not callable.
    """
    module_name, attr = parse(text)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise FactoryError(
                f"{text}: no module named {missing!r} (install it, or run from the folder that "
                "holds it or add that folder to PYTHONPATH)"
            ) from None
        raise FactoryError(f"{text}: importing {module_name} failed ({_first_line(err)})") from None
    except Exception as err:  # anything the module's own code raises while importing
        raise FactoryError(f"{text}: importing {module_name} failed ({_first_line(err)})") from None
    owner = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FactoryError(f"{text}: {owner} has no attribute {part!r}")
        obj, owner = getattr(obj, part), f"{owner}.{part}"
    if not callable(obj):
        raise FactoryError(
            f"{text}: {owner} is a {type(obj).__name__}, not a callable that builds a model"
        )
    return obj


def factory_name(factory: Callable[..., Any]) -> str | None:
    """``"module:qualname"`` of a callable, the name it would be given as (None when it has no
    importable name, e.g. a lambda or a ``functools.partial``)."""
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    return f"{module}{SEPARATOR}{qualname}"


def check_named(
    recorded: str, given: str | Callable[..., Any] | None, flag: str = "--model"
) -> Callable[..., Any]:
    """The factory to rebuild a checkpoint's model with, given what the user named.

    A checkpoint never imports code by itself: ``given`` (a ``"module:factory"`` string or the
    callable itself) must name the ``recorded`` factory; the string is then imported. ``flag``
    is the command-line flag that names it, for the message.

    Raises:
        FactoryError: nothing given, or a different factory.
    """
    if given is None:
        raise FactoryError(
            f"the model comes from the factory {recorded}, and a checkpoint never imports code "
            f"by itself: name it again ({flag} {recorded} on the command line, "
            f"model={recorded!r} in jem_ext.load)"
        )
    name = given if isinstance(given, str) else factory_name(given)
    if name != recorded:
        shown = name if name is not None else repr(given)
        raise FactoryError(f"the model comes from the factory {recorded}, not {shown}")
    return resolve(given) if isinstance(given, str) else given


def _shape_text(in_shape: tuple[int, ...], rows: Any = "B") -> str:
    return "[" + ", ".join(str(s) for s in (rows, *in_shape)) + "]"


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"a {str(out.dtype).removeprefix('torch.')} tensor {list(out.shape)}"
    return f"a {type(out).__name__}"


def check_output(model: nn.Module, text: str, num_classes: int, in_shape: tuple[int, ...]) -> None:
    """One forward pass of a zero batch ``[PROBE_BATCH, *in_shape]`` (eval mode, no gradients,
    on the model's device): the output must be floating logits ``[PROBE_BATCH, num_classes]``.

    Raises:
        FactoryError: the forward raises, or gives something else.
    """
    x = torch.zeros(PROBE_BATCH, *in_shape, device=model_device(model))
    try:
        with eval_mode(model), torch.no_grad():
            out = model(x)
    except Exception as err:
        raise FactoryError(
            f"{text}: the model fails on a batch {_shape_text(in_shape, PROBE_BATCH)} "
            f"({_first_line(err)})"
        ) from None
    expected = [PROBE_BATCH, num_classes]
    if not (isinstance(out, Tensor) and out.is_floating_point() and list(out.shape) == expected):
        raise FactoryError(
            f"{text}: the model gives {_describe(out)} for a batch "
            f"{_shape_text(in_shape, PROBE_BATCH)}; expected float logits {expected}"
        )


def build(
    text: str,
    num_classes: int,
    in_shape: tuple[int, ...],
    factory: Callable[..., Any] | None = None,
) -> nn.Module:
    """Build the model of factory ``text`` for ``num_classes`` classes and inputs ``in_shape``,
    check it, and record its spec (attribute ``jem_spec``).

    Args:
        text: ``"PACKAGE.MODULE:FACTORY"``.
        num_classes: number of logits.
        in_shape: shape of one input sample.
        factory: the callable itself (already resolved, see :func:`check_named`); None imports
            ``text``.

    Raises:
        FactoryError: see :func:`resolve`; the factory raises or returns no ``nn.Module``; the
            model's output is not logits ``[B, num_classes]``.
    """
    fn = resolve(text) if factory is None else factory
    shape = tuple(int(s) for s in in_shape)
    try:
        model = fn(int(num_classes), shape)
    except Exception as err:
        raise FactoryError(
            f"{text}: the factory raised {_first_line(err)} when called with "
            f"({int(num_classes)}, {shape})"
        ) from None
    if not isinstance(model, nn.Module):
        raise FactoryError(
            f"{text}: the factory returned a {type(model).__name__}; expected a torch.nn.Module"
        )
    check_output(model, text, int(num_classes), shape)
    spec = {"name": text, "num_classes": int(num_classes), "in_shape": list(shape), "kwargs": {}}
    model.jem_spec = json.loads(json.dumps(spec))
    return model


def rebuild(spec: dict[str, Any], given: Any, flag: str = "--model") -> nn.Module:
    """The model of a checkpoint's spec rebuilt by the factory the caller named (``given``, see
    :func:`check_named`); ``given`` for a built-in model's spec is refused.

    Raises:
        FactoryError
    """
    name = spec["name"]
    if not is_factory(name):
        shown = given if isinstance(given, str) else factory_name(given)
        raise FactoryError(
            f"the model is the built-in {name!r}, not a factory's (got {shown}); leave {flag} out"
        )
    fn = check_named(name, given, flag)
    return build(name, spec["num_classes"], tuple(spec["in_shape"]), factory=fn)


def batch_norm_layers(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` that normalise by batch statistics in train mode
    (BatchNorm of any dimension, SyncBatchNorm)."""
    return [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def batch_norm_note(model: nn.Module, text: str) -> str | None:
    """The note a run prints at its start when ``model`` has batch-dependent normalisation
    (None when it has none)."""
    layers = batch_norm_layers(model)
    if not layers:
        return None
    shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
    return (
        f"note: the model of {text} has {len(layers)} BatchNorm layer"
        f"{'s' if len(layers) > 1 else ''} ({shown}): in training each forward is normalised "
        "by its own batch, so data and SGLD samples go through separate forwards, and the "
        "running statistics, which the chains (eval mode) and the evaluation use, mix data and "
        "chain samples; JEM trains without batch normalisation, JEM++ makes it work with "
        "informative chain starts (--init gaussian)"
    )
