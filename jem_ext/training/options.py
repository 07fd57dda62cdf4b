"""Every trainer setting, once: the groups of :class:`~jem_ext.training.runconfig.RunConfig`.

Each field is a :func:`jem_ext.settings.setting`: name (``dest``, the key of config.json),
type, default, range or choices, help text and ``--help`` section. The command line, config
files, validation and recipes all read these classes (see :mod:`.runconfig`). A new setting is
one field here, in its group; a new group is one class here and one field of ``RunConfig``.

Choices come from the modules that implement them (datasets from :mod:`jem_ext.data`, models
and norms from :mod:`jem_ext.models`, objectives from :mod:`jem_ext.objectives`, chain
initialisations from :mod:`jem_ext.replay`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import chain
from ..chain import ChainSpec
from ..data import DATASET_REGISTRY, file_datasets
from ..factory import is_factory
from ..factory import name_problem as factory_name_problem
from ..models import MODELS, NORMS
from ..objectives import OBJECTIVES
from ..recipes import RECIPES
from ..replay import INITS
from ..settings import (
    FRACTION,
    GREATER_THAN_ZERO,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    setting,
)

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adam", "sgd")
NORM_CHOICES = tuple("none" if n is None else n for n in NORMS)


@dataclass(frozen=True)
class RecipeOptions:
    """A published recipe written over the defaults (:mod:`jem_ext.recipes`)."""

    GROUP = "recipe"
    name: str | None = setting(
        None,
        "set every flag of a published recipe at once: jem (JEM, 2020), jempp (JEM++, "
        "2021), sadajem (SADA-JEM, 2023); flags given explicitly override it. The values, "
        "their sources and what to scale down for a small model: the table in "
        "python -c 'import jem_ext.recipes; help(jem_ext.recipes)'",
        kind="str",
        dest="recipe",
        choices=lambda: tuple(RECIPES),
    )


@dataclass(frozen=True)
class DataOptions:
    """The data set, its files and how batches are augmented."""

    GROUP = "data"
    dataset: str = setting(
        "digits",
        lambda: f"dataset to train on ({'/'.join(file_datasets())} need --data-root)",
        kind="str",
        flags=("--dataset", "--data"),
        choices=lambda: tuple(DATASET_REGISTRY),
    )
    data_root: str | None = setting(
        None,
        "folder holding the dataset files (CIFAR, SVHN, image folder)",
        kind="str",
        path=True,
    )
    labels_per_class: int | None = setting(
        None,
        "semi-supervised: keep only this many labels per class for the CE term "
        "(default: all labels)",
        kind="int",
        range=POSITIVE,
    )
    no_augment: bool = setting(
        False, "disable the dataset's default augmentation (crop/flip/Gaussian noise)"
    )
    input_noise: float | None = setting(
        None,
        "standard deviation of the Gaussian noise the augmentation adds to training "
        "inputs (default: the dataset's preset, 0.03 for images)",
        kind="float",
        range=NON_NEGATIVE,
    )
    px_augment: bool = setting(
        True,
        "the p(x) term's data energies use the batch before augmentation (SADA-JEM); "
        "the cross-entropy term still uses the augmented batch (default: both augmented)",
        flags=("--no-px-augment",),
        negated=True,
    )


def model_problem(name: str) -> str | None:
    """Why ``name`` is not a ``--model``: a registered architecture, or a factory
    ``PACKAGE.MODULE:FACTORY`` (its form only: it is imported when the model is built)."""
    if name in MODELS:
        return None
    if is_factory(name):
        return factory_name_problem(name)
    return f"expected one of {', '.join(MODELS)} or PACKAGE.MODULE:FACTORY, got {name!r}"


@dataclass(frozen=True)
class ModelOptions:
    """The network (a registered name of :data:`jem_ext.models.MODELS`, or a user's factory
    ``PACKAGE.MODULE:FACTORY``, see :mod:`jem_ext.factory`) and the built-in models' size."""

    GROUP = "model"
    name: str = setting(
        "small_cnn",
        "network architecture, or your own model: an importable callable, called with the "
        "number of classes and the input shape, returning an nn.Module that gives logits "
        "[B, C] (resuming or evaluating its run names it again)",
        kind="str",
        dest="model",
        metavar="{" + ",".join([*MODELS, "PACKAGE.MODULE:FACTORY"]) + "}",
        check=model_problem,
    )
    depth: int | None = setting(
        None,
        "depth: WRN total depth (6n+4, default 28) or MLP hidden layers (default 3)",
        kind="int",
        range=Range(1, 1000),
    )
    width: int | None = setting(
        None,
        "width: WRN widen factor (default 10), SmallCNN first-layer channels (default "
        "32) or MLP hidden units (default 128)",
        kind="int",
        range=Range(1, 2**16),
    )
    norm: str = setting(
        "none",
        "normalisation layers of WRN/SmallCNN (JEM uses none)",
        kind="str",
        choices=NORM_CHOICES,
    )
    dropout: float = setting(0.0, "dropout rate (WRN/SmallCNN)", range=Range(0, 1, hi_open=True))


@dataclass(frozen=True)
class ObjectiveOptions:
    """The objective, the weights of its terms and the p(x) weight's schedule."""

    GROUP = "objective"
    name: str = setting(
        "jem",
        "jem: log p(x) + log p(y|x); factored: log p(y) + log p(x|y) (class-conditional "
        "sampling); ce: cross-entropy only (the classifier twin)",
        kind="str",
        dest="objective",
        choices=OBJECTIVES,
    )
    w_px: float = setting(1.0, "weight of the generative (log p(x)) term", range=NON_NEGATIVE)
    w_px_decay_epochs: tuple[int, ...] = setting(
        [30],
        'epochs at which the p(x) weight is multiplied by --w-px-decay-rate ("" for '
        "none): once the classifier is trained the cross-entropy term leads, which keeps JEM "
        "calibrated while the chains still track the model",
        range=NON_NEGATIVE,
    )
    w_px_decay_rate: float = setting(
        0.1, "factor applied to --w-px at each of --w-px-decay-epochs", range=NON_NEGATIVE
    )
    w_pyx: float = setting(1.0, "weight of the cross-entropy term", range=NON_NEGATIVE)
    l2_energy: float = setting(
        0.01,
        "weight of an L2 penalty on the energies of data and samples (divergence "
        "insurance; 0 disables)",
        range=NON_NEGATIVE,
    )


@dataclass(frozen=True)
class ChainOptions:
    """The training chains (JEM's defaults, :mod:`jem_ext.chain`'s), their replay buffer and
    initialisation."""

    GROUP = "sampler (SGLD)"
    steps: int = setting(
        chain.DEFAULT_N_STEPS,
        "SGLD steps per training iteration",
        dest="sgld_steps",
        range=Range(0, 10**6),
    )
    step_size: float = setting(
        chain.DEFAULT_STEP_SIZE, "SGLD step on dE/dx", dest="sgld_step_size", range=NON_NEGATIVE
    )
    noise: float = setting(
        chain.DEFAULT_NOISE_STD,
        "SGLD noise standard deviation",
        dest="sgld_noise",
        range=NON_NEGATIVE,
    )
    buffer_size: int = setting(
        chain.DEFAULT_BUFFER_SIZE,
        "persistent replay buffer size; 0 = short-run chains from the init each time",
        range=Range(0, 10**7),
    )
    reinit_prob: float = setting(
        chain.DEFAULT_REINIT_PROB,
        "fraction of buffer chains re-initialised at each draw",
        range=FRACTION,
    )
    init: str = setting(
        "uniform",
        "chain initialisation: uniform on [-1,1], or per-class Gaussians fitted to the "
        "training data (JEM++ informative init)",
        kind="str",
        choices=INITS,
    )
    init_noise_frac: float = setting(
        0.0,
        "with --init gaussian: probability that a new chain starts from uniform noise "
        "instead, so that the model also sees noise as a negative (chains near the data alone "
        "can leave noise rated likelier than images)",
        range=FRACTION,
    )
    proximal: bool = setting(
        False,
        "proximal SGLD (JEM++): clip the gradient element-wise to --grad-clip "
        f"({chain.PROXIMAL_GRAD_CLIP:g} when not given) and clamp samples to "
        f"[{chain.DEFAULT_CLAMP[0]:g}, {chain.DEFAULT_CLAMP[1]:g}]",
    )
    grad_clip: float | None = setting(
        None,
        "clip dE/dx element-wise to [-c, c] in each SGLD step (default: no clipping)",
        kind="float",
        range=GREATER_THAN_ZERO,
    )

    def spec(self) -> ChainSpec:
        """The chain these options describe (proximal SGLD resolved to its clamp and clip)."""
        return ChainSpec.of(self.steps, self.step_size, self.noise, self.proximal, self.grad_clip)


@dataclass(frozen=True)
class OptimOptions:
    """The optimiser, its schedule, the batch, the length, the seed and the device."""

    GROUP = "optimisation"
    optimizer: str = setting("adam", "optimiser", kind="str", choices=OPTIMIZERS)
    lr: float = setting(3e-3, "peak learning rate", range=GREATER_THAN_ZERO)
    adam_beta2: float = setting(
        0.99,
        "Adam's second-moment decay (JEM's is 0.999). 0.99 forgets gradient scales within "
        "about 100 iterations, so the cross-entropy's step recovers soon after "
        "--w-px-decay-epochs lowers the p(x) term's large gradients",
        range=Range(0, 1, hi_open=True),
    )
    warmup_iters: int = setting(200, "linear learning-rate warm-up iterations", range=NON_NEGATIVE)
    decay_epochs: tuple[int, ...] = setting(
        [40, 50],
        "epochs at which the learning rate is multiplied by --decay-rate (e.g. 160,180)",
        range=NON_NEGATIVE,
    )
    decay_rate: float = setting(0.3, "learning-rate decay factor", range=GREATER_THAN_ZERO)
    weight_decay: float = setting(0.0, "weight decay", range=NON_NEGATIVE)
    sam_rho: float = setting(
        0.0,
        "sharpness-aware minimisation (SAM) around the optimiser with this "
        "neighbourhood radius: two gradients per update, the second at the ascent point on "
        "the same batch and samples (0 = off)",
        range=NON_NEGATIVE,
    )
    sam_adaptive: bool = setting(
        False, "adaptive SAM (ASAM): the neighbourhood scales with each weight (SADA-JEM)"
    )
    batch_size: int = setting(
        64,
        "mini-batch size; under torchrun the global batch, split evenly over the "
        "processes (a multiple of their number; learning rate not scaled)",
        range=POSITIVE,
    )
    epochs: int = setting(60, "training epochs", range=POSITIVE)
    seed: int = setting(1, "random seed (model init, data order, sampler)", range=Range(0, 2**62))
    device: str = setting("auto", "device; auto = cuda when available", kind="str", choices=DEVICES)
    threads: int = setting(
        1,
        "CPU threads for torch (0 = torch's default). Part of the experiment: results "
        "can differ with the thread count (the order of floating-point sums changes), so "
        "--resume and --config keep the run's value. 1 is the default because small models "
        "gain little from more, and on a shared machine extra OpenMP threads can make each "
        "iteration tens of times slower",
        range=Range(0, 1024),
    )


@dataclass(frozen=True)
class FolderOptions:
    """The run folder (where, from which config or run) and what is written when."""

    GROUP = "run folder"
    out: str | None = setting(
        None,
        "run folder to create (default: a fresh runs/<timestamp>-<dataset>-<objective>)",
        kind="str",
        path=True,
    )
    config: str | None = setting(
        None,
        "repeat a run from its config.json; flags given explicitly override it",
        kind="str",
        path=True,
    )
    resume: str | None = setting(
        None,
        "continue an interrupted run from RUN_DIR/checkpoints/last.pt (flags given "
        "explicitly, e.g. --epochs, override its config)",
        kind="str",
        metavar="RUN_DIR",
        path=True,
    )
    log_every: int = setting(10, "write a metrics row every N iterations", range=POSITIVE)
    ckpt_every: int = setting(
        100,
        "save checkpoints/last.pt every N iterations (and at every epoch end; 0 = only "
        "at epoch ends)",
        range=NON_NEGATIVE,
    )
    sample_every: int = setting(
        500,
        "write a sample grid every N iterations (0 = only at the end)",
        range=NON_NEGATIVE,
    )
    eval_every: int = setting(1, "evaluate on the validation split every N epochs", range=POSITIVE)
    no_progress: bool = setting(False, "hide the progress bar")
    tensorboard: bool = setting(
        False,
        "also write TensorBoard event files into RUN/tensorboard (scalars, learning rate, "
        "p(x) weight, sample grids, energy histograms); needs the tensorboard package "
        "(pip install 'jem_ext[tensorboard]')",
    )


@dataclass(frozen=True)
class BudgetOptions:
    """When a run stops early, cleanly."""

    GROUP = "budget"
    max_minutes: float | None = setting(
        None,
        "stop cleanly after this many minutes of training (over every resume), with a "
        "final checkpoint, samples and a summary whose status is 'budget'; --resume with a "
        "larger budget continues (default: no limit)",
        kind="float",
        range=GREATER_THAN_ZERO,
    )
    max_iters: int | None = setting(
        None,
        "stop cleanly after this many iterations in all, like --max-minutes (default: no limit)",
        kind="int",
        range=POSITIVE,
    )


@dataclass(frozen=True)
class GuardOptions:
    """The divergence guard: its threshold, its recoveries and their learning rate."""

    GROUP = "divergence guard"
    max_recoveries: int = setting(
        5, "stop with an error after this many recoveries from divergence", range=NON_NEGATIVE
    )
    divergence_threshold: float = setting(
        1e6,
        "treat |loss| or |energy_data - energy_sample| above this as divergence",
        range=GREATER_THAN_ZERO,
    )
    recover_lr_factor: float = setting(
        0.5,
        "multiply the learning rate by this after each recovery",
        range=Range(0, 1, lo_open=True),
    )


@dataclass(frozen=True)
class DistOptions:
    """A job of several processes under torchrun."""

    GROUP = "distributed (under torchrun)"
    timeout: float = setting(
        600.0,
        "seconds a process waits for the others at a collective before the job stops "
        "with an error (a process died or hangs)",
        dest="dist_timeout",
        range=GREATER_THAN_ZERO,
    )
