"""Classifier architectures whose logits JEM reads as energies, and a small registry.

* :class:`WideResNet` -- the JEM reference network (``wideresnet.py`` of wgrathwohl/JEM):
  pre-activation wide residual blocks, LeakyReLU(0.2), no normalisation by default.
* :class:`SmallCNN` -- a few 3x3 convolutions, cheap enough for CPU runs on 8x8 digits.
* :class:`MLP` -- fully connected network for 2-D toy data.

All map an input batch to logits ``[B, num_classes]``. None has normalisation layers unless asked
(JEM finds BatchNorm harmful for SGLD sampling), and all behave the same in train and eval mode
apart from dropout and the optional norm layers.

Use :func:`build_model` to construct one by name; it records a JSON-serialisable spec on the
module (attribute ``jem_spec``) so that a checkpoint can store :func:`model_spec` and rebuild the
architecture with :func:`build_from_spec`. A new architecture is one :class:`ModelEntry` in
:data:`MODELS`; the trainer's ``--model`` choices and settings follow from it. A name of the
form ``"PACKAGE.MODULE:FACTORY"`` is a user's own model, built by :mod:`jem_ext.factory`.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import factory as factories
from .modules import eval_mode, model_device
from .wrn import NORMS, WideResNet, _norm2d
from .wrn import WideBasic as WideBasic  # re-exported: jem_ext.models.WideBasic

__all__ = [
    "NORMS",
    "WideResNet",
    "SmallCNN",
    "MLP",
    "MODELS",
    "ModelEntry",
    "model_entry",
    "convolutional_models",
    "build_model",
    "model_spec",
    "build_from_spec",
    "meta_model",
    "MAX_PARAMETERS",
    "predict_logits",
]


class SmallCNN(nn.Module):
    """A small all-convolutional classifier for CPU-sized JEM runs.

    ``conv3x3(width)`` at full resolution, then stride-2 3x3 convolutions (doubling the
    channels, capped at ``4 * width``) until the feature map is at most 4x4, one more 3x3
    convolution there, global average pooling, dropout and a linear head; each convolution is
    followed by the optional norm and LeakyReLU. For 8x8 inputs that is 1 -> 32 -> 64 -> 64
    channels (~57k parameters); for 32x32 inputs 3 -> 32 -> 64 -> 128 -> 128 -> 128.

    Args:
        in_channels: image channels.
        num_classes: number of logits.
        image_size: expected input side, used only to choose the number of stride-2 stages
            (any input size works thanks to global pooling).
        width: channels of the first convolution.
        leak: LeakyReLU negative slope.
        norm: None (default), "batch", "instance" or "layer".
        dropout: dropout rate before the linear head.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 8,
        width: int = 32,
        leak: float = 0.2,
        norm: str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1),
                _norm2d(c_out, norm),
                nn.LeakyReLU(leak),
            ]

        layers = stage(in_channels, width, 1)
        channels, size = width, image_size
        while size > 4:
            out = min(2 * channels, 4 * width)
            layers += stage(channels, out, 2)
            channels, size = out, math.ceil(size / 2)
        layers += stage(channels, channels, 1)
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.dropout(self.features(x).mean(dim=(2, 3))))


_ACTIVATIONS: dict[str, Callable[[float], nn.Module]] = {
    "swish": lambda leak: nn.SiLU(),
    "lrelu": lambda leak: nn.LeakyReLU(leak),
}


class MLP(nn.Module):
    """Fully connected classifier for low-dimensional (e.g. 2-D toy) data.

    ``depth`` hidden layers of ``hidden`` units with activation ``act``, then a linear head.
    The input is flattened, so ``in_dim`` is the number of values per sample. The default
    smooth "swish" (SiLU) activation gives a smooth energy surface, which SGLD and density plots
    on toy data like better than the piecewise-linear "lrelu" (LeakyReLU(leak)).

    Args:
        in_dim: input features per sample.
        num_classes: number of logits.
        hidden: units per hidden layer.
        depth: number of hidden layers.
        leak: negative slope for ``act="lrelu"``.
        act: "swish" or "lrelu".
    """

    def __init__(
        self,
        in_dim: int = 2,
        num_classes: int = 2,
        hidden: int = 128,
        depth: int = 3,
        leak: float = 0.2,
        act: str = "swish",
    ) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"MLP: act expected one of {sorted(_ACTIVATIONS)}, got {act!r}")
        if depth < 1:
            raise ValueError(f"MLP: expected depth >= 1, got {depth}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(depth):
            layers += [nn.Linear(dim, hidden), _ACTIVATIONS[act](leak)]
            dim = hidden
        layers.append(nn.Linear(dim, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


def _image_shape(name: str, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ValueError(f"{name}: expected in_shape (C, H, W), got {tuple(in_shape)}")
    return in_shape  # type: ignore[return-value]


def _build_wrn(num_classes: int, in_shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    c, _, _ = _image_shape("wrn", in_shape)
    return WideResNet(num_classes=num_classes, in_channels=c, **kwargs)


def _build_small_cnn(num_classes: int, in_shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    c, h, w = _image_shape("small_cnn", in_shape)
    return SmallCNN(in_channels=c, num_classes=num_classes, image_size=max(h, w), **kwargs)


def _build_mlp(num_classes: int, in_shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    return MLP(in_dim=math.prod(in_shape), num_classes=num_classes, **kwargs)


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture: everything the package needs to know about it.

    Attributes:
        builder: ``builder(num_classes, in_shape, **kwargs)`` returns the module.
        depth_kwarg: the constructor argument that the ``--depth`` setting fills (None: the
            architecture has no depth setting).
        width_kwarg: the constructor argument that the ``--width`` setting fills.
        takes_norm: whether the constructor takes ``norm`` and ``dropout`` (``--norm``,
            ``--dropout``).
        convolutional: whether it has 2-d convolutions (``--channels-last`` applies).
        needs_images: whether its inputs must be images ``(C, H, W)`` (not the 2-D toy sets).
    """

    builder: Callable[..., nn.Module]
    depth_kwarg: str | None
    width_kwarg: str | None
    takes_norm: bool
    convolutional: bool
    needs_images: bool


# The one table of architectures: the --model choices, the training settings each model takes
# and the convolutional models are all read from it. Add a model here and nowhere else.
MODELS: dict[str, ModelEntry] = {
    "wrn": ModelEntry(
        _build_wrn,
        depth_kwarg="depth",
        width_kwarg="widen_factor",
        takes_norm=True,
        convolutional=True,
        needs_images=True,
    ),
    "small_cnn": ModelEntry(
        _build_small_cnn,
        depth_kwarg=None,
        width_kwarg="width",
        takes_norm=True,
        convolutional=True,
        needs_images=True,
    ),
    "mlp": ModelEntry(
        _build_mlp,
        depth_kwarg="depth",
        width_kwarg="hidden",
        takes_norm=False,
        convolutional=False,
        needs_images=False,
    ),
}


def model_entry(name: str) -> ModelEntry:
    """The registered entry of a model name (raises ValueError naming the choices)."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}") from None


def convolutional_models() -> tuple[str, ...]:
    """Names of the registered models with 2-d convolutions."""
    return tuple(name for name, entry in MODELS.items() if entry.convolutional)


MAX_PARAMETERS = 10**9  # beyond this a spec is refused before anything is allocated
_POSITIVE_INT_ARGS = ("depth", "widen_factor", "width", "hidden", "in_channels", "image_size")


def _check_args(name: str, num_classes: Any, in_shape: Any, kwargs: dict[str, Any]) -> None:
    """Refuse model arguments out of range before a module is built (one clear message)."""

    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not positive_int(num_classes):
        raise ValueError(f"{name}: expected num_classes >= 1, got {num_classes!r}")
    if not (
        isinstance(in_shape, (list, tuple)) and in_shape and all(positive_int(s) for s in in_shape)
    ):
        raise ValueError(f"{name}: expected in_shape of positive sizes, got {in_shape!r}")
    for key in _POSITIVE_INT_ARGS:
        if key in kwargs and not positive_int(kwargs[key]):
            raise ValueError(f"{name}: expected {key} >= 1, got {kwargs[key]!r}")
    dropout = kwargs.get("dropout", 0.0)
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"{name}: expected dropout in [0, 1), got {dropout!r}")


def _as_int(v: Any) -> Any:
    """``v`` as a Python int when it is an integer of any kind (numpy, torch), else ``v``."""
    try:
        return operator.index(v)
    except TypeError:
        return v


def meta_model(spec: dict[str, Any]) -> nn.Module:
    """The model of a spec on the meta device: its structure and shapes, no memory.

    Raises:
        ValueError: invalid spec, or more than :data:`MAX_PARAMETERS` parameters.
    """
    name = spec.get("name")
    if factories.is_factory(name):
        raise ValueError(f"{name}: a factory's model is known only by building it")
    entry = model_entry(name)  # type: ignore[arg-type]
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"{name}: expected kwargs to be a dict, got {kwargs!r}")
    _check_args(name, spec.get("num_classes"), spec.get("in_shape"), kwargs)
    with torch.device("meta"):
        model = entry.builder(spec["num_classes"], tuple(spec["in_shape"]), **kwargs)
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"{name}: {count:.3g} parameters, more than the {MAX_PARAMETERS:.0e} "
            "this package builds"
        )
    return model


def build_model(name: str, num_classes: int, in_shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    """Build a registered model and record how it was built.

    The arguments are checked, and the model's size computed without allocating it, first.

    Args:
        name: a key of :data:`MODELS` ("wrn", "small_cnn", "mlp", ...), or a factory
            ``"PACKAGE.MODULE:FACTORY"``, imported and called (:func:`jem_ext.factory.build`).
        num_classes: number of logits.
        in_shape: shape of one input sample, ``(C, H, W)`` for images or ``(D,)``.
        **kwargs: further constructor arguments (e.g. ``depth``, ``widen_factor``, ``norm``);
            they must be JSON-serialisable. A factory takes none.

    Returns:
        The module, with attribute ``jem_spec`` (see :func:`model_spec`).

    Raises:
        ValueError: unknown name, wrong ``in_shape``, arguments out of range, too many
            parameters, or non-serialisable kwargs; a factory that cannot be used
            (:class:`jem_ext.factory.FactoryError`).
    """
    if factories.is_factory(name):
        if kwargs:
            raise ValueError(f"{name}: a model factory takes no arguments, got {sorted(kwargs)}")
        return factories.build(name, _as_int(num_classes), tuple(_as_int(s) for s in in_shape))
    entry = model_entry(name)
    spec = {
        "name": name,
        "num_classes": _as_int(num_classes),
        "in_shape": [_as_int(s) for s in in_shape],
        "kwargs": dict(kwargs),
    }
    try:
        json.dumps(spec)
    except TypeError as err:
        raise ValueError(f"build_model: kwargs must be JSON-serialisable ({err})") from err
    meta_model(spec)
    model = entry.builder(spec["num_classes"], tuple(spec["in_shape"]), **kwargs)
    model.jem_spec = json.loads(json.dumps(spec))
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The JSON-serialisable spec ``{name, num_classes, in_shape, kwargs}`` of a built model.

    Raises:
        ValueError: the model was not made by :func:`build_model`.
    """
    spec = getattr(model, "jem_spec", None)
    if spec is None:
        raise ValueError(f"{type(model).__name__} has no jem_spec: build it with build_model()")
    return json.loads(json.dumps(spec))


def build_from_spec(spec: dict[str, Any], factory: Any = None, flag: str = "--model") -> nn.Module:
    """Rebuild a (freshly initialised) model from :func:`model_spec` output.

    A spec never imports code: a factory's model is rebuilt only by the same ``factory``
    named again (see :func:`jem_ext.factory.rebuild`; ``flag`` names it in messages).

    Raises:
        ValueError: the spec lacks ``name``, ``num_classes`` or ``in_shape``, or is invalid;
            a factory not named as :func:`jem_ext.factory.rebuild` needs.
    """
    missing = [k for k in ("name", "num_classes", "in_shape") if k not in spec]
    if missing:
        raise ValueError(
            f"model spec: expected keys name, num_classes, in_shape; missing {missing}"
        )
    if factories.is_factory(spec["name"]) or factory is not None:
        return factories.rebuild(spec, factory, flag)
    return build_model(
        spec["name"], spec["num_classes"], tuple(spec["in_shape"]), **spec.get("kwargs", {})
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x: Tensor,
    batch_size: int = 500,
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """Logits of ``model`` for every row of ``x``, in eval mode, as float32 on the CPU.

    ``x`` may live anywhere; batches are moved to the model's device. The model's train/eval
    mode is restored afterwards. ``on_batch(k)`` is called after each batch of ``k`` rows.
    """
    device = model_device(model)
    out = []
    with eval_mode(model):
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size]
            out.append(model(xb.to(device)).float().cpu())
            if on_batch is not None:
                on_batch(len(xb))
    return torch.cat(out) if out else torch.empty(0, 0)
