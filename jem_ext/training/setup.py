"""Setting a run up: data, model, optimiser, sampler and generators, gathered in a :class:`Run`.

:func:`build_run` is deterministic in the config's seed: the same config builds the same
initial weights, replay buffer and random generators.
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
from ..sam import SAM
from ..sampler import GaussianInit, ReplayBuffer, SGLDSampler, UniformInit
from . import distributed
from .distributed import Dist
from .state import RunState
from .step import LossWeights, SharpnessAwareContext, StepContext

OPTIMIZERS = ("adam", "sgd")
PROXIMAL_GRAD_CLIP = 0.03  # JEM++'s element-wise clip of dE/dx when --proximal has no value
SAMPLE_RANGE = (-1.0, 1.0)  # data live in [-1, 1]; proximal SGLD clamps samples to it


@dataclass
class RunData:
    """The splits of a run, the training split on the run's device, and how batches are made.

    Attributes:
        labeled: bool mask of the training labels the CE term may use, on the run's device
            (None: all).
        augment: the dataset's augmentation, or None.
        px_augment: the p(x) term uses the augmented batch too (else the batch before it).
    """

    train: jdata.ImageData
    val: jdata.ImageData
    test: jdata.ImageData
    train_on_device: jdata.ImageData
    labeled: Tensor | None
    augment: jdata.Augment | None
    px_augment: bool = True


@dataclass
class Run:
    """What a training run is: its config, model and optimiser (in ``ctx``), data, generators
    and progress; built by :func:`build_run`. What acts on it (the checkpoint saver, the
    divergence guard, the metrics log) belongs to the loop, which passes it explicitly."""

    cfg: dict[str, Any]
    device: torch.device
    ctx: StepContext
    data: RunData
    weights: LossWeights
    generators: dict[str, torch.Generator]
    out: Path
    state: RunState = field(default_factory=RunState)
    last_samples: Tensor | None = None
    started: float = field(default_factory=time.perf_counter)
    dist: Dist = distributed.SINGLE
    folder_id: tuple[int, int] | None = None  # the run folder's identity (rank 0, once open)

    @property
    def steps_per_epoch(self) -> int:
        return jdata.num_batches(
            len(self.data.train), self.cfg["batch_size"], world_size=self.dist.world_size
        )

    def elapsed(self) -> float:
        """Training seconds so far, over every resume."""
        return time.perf_counter() - self.started


def fresh_out(cfg: dict[str, Any]) -> str:
    """A new run folder name, ``<cwd>/runs/<timestamp>-<dataset>-<objective>[-k]`` (absolute, as
    every path a run records)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path.cwd() / "runs" / f"{stamp}-{cfg['dataset']}-{cfg['objective']}"
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


def model_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of the config's model (depth/width mapped to its names, as
    its :class:`~jem_ext.models.ModelEntry` says); none for a model factory."""
    if is_factory(cfg["model"]):
        return {}
    entry = model_entry(cfg["model"])
    norm = None if cfg["norm"] in (None, "none") else cfg["norm"]
    kw: dict[str, Any] = {"norm": norm, "dropout": cfg["dropout"]} if entry.takes_norm else {}
    for key, name in (("depth", entry.depth_kwarg), ("width", entry.width_kwarg)):
        if name is not None and cfg[key] is not None:
            kw[name] = cfg[key]
    return kw


def load_data(cfg: dict[str, Any]) -> dict[str, jdata.ImageData]:
    """Load the train/val/test splits named by the config, and check that its augmentation
    fits the images (raises DataError)."""
    datasets = {
        split: jdata.load_dataset(cfg["dataset"], cfg["data_root"], split, seed=cfg["seed"])
        for split in jdata.SPLITS
    }
    augment = None if cfg.get("no_augment") else jdata.default_augment(cfg["dataset"])
    jdata.check_augment(augment, datasets["train"], cfg.get("data_root"))
    return datasets


def sampler_seed(seed: int, reseeds: int = 0, rank: int = 0) -> int:
    """Seed of process ``rank``'s sampler generator, fresh after each recovery (``reseeds``)."""
    return distributed.generator_seed(seed + 101 + 1000 * reseeds, rank)


def augment_seed(seed: int, rank: int = 0) -> int:
    """Seed of process ``rank``'s augmentation generator."""
    return distributed.generator_seed(seed + 202, rank)


def make_sampler(
    cfg: dict[str, Any],
    train_data: jdata.ImageData,
    device: torch.device,
    generator: torch.Generator | None = None,
    dist: Dist = distributed.SINGLE,
) -> SGLDSampler | None:
    """Build the SGLD sampler described by the config, or None for CE; its replay buffer is
    this process's shard (the whole buffer for a single process)."""
    if cfg["objective"] == "ce":
        return None
    conditional = cfg["objective"] == "factored"
    if cfg["init"] == "gaussian":
        init = GaussianInit.fit(train_data.x, train_data.y, train_data.num_classes)
    else:
        init = UniformInit(*SAMPLE_RANGE)
    buffer = None
    if cfg["buffer_size"] > 0:
        classes = train_data.num_classes if conditional else 1
        buffer = ReplayBuffer(
            distributed.buffer_shard_size(cfg["buffer_size"], classes, dist),
            train_data.shape,
            num_classes=train_data.num_classes if conditional else None,
            device=device,
            reinit_prob=cfg["reinit_prob"],
            init=init,
            generator=generator,
        )
    clamp, grad_clip = chain_limits(cfg)
    return configure_sampler(
        SGLDSampler(
            n_steps=cfg["sgld_steps"],
            step_size=cfg["sgld_step_size"],
            noise_std=cfg["sgld_noise"],
            clamp=clamp,
            grad_clip=grad_clip,
            buffer=buffer,
            init=init,
            conditional=conditional,
            sample_shape=train_data.shape,
        ),
        cfg,
        device,
    )


def chain_limits(cfg: dict[str, Any]) -> tuple[tuple[float, float] | None, float | None]:
    """``(clamp, grad_clip)`` of the config's SGLD chains (proximal SGLD sets both)."""
    clamp = SAMPLE_RANGE if cfg["proximal"] else None
    grad_clip = cfg["grad_clip"]
    if cfg["proximal"] and grad_clip is None:
        grad_clip = PROXIMAL_GRAD_CLIP
    return clamp, grad_clip


def optimizer_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The optimiser's hyperparameters from the config, other than the scheduled lr."""
    settings: dict[str, Any] = {"weight_decay": cfg["weight_decay"]}
    if cfg["optimizer"] == "adam":
        settings["betas"] = (0.9, cfg["adam_beta2"])
    return settings


def make_optimizer(cfg: dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam (betas 0.9 and ``adam_beta2``) or SGD with momentum 0.9; wrapped in
    :class:`~jem_ext.sam.SAM` when ``sam_rho > 0``."""
    if cfg["optimizer"] == "adam":
        base: Any = torch.optim.Adam
        kwargs: dict[str, Any] = {}
    else:
        base, kwargs = torch.optim.SGD, {"momentum": 0.9}
    kwargs.update(lr=cfg["lr"], **optimizer_settings(cfg))
    if cfg["sam_rho"] > 0:
        return SAM(
            model.parameters(), base, rho=cfg["sam_rho"], adaptive=cfg["sam_adaptive"], **kwargs
        )
    return base(model.parameters(), **kwargs)


def apply_optimizer_settings(cfg: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Write the config's hyperparameters over a loaded optimiser state (a resume's
    ``--weight-decay`` or ``--adam-beta2`` then takes effect)."""
    for group in optimizer.param_groups:
        group.update(optimizer_settings(cfg))


def make_augment(cfg: dict[str, Any]) -> jdata.Augment | None:
    """The dataset's augmentation with the config's input noise, or None (``no_augment``)."""
    if cfg["no_augment"]:
        return None
    augment = jdata.default_augment(cfg["dataset"])
    if cfg["input_noise"] is not None:
        augment = dataclasses.replace(augment, noise_sigma=cfg["input_noise"])
    return augment


def apply_speed_options(ctx: StepContext, cfg: dict[str, Any], device: torch.device) -> None:
    """Set the context's precision, layout and compilation from the config's speed flags
    (``precision``, ``channels_last``, ``compile``; the sampler's own options are set where
    it is built, by :func:`jem_ext.accel.configure_sampler`)."""
    model = ctx.model_for_chain
    precision = cfg.get("precision", "fp32")
    if cfg.get("channels_last") and is_convolutional(model):
        use_channels_last(model)
    if cfg.get("compile"):
        compile_model(model)
    ctx.autocast = autocast_factory(precision, device)
    ctx.scaler = make_scaler(precision, device)
    ctx.joint_forward = batch_independent(model)


def build_context(
    cfg: dict[str, Any],
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
    context = SharpnessAwareContext if cfg["sam_rho"] > 0 else StepContext
    ctx = context(
        model_for_chain=model,
        model_for_loss=model,
        optimizer=make_optimizer(cfg, model),
        sampler=make_sampler(cfg, train_data, device, generator=generator, dist=dist),
        generator=generator,
    )
    apply_speed_options(ctx, cfg, device)
    # Wrapped last: DDP registers the parameters in the layout the speed options gave them.
    ctx.model_for_loss = distributed.wrap(model, dist)
    return ctx


def build_run(cfg: dict[str, Any], datasets: dict[str, jdata.ImageData] | None = None) -> Run:
    """Build the run of a validated config (nothing is written to disk here).

    In a distributed job (see :mod:`.distributed`) this process builds its share: its device,
    its generators (seeded from the seed and its rank) and its replay-buffer shard.
    """
    dist = distributed.current()
    device = distributed.local_device(resolve_device(cfg["device"]), dist)
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    if datasets is None:
        datasets = load_data(cfg)
    train_d = datasets["train"]
    conditional = cfg["objective"] == "factored"
    distributed.check_config(cfg, dist.world_size, train_d.num_classes if conditional else 1)
    seed = cfg["seed"]
    torch.manual_seed(seed)
    model = build_model(cfg["model"], train_d.num_classes, train_d.shape, **model_kwargs(cfg))
    model.to(device)
    if dist.rank > 0:  # dropout and other global-RNG draws differ between processes
        torch.manual_seed(distributed.generator_seed(seed, dist.rank))
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    generators = {
        "sampler": torch.Generator(device=gen_device).manual_seed(
            sampler_seed(seed, rank=dist.rank)
        ),
        "augment": torch.Generator(device=gen_device).manual_seed(augment_seed(seed, dist.rank)),
    }
    ctx = build_context(cfg, model, train_d, device, generators["sampler"], dist)
    labeled = None
    if cfg["labels_per_class"]:
        labeled = jdata.labeled_mask(train_d.y, cfg["labels_per_class"], seed=seed).to(device)
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
        augment=make_augment(cfg),
        px_augment=cfg["px_augment"],
    )
    weights = LossWeights(cfg["objective"], cfg["w_px"], cfg["w_pyx"], cfg["l2_energy"])
    return Run(
        cfg=cfg,
        device=device,
        ctx=ctx,
        data=data,
        weights=weights,
        generators=generators,
        out=Path(cfg["out"]),
        dist=dist,
    )
