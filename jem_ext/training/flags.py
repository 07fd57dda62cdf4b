"""The trainer's command-line flags: one parser, grouped as ``--help`` shows them.

Choices come from the modules that implement them (datasets from :mod:`jem_ext.data`, models
and norms from :mod:`jem_ext.models`, objectives from :mod:`jem_ext.objectives`, chain
initialisations from :mod:`jem_ext.replay`, optimisers from :mod:`jem_ext.training.setup`).
A parse error raises :class:`ConfigError` (one line, exit status 2 at the command line).
"""

from __future__ import annotations

import argparse
from typing import Any

from .._cli import DefaultsHelpFormatter, RaisingParser, finite_float
from ..accel import add_speed_flags
from ..data import DATASET_REGISTRY, file_datasets
from ..factory import FactoryError, is_factory
from ..factory import parse as parse_factory
from ..models import MODELS, NORMS
from ..objectives import OBJECTIVES
from ..recipes import RECIPES
from ..replay import INITS
from .setup import OPTIMIZERS

DEVICES = ("auto", "cpu", "cuda")
NORM_CHOICES = tuple("none" if n is None else n for n in NORMS)


class ConfigError(ValueError):
    """A config value or config file is invalid."""


class _Parser(RaisingParser):
    """An argument parser whose errors are a :class:`ConfigError` (one line, exit status 2)."""

    error_type = ConfigError


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None


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
        formatter_class=DefaultsHelpFormatter,
    )
    group = p.add_argument_group

    def add(g: Any, *names: str, **kw: Any) -> None:
        if suppress_defaults:
            kw.pop("default", None)
        g.add_argument(*names, **kw)

    _add_recipe_flags(add, group("recipe"))
    _add_data_flags(add, group("data"))
    _add_model_flags(add, group("model"))
    _add_objective_flags(add, group("objective"))
    _add_sampler_flags(add, group("sampler (SGLD)"))
    _add_optimisation_flags(add, group("optimisation"))
    _add_run_folder_flags(add, group("run folder"))
    _add_budget_flags(add, group("budget"))
    _add_guard_flags(add, group("divergence guard"))
    add_speed_flags(group("speed"), add)
    _add_distributed_flags(add, group("distributed (under torchrun)"))
    return p


def _add_recipe_flags(add: Any, g: Any) -> None:
    add(
        g,
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="set every flag of a published recipe at once: jem (JEM, 2020), jempp (JEM++, "
        "2021), sadajem (SADA-JEM, 2023); flags given explicitly override it. The values, "
        "their sources and what to scale down for a small model: the table in "
        "python -c 'import jem_ext.recipes; help(jem_ext.recipes)'",
    )


def _add_data_flags(add: Any, g: Any) -> None:
    add(
        g,
        "--dataset",
        "--data",
        dest="dataset",
        choices=tuple(DATASET_REGISTRY),
        default="digits",
        help=f"dataset to train on ({'/'.join(file_datasets())} need --data-root)",
    )
    add(
        g,
        "--data-root",
        default=None,
        help="folder holding the dataset files (CIFAR, SVHN, image folder)",
    )
    add(
        g,
        "--labels-per-class",
        type=int,
        default=None,
        help="semi-supervised: keep only this many labels per class for the CE term "
        "(default: all labels)",
    )
    add(
        g,
        "--no-augment",
        action="store_true",
        default=False,
        help="disable the dataset's default augmentation (crop/flip/Gaussian noise)",
    )
    add(
        g,
        "--input-noise",
        type=finite_float,
        default=None,
        help="standard deviation of the Gaussian noise the augmentation adds to training "
        "inputs (default: the dataset's preset, 0.03 for images)",
    )
    add(
        g,
        "--no-px-augment",
        dest="px_augment",
        action="store_false",
        default=True,
        help="the p(x) term's data energies use the batch before augmentation (SADA-JEM); "
        "the cross-entropy term still uses the augmented batch (default: both augmented)",
    )


def model_name(text: str) -> str:
    """A ``--model`` value: a registered architecture, or a factory ``PACKAGE.MODULE:FACTORY``
    (its syntax only: it is imported when the model is built)."""
    if text in MODELS:
        return text
    if is_factory(text):
        try:
            parse_factory(text)
        except FactoryError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(MODELS)} or PACKAGE.MODULE:FACTORY, got {text!r}"
    )


def _add_model_flags(add: Any, g: Any) -> None:
    add(
        g,
        "--model",
        type=model_name,
        default="small_cnn",
        metavar="{" + ",".join([*MODELS, "PACKAGE.MODULE:FACTORY"]) + "}",
        help="network architecture, or your own model: an importable callable, called with the "
        "number of classes and the input shape, returning an nn.Module that gives logits "
        "[B, C] (resuming or evaluating its run names it again)",
    )
    add(
        g,
        "--depth",
        type=int,
        default=None,
        help="depth: WRN total depth (6n+4, default 28) or MLP hidden layers (default 3)",
    )
    add(
        g,
        "--width",
        type=int,
        default=None,
        help="width: WRN widen factor (default 10), SmallCNN first-layer channels (default "
        "32) or MLP hidden units (default 128)",
    )
    add(
        g,
        "--norm",
        choices=NORM_CHOICES,
        default="none",
        help="normalisation layers of WRN/SmallCNN (JEM uses none)",
    )
    add(g, "--dropout", type=finite_float, default=0.0, help="dropout rate (WRN/SmallCNN)")


def _add_objective_flags(add: Any, g: Any) -> None:
    add(
        g,
        "--objective",
        choices=OBJECTIVES,
        default="jem",
        help="jem: log p(x) + log p(y|x); factored: log p(y) + log p(x|y) (class-conditional "
        "sampling); ce: cross-entropy only (the classifier twin)",
    )
    add(
        g, "--w-px", type=finite_float, default=1.0, help="weight of the generative (log p(x)) term"
    )
    add(
        g,
        "--w-px-decay-epochs",
        type=int_list,
        default=[30],
        help='epochs at which the p(x) weight is multiplied by --w-px-decay-rate ("" for '
        "none): once the classifier is trained the cross-entropy term leads, which keeps JEM "
        "calibrated while the chains still track the model",
    )
    add(
        g,
        "--w-px-decay-rate",
        type=finite_float,
        default=0.1,
        help="factor applied to --w-px at each of --w-px-decay-epochs",
    )
    add(g, "--w-pyx", type=finite_float, default=1.0, help="weight of the cross-entropy term")
    add(
        g,
        "--l2-energy",
        type=finite_float,
        default=0.01,
        help="weight of an L2 penalty on the energies of data and samples (divergence "
        "insurance; 0 disables)",
    )


def _add_sampler_flags(add: Any, g: Any) -> None:
    add(g, "--sgld-steps", type=int, default=20, help="SGLD steps per training iteration")
    add(g, "--sgld-step-size", type=finite_float, default=1.0, help="SGLD step on dE/dx")
    add(g, "--sgld-noise", type=finite_float, default=0.01, help="SGLD noise standard deviation")
    add(
        g,
        "--buffer-size",
        type=int,
        default=10000,
        help="persistent replay buffer size; 0 = short-run chains from the init each time",
    )
    add(
        g,
        "--reinit-prob",
        type=finite_float,
        default=0.05,
        help="fraction of buffer chains re-initialised at each draw",
    )
    add(
        g,
        "--init",
        choices=INITS,
        default="uniform",
        help="chain initialisation: uniform on [-1,1], or per-class Gaussians fitted to the "
        "training data (JEM++ informative init)",
    )
    add(
        g,
        "--proximal",
        action="store_true",
        default=False,
        help="proximal SGLD (JEM++): clip the gradient element-wise to --grad-clip "
        "(0.03 when not given) and clamp samples to [-1, 1]",
    )
    add(
        g,
        "--grad-clip",
        type=finite_float,
        default=None,
        help="clip dE/dx element-wise to [-c, c] in each SGLD step (default: no clipping)",
    )


def _add_optimisation_flags(add: Any, g: Any) -> None:
    add(g, "--optimizer", choices=OPTIMIZERS, default="adam", help="optimiser")
    add(g, "--lr", type=finite_float, default=3e-3, help="peak learning rate")
    add(
        g,
        "--adam-beta2",
        type=finite_float,
        default=0.99,
        help="Adam's second-moment decay (JEM's is 0.999). 0.99 forgets gradient scales within "
        "about 100 iterations, so the cross-entropy's step recovers soon after "
        "--w-px-decay-epochs lowers the p(x) term's large gradients",
    )
    add(g, "--warmup-iters", type=int, default=200, help="linear learning-rate warm-up iterations")
    add(
        g,
        "--decay-epochs",
        type=int_list,
        default=[40, 50],
        help="epochs at which the learning rate is multiplied by --decay-rate (e.g. 160,180)",
    )
    add(g, "--decay-rate", type=finite_float, default=0.3, help="learning-rate decay factor")
    add(g, "--weight-decay", type=finite_float, default=0.0, help="weight decay")
    add(
        g,
        "--sam-rho",
        type=finite_float,
        default=0.0,
        help="sharpness-aware minimisation (SAM) around the optimiser with this "
        "neighbourhood radius: two gradients per update, the second at the ascent point on "
        "the same batch and samples (0 = off)",
    )
    add(
        g,
        "--sam-adaptive",
        action="store_true",
        default=False,
        help="adaptive SAM (ASAM): the neighbourhood scales with each weight (SADA-JEM)",
    )
    add(
        g,
        "--batch-size",
        type=int,
        default=64,
        help="mini-batch size; under torchrun the global batch, split evenly over the "
        "processes (a multiple of their number; learning rate not scaled)",
    )
    add(g, "--epochs", type=int, default=60, help="training epochs")
    add(g, "--seed", type=int, default=1, help="random seed (model init, data order, sampler)")
    add(g, "--device", choices=DEVICES, default="auto", help="device; auto = cuda when available")
    add(
        g,
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (0 = torch's default). Part of the experiment: results "
        "can differ with the thread count (the order of floating-point sums changes), so "
        "--resume and --config keep the run's value. 1 is the default because small models "
        "gain little from more, and on a shared machine extra OpenMP threads can make each "
        "iteration tens of times slower",
    )


def _add_run_folder_flags(add: Any, g: Any) -> None:
    add(
        g,
        "--out",
        default=None,
        help="run folder to create (default: a fresh runs/<timestamp>-<dataset>-<objective>)",
    )
    add(
        g,
        "--config",
        default=None,
        help="repeat a run from its config.json; flags given explicitly override it",
    )
    add(
        g,
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run from RUN_DIR/checkpoints/last.pt (flags given "
        "explicitly, e.g. --epochs, override its config)",
    )
    add(g, "--log-every", type=int, default=10, help="write a metrics row every N iterations")
    add(
        g,
        "--ckpt-every",
        type=int,
        default=100,
        help="save checkpoints/last.pt every N iterations (and at every epoch end; 0 = only "
        "at epoch ends)",
    )
    add(
        g,
        "--sample-every",
        type=int,
        default=500,
        help="write a sample grid every N iterations (0 = only at the end)",
    )
    add(
        g,
        "--eval-every",
        type=int,
        default=1,
        help="evaluate on the validation split every N epochs",
    )
    add(g, "--no-progress", action="store_true", default=False, help="hide the progress bar")
    add(
        g,
        "--tensorboard",
        action="store_true",
        default=False,
        help="also write TensorBoard event files into RUN/tensorboard (scalars, learning rate, "
        "p(x) weight, sample grids, energy histograms); needs the tensorboard package "
        "(pip install 'jem_ext[tensorboard]')",
    )


def _add_budget_flags(add: Any, g: Any) -> None:
    add(
        g,
        "--max-minutes",
        type=finite_float,
        default=None,
        help="stop cleanly after this many minutes of training (over every resume), with a "
        "final checkpoint, samples and a summary whose status is 'budget'; --resume with a "
        "larger budget continues (default: no limit)",
    )
    add(
        g,
        "--max-iters",
        type=int,
        default=None,
        help="stop cleanly after this many iterations in all, like --max-minutes "
        "(default: no limit)",
    )


def _add_guard_flags(add: Any, g: Any) -> None:
    add(
        g,
        "--max-recoveries",
        type=int,
        default=5,
        help="stop with an error after this many recoveries from divergence",
    )
    add(
        g,
        "--divergence-threshold",
        type=finite_float,
        default=1e6,
        help="treat |loss| or |energy_data - energy_sample| above this as divergence",
    )
    add(
        g,
        "--recover-lr-factor",
        type=finite_float,
        default=0.5,
        help="multiply the learning rate by this after each recovery",
    )


def _add_distributed_flags(add: Any, g: Any) -> None:
    add(
        g,
        "--dist-timeout",
        type=finite_float,
        default=600.0,
        help="seconds a process waits for the others at a collective before the job stops "
        "with an error (a process died or hangs)",
    )


def default_config() -> dict[str, Any]:
    """The full default config (every flag's default), as a dict."""
    return vars(build_parser().parse_args([]))
