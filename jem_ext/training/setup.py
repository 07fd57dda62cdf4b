"""Setting a run up: data, model, optimiser, sampler and generators, gathered in a :class:`Run`.

:func:`build_run` is deterministic in the config's seed: the same config builds the same
initial weights, replay buffer and random generators. Each builder takes the groups of the
:class:`~.runconfig.RunConfig` it reads.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import data as jdata
from ..accel import (
    SpeedOptions,
    autocast_factory,
    batch_independent,
    compile_model,
    configure_sampler,
    is_convolutional,
    make_scaler,
    use_channels_last,
)
from ..factory import is_factory
from ..models import build_model, model_entry
from ..objectives import Objective
from ..sam import SAM
from ..sampler import (
    DEFAULT_CLAMP,
    GaussianInit,
    MixedInit,
    ReplayBuffer,
    SGLDSampler,
    UniformInit,
)
from . import distributed, shards
from .distributed import Dist
from .options import DataOptions, ModelOptions, OptimOptions
from .runconfig import RunConfig
from .state import RunState
from .step import SharpnessAwareContext, StepContext


@dataclass
class RunData:
    """The splits of a run, the training split on the run's device, and how batches are made.

    Attributes:
        labeled: bool mask of the training labels the CE term may use, on the run's device
            (None: all).
        augment: the dataset's augmentation, or None.
        device: the run's device (where the training split and the chains live).
        px_augment: the p(x) term uses the augmented batch too (else the batch before it).
    """

    train: jdata.ImageData
    val: jdata.ImageData
    test: jdata.ImageData
    train_on_device: jdata.ImageData
    labeled: Tensor | None
    augment: jdata.Augment | None
    device: torch.device
    px_augment: bool = True

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Iterations of one epoch (batches of ``batch_size`` shared by ``world_size``)."""
        return jdata.num_batches(len(self.train), batch_size, world_size=world_size)


@dataclass
class Run:
    """What a training run is: its config, model and optimiser (in ``ctx``), data, generators
    and progress; built by :func:`build_run`. What acts on it (the checkpoint saver, the
    divergence guard, the metrics log) belongs to the loop, which passes it explicitly."""

    cfg: RunConfig
    device: torch.device
    ctx: StepContext
    data: RunData
    objective: Objective
    generators: dict[str, torch.Generator]
    out: Path
    state: RunState = field(default_factory=RunState)
    started: float = field(default_factory=time.perf_counter)
    dist: Dist = distributed.SINGLE
    folder_id: tuple[int, int] | None = None  # the run folder's identity (rank 0, once open)

    @property
    def steps_per_epoch(self) -> int:
        return self.data.steps_per_epoch(self.cfg.optim.batch_size, self.dist.world_size)

    def elapsed(self) -> float:
        """Training seconds so far, over every resume."""
        return time.perf_counter() - self.started


def fresh_out(dataset: str, objective: str) -> str:
    """A new run folder name, ``<cwd>/runs/<timestamp>-<dataset>-<objective>[-k]`` (absolute, as
    every path a run records)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path.cwd() / "runs" / f"{stamp}-{dataset}-{objective}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return str(out)


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when a CUDA device is available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_kwargs(m: ModelOptions) -> dict[str, Any]:
    """The constructor arguments of the model (depth/width mapped to its names, as its
    :class:`~jem_ext.models.ModelEntry` says); none for a model factory."""
    if is_factory(m.name):
        return {}
    entry = model_entry(m.name)
    norm = None if m.norm in (None, "none") else m.norm
    kw: dict[str, Any] = {"norm": norm, "dropout": m.dropout} if entry.takes_norm else {}
    for value, name in ((m.depth, entry.depth_kwarg), (m.width, entry.width_kwarg)):
        if name is not None and value is not None:
            kw[name] = value
    return kw


def load_data(data: DataOptions, seed: int) -> dict[str, jdata.ImageData]:
    """Load the train/val/test splits the data options name (the split of some data sets
    depends on ``seed``), and check that the augmentation fits the images (raises
    DataError)."""
    datasets = {
        split: jdata.load_dataset(data.dataset, data.data_root, split, seed=seed)
        for split in jdata.SPLITS
    }
    augment = None if data.no_augment else jdata.default_augment(data.dataset)
    jdata.check_augment(augment, datasets["train"], data.data_root)
    return datasets


def sampler_seed(seed: int, reseeds: int = 0, rank: int = 0) -> int:
    """Seed of process ``rank``'s sampler generator, fresh after each recovery (``reseeds``)."""
    return shards.generator_seed(seed + 101 + 1000 * reseeds, rank)


def augment_seed(seed: int, rank: int = 0) -> int:
    """Seed of process ``rank``'s augmentation generator."""
    return shards.generator_seed(seed + 202, rank)


def make_sampler(
    cfg: RunConfig,
    train_data: jdata.ImageData,
    device: torch.device,
    generator: torch.Generator | None = None,
    dist: Dist = distributed.SINGLE,
) -> SGLDSampler | None:
    """Build the SGLD sampler described by the config, or None for CE; its replay buffer is
    this process's shard (the whole buffer for a single process)."""
    if not cfg.generative:
        return None
    chain, conditional = cfg.chain, cfg.conditional
    if chain.init == "gaussian":
        init = GaussianInit.fit(train_data.x, train_data.y, train_data.num_classes)
        if chain.init_noise_frac > 0:
            init = MixedInit(init, UniformInit(*DEFAULT_CLAMP), chain.init_noise_frac)
    else:
        init = UniformInit(*DEFAULT_CLAMP)
    buffer = None
    if chain.buffer_size > 0:
        classes = train_data.num_classes if conditional else 1
        buffer = ReplayBuffer(
            shards.buffer_shard_size(chain.buffer_size, classes, dist),
            train_data.shape,
            num_classes=train_data.num_classes if conditional else None,
            device=device,
            reinit_prob=chain.reinit_prob,
            init=init,
            generator=generator,
        )
    sampler = SGLDSampler(
        spec=chain.spec(),
        buffer=buffer,
        init=init,
        conditional=conditional,
        sample_shape=train_data.shape,
    )
    return configure_sampler(sampler, cfg.speed, device)


def optimizer_settings(opt: OptimOptions) -> dict[str, Any]:
    """The optimiser's hyperparameters, other than the scheduled lr."""
    settings: dict[str, Any] = {"weight_decay": opt.weight_decay}
    if opt.optimizer == "adam":
        settings["betas"] = (0.9, opt.adam_beta2)
    return settings


def make_optimizer(opt: OptimOptions, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam (betas 0.9 and ``adam_beta2``) or SGD with momentum 0.9; wrapped in
    :class:`~jem_ext.sam.SAM` when ``sam_rho > 0``."""
    if opt.optimizer == "adam":
        base: Any = torch.optim.Adam
        kwargs: dict[str, Any] = {}
    else:
        base, kwargs = torch.optim.SGD, {"momentum": 0.9}
    kwargs.update(lr=opt.lr, **optimizer_settings(opt))
    if opt.sam_rho > 0:
        return SAM(model.parameters(), base, rho=opt.sam_rho, adaptive=opt.sam_adaptive, **kwargs)
    return base(model.parameters(), **kwargs)


def apply_optimizer_settings(opt: OptimOptions, optimizer: torch.optim.Optimizer) -> None:
    """Write the hyperparameters over a loaded optimiser state (a resume's
    ``--weight-decay`` or ``--adam-beta2`` then takes effect)."""
    for group in optimizer.param_groups:
        group.update(optimizer_settings(opt))


def make_augment(data: DataOptions) -> jdata.Augment | None:
    """The dataset's augmentation with the given input noise, or None (``no_augment``)."""
    if data.no_augment:
        return None
    augment = jdata.default_augment(data.dataset)
    if data.input_noise is not None:
        augment = dataclasses.replace(augment, noise_sigma=data.input_noise)
    return augment


def apply_speed_options(ctx: StepContext, speed: SpeedOptions, device: torch.device) -> None:
    """Set the context's precision, layout and compilation from the speed options
    (``precision``, ``channels_last``, ``compile``; the sampler's own options are set where
    it is built, by :func:`jem_ext.accel.configure_sampler`)."""
    model = ctx.model_for_chain
    if speed.channels_last and is_convolutional(model):
        use_channels_last(model)
    if speed.compile:
        compile_model(model)
    ctx.autocast = autocast_factory(speed.precision, device)
    ctx.scaler = make_scaler(speed.precision, device)
    ctx.joint_forward = batch_independent(model)


def build_context(
    cfg: RunConfig,
    model: torch.nn.Module,
    train_data: jdata.ImageData,
    device: torch.device,
    generator: torch.Generator,
    dist: Dist = distributed.SINGLE,
) -> StepContext:
    """The :class:`StepContext` of a run: default precision; with several processes the loss
    goes through DistributedDataParallel and the chains through the module itself.

    This is where precision, CUDA-graph and distributed options set the context's fields;
    SAM (``sam_rho > 0``) takes the two-pass :class:`SharpnessAwareContext`.
    """
    context = SharpnessAwareContext if cfg.optim.sam_rho > 0 else StepContext
    ctx = context(
        model_for_chain=model,
        model_for_loss=model,
        optimizer=make_optimizer(cfg.optim, model),
        sampler=make_sampler(cfg, train_data, device, generator=generator, dist=dist),
        generator=generator,
    )
    apply_speed_options(ctx, cfg.speed, device)
    # Wrapped last: DDP registers the parameters in the layout the speed options gave them.
    ctx.model_for_loss = distributed.wrap(model, dist)
    return ctx


def build_run(cfg: RunConfig, datasets: dict[str, jdata.ImageData] | None = None) -> Run:
    """Build the run of a config (nothing is written to disk here).

    In a distributed job (see :mod:`.distributed` and :mod:`.shards`) this process builds its
    share: its device, its generators (seeded from the seed and its rank) and its replay-buffer
    shard.
    """
    dist = distributed.current()
    opt = cfg.optim
    device = distributed.local_device(resolve_device(opt.device), dist)
    if opt.threads > 0:
        torch.set_num_threads(opt.threads)
    if datasets is None:
        datasets = load_data(cfg.data, opt.seed)
    train_d = datasets["train"]
    distributed.check_config(cfg, dist.world_size, train_d.num_classes if cfg.conditional else 1)
    seed = opt.seed
    torch.manual_seed(seed)
    model = build_model(
        cfg.model.name, train_d.num_classes, train_d.shape, **model_kwargs(cfg.model)
    )
    model.to(device)
    if dist.rank > 0:  # dropout and other global-RNG draws differ between processes
        torch.manual_seed(shards.generator_seed(seed, dist.rank))
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    generators = {
        "sampler": torch.Generator(device=gen_device).manual_seed(
            sampler_seed(seed, rank=dist.rank)
        ),
        "augment": torch.Generator(device=gen_device).manual_seed(augment_seed(seed, dist.rank)),
    }
    ctx = build_context(cfg, model, train_d, device, generators["sampler"], dist)
    labeled = None
    if cfg.data.labels_per_class:
        labeled = jdata.labeled_mask(train_d.y, cfg.data.labels_per_class, seed=seed).to(device)
    data = RunData(
        train=train_d,
        val=datasets["val"],
        test=datasets["test"],
        train_on_device=jdata.ImageData(
            train_d.x.to(device),
            train_d.y.to(device),
            train_d.num_classes,
            train_d.name,
            train_d.classes,
        ),
        labeled=labeled,
        augment=make_augment(cfg.data),
        device=device,
        px_augment=cfg.data.px_augment,
    )
    o = cfg.objective
    return Run(
        cfg=cfg,
        device=device,
        ctx=ctx,
        data=data,
        objective=Objective(o.name, o.w_px, o.w_pyx, o.l2_energy),
        generators=generators,
        out=Path(cfg.folder.out),
        dist=dist,
    )
