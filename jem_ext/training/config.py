"""The trainer's configuration: command-line flags, config files and their validation.

A config is a plain dict keyed by the flags' ``dest`` names (``batch_size`` for
``--batch-size``); ``config.json`` in a run folder is that dict. Precedence: flags given
explicitly > ``--config`` file (or the resumed run's ``config.json``) > defaults.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import DATASETS, FILE_DATASETS, TOY_DATASETS
from ..models import MODELS, NORMS
from ..objectives import OBJECTIVES
from ..sampler import INITS
from .setup import OPTIMIZERS

DEVICES = ("auto", "cpu", "cuda")
NORM_CHOICES = tuple("none" if n is None else n for n in NORMS)

# Keys of config.json that describe the invocation, not the experiment: ignored by --config
# and --resume. (The thread count is part of the experiment: results depend on it.)
INVOCATION_KEYS = ("out", "config", "resume", "no_progress", "dist_timeout")
# Keys config.json records about the launch (world size, batches): not flags, dropped on read.
LAUNCH_KEYS = ("world_size", "global_batch_size", "batch_size_per_process")
# Keys older config.json files may hold that no longer mean anything: read and dropped.
RETIRED_KEYS = ("debug_inject_nan_at",)


class ConfigError(ValueError):
    """A config value or config file is invalid."""


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS, False):
            return text
        if action.option_strings:
            default = action.default
            if isinstance(default, list):
                default = ",".join(str(v) for v in default)
            text += f" (default: {default})"
        return text


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are a :class:`ConfigError` (one line, exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None


def finite_float(text: str) -> float:
    """A float flag's type: a finite number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The argparse parser of ``python -m jem_ext.train``.

    Args:
        suppress_defaults: leave unspecified flags out of the namespace (used to find which
            flags were given explicitly, so they can override ``--config``).
    """
    p = _Parser(
        prog="python -m jem_ext.train",
        description="Train a Joint Energy-based Model (JEM, Grathwohl et al. 2020) or its "
        "cross-entropy twin, writing a run folder with config, metrics, checkpoints, sample "
        "grids and a summary. Defaults train a JEM on the 8x8 digits on the CPU in minutes.",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        formatter_class=_HelpFormatter,
    )
    group = p.add_argument_group

    def add(g: Any, *names: str, **kw: Any) -> None:
        if suppress_defaults:
            kw.pop("default", None)
        g.add_argument(*names, **kw)

    _add_data_flags(add, group("data"))
    _add_model_flags(add, group("model"))
    _add_objective_flags(add, group("objective"))
    _add_sampler_flags(add, group("sampler (SGLD)"))
    _add_optimisation_flags(add, group("optimisation"))
    _add_run_folder_flags(add, group("run folder"))
    _add_guard_flags(add, group("divergence guard"))
    _add_distributed_flags(add, group("distributed (under torchrun)"))
    return p


def _add_data_flags(add: Any, g: Any) -> None:
    add(g, "--dataset", "--data", dest="dataset", choices=DATASETS, default="digits",
        help="dataset to train on (cifar10/cifar100/svhn/folder need --data-root)")
    add(g, "--data-root", default=None,
        help="folder holding the dataset files (CIFAR, SVHN, image folder)")
    add(g, "--labels-per-class", type=int, default=None,
        help="semi-supervised: keep only this many labels per class for the CE term "
        "(default: all labels)")
    add(g, "--no-augment", action="store_true", default=False,
        help="disable the dataset's default augmentation (crop/flip/Gaussian noise)")


def _add_model_flags(add: Any, g: Any) -> None:
    add(g, "--model", choices=tuple(MODELS), default="small_cnn", help="network architecture")
    add(g, "--depth", type=int, default=None,
        help="depth: WRN total depth (6n+4, default 28) or MLP hidden layers (default 3)")
    add(g, "--width", type=int, default=None,
        help="width: WRN widen factor (default 10), SmallCNN first-layer channels (default "
        "32) or MLP hidden units (default 128)")
    add(g, "--norm", choices=NORM_CHOICES, default="none",
        help="normalisation layers of WRN/SmallCNN (JEM uses none)")
    add(g, "--dropout", type=finite_float, default=0.0, help="dropout rate (WRN/SmallCNN)")


def _add_objective_flags(add: Any, g: Any) -> None:
    add(g, "--objective", choices=OBJECTIVES, default="jem",
        help="jem: log p(x) + log p(y|x); factored: log p(y) + log p(x|y) (class-conditional "
        "sampling); ce: cross-entropy only (the classifier twin)")
    add(g, "--w-px", type=finite_float, default=1.0, help="weight of the generative (log p(x)) term")
    add(g, "--w-pyx", type=finite_float, default=1.0, help="weight of the cross-entropy term")
    add(g, "--l2-energy", type=finite_float, default=0.01,
        help="weight of an L2 penalty on the energies of data and samples (divergence "
        "insurance; 0 disables)")


def _add_sampler_flags(add: Any, g: Any) -> None:
    add(g, "--sgld-steps", type=int, default=20, help="SGLD steps per training iteration")
    add(g, "--sgld-step-size", type=finite_float, default=1.0, help="SGLD step on dE/dx")
    add(g, "--sgld-noise", type=finite_float, default=0.01, help="SGLD noise standard deviation")
    add(g, "--buffer-size", type=int, default=10000,
        help="persistent replay buffer size; 0 = short-run chains from the init each time")
    add(g, "--reinit-prob", type=finite_float, default=0.05,
        help="fraction of buffer chains re-initialised at each draw")
    add(g, "--init", choices=INITS, default="uniform",
        help="chain initialisation: uniform on [-1,1], or per-class Gaussians fitted to the "
        "training data (JEM++ informative init)")
    add(g, "--proximal", action="store_true", default=False,
        help="proximal SGLD (JEM++): clip the gradient element-wise to --grad-clip "
        "(0.03 when not given) and clamp samples to [-1, 1]")
    add(g, "--grad-clip", type=finite_float, default=None,
        help="clip dE/dx element-wise to [-c, c] in each SGLD step (default: no clipping)")


def _add_optimisation_flags(add: Any, g: Any) -> None:
    add(g, "--optimizer", choices=OPTIMIZERS, default="adam", help="optimiser")
    add(g, "--lr", type=finite_float, default=3e-3, help="peak learning rate")
    add(g, "--warmup-iters", type=int, default=200,
        help="linear learning-rate warm-up iterations")
    add(g, "--decay-epochs", type=_int_list, default=[40, 50],
        help="epochs at which the learning rate is multiplied by --decay-rate (e.g. 160,180)")
    add(g, "--decay-rate", type=finite_float, default=0.3, help="learning-rate decay factor")
    add(g, "--weight-decay", type=finite_float, default=0.0, help="weight decay")
    add(g, "--batch-size", type=int, default=64,
        help="mini-batch size; under torchrun the global batch, split evenly over the "
        "processes (a multiple of their number; learning rate not scaled)")
    add(g, "--epochs", type=int, default=60, help="training epochs")
    add(g, "--seed", type=int, default=1, help="random seed (model init, data order, sampler)")
    add(g, "--device", choices=DEVICES, default="auto",
        help="device; auto = cuda when available")
    add(g, "--threads", type=int, default=1,
        help="CPU threads for torch (0 = torch's default). Part of the experiment: results "
        "can differ with the thread count (the order of floating-point sums changes), so "
        "--resume and --config keep the run's value. 1 is the default because small models "
        "gain little from more, and on a shared machine extra OpenMP threads can make each "
        "iteration tens of times slower")


def _add_run_folder_flags(add: Any, g: Any) -> None:
    add(g, "--out", default=None,
        help="run folder to create (default: a fresh runs/<timestamp>-<dataset>-<objective>)")
    add(g, "--config", default=None,
        help="repeat a run from its config.json; flags given explicitly override it")
    add(g, "--resume", default=None, metavar="RUN_DIR",
        help="continue an interrupted run from RUN_DIR/checkpoints/last.pt (flags given "
        "explicitly, e.g. --epochs, override its config)")
    add(g, "--log-every", type=int, default=10, help="write a metrics row every N iterations")
    add(g, "--ckpt-every", type=int, default=100,
        help="save checkpoints/last.pt every N iterations (and at every epoch end; 0 = only "
        "at epoch ends)")
    add(g, "--sample-every", type=int, default=500,
        help="write a sample grid every N iterations (0 = only at the end)")
    add(g, "--eval-every", type=int, default=1,
        help="evaluate on the validation split every N epochs")
    add(g, "--no-progress", action="store_true", default=False, help="hide the progress bar")


def _add_guard_flags(add: Any, g: Any) -> None:
    add(g, "--max-recoveries", type=int, default=5,
        help="stop with an error after this many recoveries from divergence")
    add(g, "--divergence-threshold", type=finite_float, default=1e6,
        help="treat |loss| or |energy_data - energy_sample| above this as divergence")
    add(g, "--recover-lr-factor", type=finite_float, default=0.5,
        help="multiply the learning rate by this after each recovery")


def _add_distributed_flags(add: Any, g: Any) -> None:
    add(g, "--dist-timeout", type=finite_float, default=600.0,
        help="seconds a process waits for the others at a collective before the job stops "
        "with an error (a process died or hangs)")


def default_config() -> dict[str, Any]:
    """The full default config (every flag's default), as a dict."""
    return vars(build_parser().parse_args([]))


@dataclass(frozen=True)
class Range:
    """Accepted values of a numeric key: ``lo <= v <= hi`` (``<`` where open)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def __str__(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts)


_POSITIVE, _NON_NEGATIVE = Range(1), Range(0)
_FRACTION = Range(0, 1)
# The accepted range of every numeric key. Upper bounds keep a run inside what one machine
# can hold (a replay buffer of more chains, a deeper MLP, more threads fail late and unclearly).
RANGES: dict[str, Range] = {
    "batch_size": _POSITIVE, "epochs": _POSITIVE, "log_every": _POSITIVE,
    "eval_every": _POSITIVE, "labels_per_class": _POSITIVE, "width": _POSITIVE,
    "depth": Range(1, 1000), "sgld_steps": Range(0, 10**6), "buffer_size": Range(0, 10**7),
    "threads": Range(0, 1024), "seed": Range(0, 2**62), "warmup_iters": _NON_NEGATIVE,
    "ckpt_every": _NON_NEGATIVE, "sample_every": _NON_NEGATIVE,
    "max_recoveries": _NON_NEGATIVE, "decay_epochs": _NON_NEGATIVE,
    "lr": Range(0, lo_open=True), "dropout": Range(0, 1, hi_open=True),
    "w_px": _NON_NEGATIVE, "w_pyx": _NON_NEGATIVE, "l2_energy": _NON_NEGATIVE,
    "sgld_step_size": _NON_NEGATIVE, "sgld_noise": _NON_NEGATIVE, "reinit_prob": _FRACTION,
    "grad_clip": Range(0, lo_open=True), "decay_rate": Range(0, lo_open=True),
    "weight_decay": _NON_NEGATIVE, "divergence_threshold": Range(0, lo_open=True),
    "recover_lr_factor": Range(0, 1, lo_open=True), "dist_timeout": Range(0, lo_open=True),
}


def _actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in build_parser()._actions if a.dest != "help"}


def flag_of(key: str) -> str:
    """The command-line flag of a config key (``batch_size`` -> ``--batch-size``)."""
    action = _actions().get(key)
    return action.option_strings[0] if action is not None else key


def _type_error(action: argparse.Action, value: Any) -> str | None:
    """Why ``value`` is not of the flag's type, or None when it is."""
    if value is None:
        return None if action.default is None else "expected a value, got null"
    if action.choices is not None:
        ok = value in action.choices or (action.dest == "norm" and value is None)
        return None if ok else f"expected one of {', '.join(action.choices)}, got {value!r}"
    if isinstance(action, argparse._StoreTrueAction):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if action.type is _int_list:
        ok = isinstance(value, list) and all(_is_int(v) for v in value)
        return None if ok else f"expected a list of integers, got {value!r}"
    if action.type is int:
        return None if _is_int(value) else f"expected an integer, got {value!r}"
    if action.type is finite_float:
        if not (_is_int(value) or isinstance(value, float)):
            return f"expected a number, got {value!r}"
        return None if math.isfinite(value) else f"expected a finite number, got {value!r}"
    return None if isinstance(value, str) else f"expected a string, got {value!r}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _range_error(key: str, value: Any) -> str | None:
    rng = RANGES.get(key)
    if rng is None or value is None:
        return None
    for v in value if isinstance(value, list) else [value]:
        if not rng.contains(v):
            return f"expected {'values ' if isinstance(value, list) else 'a value '}{rng}, " \
                   f"got {value!r}"
    return None


def validate(cfg: dict[str, Any], where: dict[str, str] | None = None) -> None:
    """Check every config value against its flag's type and range, and their combinations.

    Args:
        cfg: the config.
        where: how to name each key in messages (e.g. ``--epochs`` for a flag the user typed,
            ``config file F: key 'epochs'`` for a value read from a file); default: the key.

    Raises:
        ConfigError: one clear message naming the first bad value.
    """
    where = where or {}
    actions = _actions()
    for key, action in actions.items():
        if key not in cfg:
            raise ConfigError(f"{key}: missing from the config")
        problem = _type_error(action, cfg[key]) or _range_error(key, cfg[key])
        if problem is not None:
            raise ConfigError(f"{where.get(key, key)}: {problem}")
    _validate_combinations(cfg, lambda k: where.get(k, k))


def _validate_combinations(cfg: dict[str, Any], name: Any) -> None:
    if cfg["objective"] != "ce" and cfg["sgld_steps"] < 1:
        raise ConfigError(f"{name('sgld_steps')}: expected >= 1 for the jem and factored "
                          "objectives")
    if cfg["dataset"] in TOY_DATASETS and cfg["model"] != "mlp":
        raise ConfigError(f"{name('model')}: {cfg['model']} needs images; the 2-D set "
                          f"{cfg['dataset']} needs --model mlp")
    if cfg["data_root"] is not None and cfg["dataset"] not in FILE_DATASETS:
        raise ConfigError(f"{name('data_root')}: the {cfg['dataset']} dataset reads no files "
                          f"(only {', '.join(FILE_DATASETS)} do); leave it out")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{name('device')}: cuda requested but no CUDA device is available")


def config_from_args(argv: list[str] | None) -> dict[str, Any]:
    """Build the run config from command-line arguments (see :func:`parse_command_line`)."""
    return parse_command_line(argv).cfg


@dataclass
class Invocation:
    """A parsed command line: the config, and the keys the command line set explicitly."""

    cfg: dict[str, Any]
    explicit: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        """The experiment keys set on the command line (what a resume changes)."""
        return {k: v for k, v in self.explicit.items() if k not in INVOCATION_KEYS}


def parse_command_line(argv: list[str] | None) -> Invocation:
    """Parse flags and merge ``--config`` (or the resumed run's ``config.json``) under them.

    Order of precedence: flags given explicitly > config file > defaults.

    Raises:
        ConfigError: bad flags, an unreadable or malformed config file, or invalid values.
    """
    args = build_parser().parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    where = {k: flag_of(k) for k in explicit}
    if args.resume is not None:
        _check_resume_flags(args, explicit)
        base_file: Path | None = Path(args.resume) / "config.json"
    else:
        base_file = None if args.config is None else Path(args.config)
    cfg = vars(args)
    if base_file is not None:
        loaded = read_config_file(base_file)
        cfg = default_config()
        cfg.update({k: v for k, v in loaded.items() if k not in INVOCATION_KEYS})
        cfg.update(explicit)
        cfg["resume"], cfg["config"] = args.resume, args.config
        if args.resume is not None:
            cfg["out"] = str(Path(args.resume))
        for key in loaded:
            where.setdefault(key, f"config file {base_file}: key {key!r}")
    validate(cfg, where)
    return Invocation(cfg, explicit)


def _check_resume_flags(args: argparse.Namespace, explicit: dict[str, Any]) -> None:
    """``--resume`` continues a run in its own folder with its own config."""
    run = Path(args.resume)
    if not run.is_dir():
        raise ConfigError(f"--resume {args.resume}: no such run folder")
    if "out" in explicit and Path(args.out).resolve() != run.resolve():
        raise ConfigError("--out: cannot be combined with --resume (a resumed run continues "
                          "in its own folder)")
    if "config" in explicit:
        raise ConfigError("--config: cannot be combined with --resume (a resumed run "
                          "continues with its own config.json; give flags to override it)")


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a ``config.json``: a JSON object of known keys (values are checked by validate)."""
    if path.is_dir():
        raise ConfigError(f"config file {path}: is a directory (expected a config.json file)")
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    try:
        with path.open(encoding="utf-8") as f:
            loaded = json.load(f, parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"config file {path}: not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {path}: expected a JSON object, got {type(loaded).__name__}"
        )
    loaded = {k: v for k, v in loaded.items() if k not in RETIRED_KEYS + LAUNCH_KEYS}
    unknown = sorted(set(loaded) - set(default_config()))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown keys {unknown} (expected a jem_ext.train config.json)"
        )
    return loaded


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")
