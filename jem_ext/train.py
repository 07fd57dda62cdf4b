"""Train a JEM (or its cross-entropy twin) and write a run folder.

Run ``python -m jem_ext.train --help`` for the flags. With no arguments it trains a JEM on the
8x8 scikit-learn digits with :class:`jem_ext.models.SmallCNN` on the CPU in a few minutes.

The run folder (``--out``, default ``runs/<timestamp>-<dataset>-<objective>``) holds::

    config.json        the full config (written first; ``--config`` repeats the run)
    metrics.jsonl      one JSON object per logged iteration, eval rows and event rows
    checkpoints/       last.pt (every --ckpt-every iterations and at epoch ends), best.pt
    samples/*.png      sample grids (scatter plots for 2-D toy sets)
    summary.json       final figures; a one-line summary is also printed last

Reproducibility: the data order of epoch ``e`` is a function of ``(seed, epoch)``, and every
random draw comes from generators whose states are checkpointed together with the position
inside the epoch, so ``--resume RUN`` after a crash (even ``kill -9``) continues exactly where
``checkpoints/last.pt`` left off and ends in the same state as an uninterrupted run.

Divergence guard: a non-finite loss, or ``|loss|`` or ``|energy_data - energy_sample|`` above
``--divergence-threshold``, restores the last good state, multiplies the learning rate by
``--recover-lr-factor``, re-initialises the sampler's replay buffer and logs an event row;
after ``--max-recoveries`` recoveries the run stops with a non-zero exit.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import data as jdata
from ._io import atomic_path, atomic_write_text
from .checkpoint import (
    CheckpointError,
    capture_rng,
    load_checkpoint,
    new_state,
    restore_rng,
    save_checkpoint,
)
from .models import build_model, model_spec

DATASETS = ("digits", "cifar10", "cifar100", "svhn", "folder", "rings", "moons", "gmm")
MODELS = ("small_cnn", "wrn", "mlp")
OBJECTIVES = ("jem", "factored", "ce")
INJECT_ENV = "JEM_EXT_INJECT_NAN_AT"

# Keys of config.json that describe the invocation, not the experiment: ignored by --config.
_INVOCATION_KEYS = ("out", "config", "resume", "no_progress", "threads")


class ConfigError(ValueError):
    """A config value or config file is invalid."""


class TrainingDiverged(RuntimeError):
    """Training diverged more than ``--max-recoveries`` times."""


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The argparse parser of ``python -m jem_ext.train``.

    Args:
        suppress_defaults: leave unspecified flags out of the namespace (used to find which
            flags were given explicitly, so they can override ``--config``).
    """
    p = argparse.ArgumentParser(
        prog="python -m jem_ext.train",
        description="Train a Joint Energy-based Model (JEM, Grathwohl et al. 2020) or its "
        "cross-entropy twin, writing a run folder with config, metrics, checkpoints, sample "
        "grids and a summary. Defaults train a JEM on the 8x8 digits on the CPU in minutes.",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def add(*names: str, **kw: Any) -> None:
        # Into the argument group `g` opened last, so --help shows the flags grouped.
        if suppress_defaults:
            kw.pop("default", None)
        g.add_argument(*names, **kw)

    g = p.add_argument_group("data")
    add("--dataset", "--data", dest="dataset", choices=DATASETS, default="digits",
        help="dataset to train on (cifar10/cifar100/svhn/folder need --data-root)")
    add("--data-root", default=None,
        help="folder holding the dataset files (CIFAR, SVHN, image folder)")
    add("--labels-per-class", type=int, default=None,
        help="semi-supervised: keep only this many labels per class for the CE term "
        "(default: all labels)")
    add("--no-augment", action="store_true", default=False,
        help="disable the dataset's default augmentation (crop/flip/Gaussian noise)")

    g = p.add_argument_group("model")
    add("--model", choices=MODELS, default="small_cnn", help="network architecture")
    add("--depth", type=int, default=None,
        help="depth: WRN total depth (6n+4, default 28) or MLP hidden layers (default 3)")
    add("--width", type=int, default=None,
        help="width: WRN widen factor (default 10), SmallCNN first-layer channels (default "
        "32) or MLP hidden units (default 128)")
    add("--norm", choices=("none", "batch", "instance", "layer"), default="none",
        help="normalisation layers of WRN/SmallCNN (JEM uses none)")
    add("--dropout", type=float, default=0.0, help="dropout rate (WRN/SmallCNN)")

    g = p.add_argument_group("objective")
    add("--objective", choices=OBJECTIVES, default="jem",
        help="jem: log p(x) + log p(y|x); factored: log p(y) + log p(x|y) (class-conditional "
        "sampling); ce: cross-entropy only (the classifier twin)")
    add("--w-px", type=float, default=1.0, help="weight of the generative (log p(x)) term")
    add("--w-pyx", type=float, default=1.0, help="weight of the cross-entropy term")
    add("--l2-energy", type=float, default=0.01,
        help="weight of an L2 penalty on the energies of data and samples (divergence "
        "insurance; 0 disables)")

    g = p.add_argument_group("sampler (SGLD)")
    add("--sgld-steps", type=int, default=20, help="SGLD steps per training iteration")
    add("--sgld-step-size", type=float, default=1.0, help="SGLD step on dE/dx")
    add("--sgld-noise", type=float, default=0.01, help="SGLD noise standard deviation")
    add("--buffer-size", type=int, default=10000,
        help="persistent replay buffer size; 0 = short-run chains from the init each time")
    add("--reinit-prob", type=float, default=0.05,
        help="fraction of buffer chains re-initialised at each draw")
    add("--init", choices=("uniform", "gaussian"), default="uniform",
        help="chain initialisation: uniform on [-1,1], or per-class Gaussians fitted to the "
        "training data (JEM++ informative init)")
    add("--proximal", action="store_true", default=False,
        help="proximal SGLD (JEM++): clip the gradient element-wise to --grad-clip "
        "(0.03 when not given) and clamp samples to [-1, 1]")
    add("--grad-clip", type=float, default=None,
        help="clip dE/dx element-wise to [-c, c] in each SGLD step")

    g = p.add_argument_group("optimisation")
    add("--optimizer", choices=("adam", "sgd"), default="adam", help="optimiser")
    add("--lr", type=float, default=3e-3, help="peak learning rate")
    add("--warmup-iters", type=int, default=200, help="linear learning-rate warm-up iterations")
    add("--decay-epochs", type=_int_list, default=[40, 50],
        help="epochs at which the learning rate is multiplied by --decay-rate (e.g. 160,180)")
    add("--decay-rate", type=float, default=0.3, help="learning-rate decay factor")
    add("--weight-decay", type=float, default=0.0, help="weight decay")
    add("--batch-size", type=int, default=64, help="mini-batch size")
    add("--epochs", type=int, default=60, help="training epochs")
    add("--seed", type=int, default=1, help="random seed (model init, data order, sampler)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="device; auto = cuda when available")
    add("--threads", type=int, default=1,
        help="CPU threads for torch (0 = torch's default). 1 is the default because small "
        "models gain little from more, and on a shared machine extra OpenMP threads can make "
        "each iteration tens of times slower")

    g = p.add_argument_group("run folder")
    add("--out", default=None,
        help="run folder to create (default: a fresh runs/<timestamp>-<dataset>-<objective>)")
    add("--config", default=None,
        help="repeat a run from its config.json; flags given explicitly override it")
    add("--resume", default=None, metavar="RUN_DIR",
        help="continue an interrupted run from RUN_DIR/checkpoints/last.pt (flags given "
        "explicitly, e.g. --epochs, override its config)")
    add("--log-every", type=int, default=10, help="write a metrics row every N iterations")
    add("--ckpt-every", type=int, default=100,
        help="save checkpoints/last.pt every N iterations (and at every epoch end; 0 = only "
        "at epoch ends)")
    add("--sample-every", type=int, default=500,
        help="write a sample grid every N iterations (0 = only at the end)")
    add("--eval-every", type=int, default=1, help="evaluate on the validation split every N epochs")
    add("--no-progress", action="store_true", default=False, help="hide the progress bar")

    g = p.add_argument_group("divergence guard")
    add("--max-recoveries", type=int, default=5,
        help="stop with an error after this many recoveries from divergence")
    add("--divergence-threshold", type=float, default=1e6,
        help="treat |loss| or |energy_data - energy_sample| above this as divergence")
    add("--recover-lr-factor", type=float, default=0.5,
        help="multiply the learning rate by this after each recovery")
    add("--debug-inject-nan-at", type=_int_list, default=[],
        help="FOR TESTING: make the loss NaN at these iterations (also read from the "
        f"{INJECT_ENV} environment variable)")
    return p


def default_config() -> dict[str, Any]:
    """The full default config (every flag's default), as a dict."""
    return vars(build_parser().parse_args([]))


def _validate(cfg: dict[str, Any]) -> None:
    """Check config values; raise ConfigError with one clear message."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for key, choices in (("dataset", DATASETS), ("model", MODELS), ("objective", OBJECTIVES),
                         ("init", ("uniform", "gaussian")), ("optimizer", ("adam", "sgd")),
                         ("device", ("auto", "cpu", "cuda"))):
        need(cfg[key] in choices,
             f"{key}: expected one of {', '.join(choices)}, got {cfg[key]!r}")
    for key in ("batch_size", "epochs", "log_every", "eval_every"):
        need(isinstance(cfg[key], int) and cfg[key] >= 1,
             f"{key}: expected an integer >= 1, got {cfg[key]!r}")
    for key in ("sgld_steps", "buffer_size", "warmup_iters", "ckpt_every", "sample_every",
                "max_recoveries", "threads"):
        need(isinstance(cfg[key], int) and cfg[key] >= 0,
             f"{key}: expected an integer >= 0, got {cfg[key]!r}")
    need(cfg["lr"] > 0, f"lr: expected > 0, got {cfg['lr']}")
    need(0 <= cfg["reinit_prob"] <= 1, f"reinit_prob: expected in [0, 1], got {cfg['reinit_prob']}")
    need(cfg["sgld_noise"] >= 0, f"sgld_noise: expected >= 0, got {cfg['sgld_noise']}")
    need(cfg["divergence_threshold"] > 0, "divergence_threshold: expected > 0")
    need(0 < cfg["recover_lr_factor"] <= 1, "recover_lr_factor: expected in (0, 1]")
    need(cfg["objective"] == "ce" or cfg["sgld_steps"] >= 1,
         "sgld_steps: expected >= 1 for the jem and factored objectives")
    need(cfg["labels_per_class"] is None or cfg["labels_per_class"] >= 1,
         "labels_per_class: expected >= 1")
    if cfg["device"] == "cuda":
        need(torch.cuda.is_available(), "device: cuda requested but no CUDA device is available")


def config_from_args(argv: list[str] | None) -> dict[str, Any]:
    """Build the run config from command-line arguments (``--config`` merged in).

    Order of precedence: flags given explicitly > ``--config`` file > defaults. With
    ``--resume RUN``, ``RUN/config.json`` plays the role of ``--config``.

    Raises:
        ConfigError: unreadable/malformed config file or invalid values.
    """
    args = build_parser().parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    cfg = vars(args)
    base_file = None
    if args.resume is not None:
        base_file = Path(args.resume) / "config.json"
        if not Path(args.resume).is_dir():
            raise ConfigError(f"--resume {args.resume}: no such run folder")
    elif args.config is not None:
        base_file = Path(args.config)
    if base_file is not None:
        loaded = _read_config_file(base_file)
        cfg = default_config()
        for key, value in loaded.items():
            if key not in _INVOCATION_KEYS:
                cfg[key] = value
        cfg.update(explicit)
        cfg["resume"] = args.resume
        cfg["config"] = args.config
        if args.resume is not None:
            cfg["out"] = str(Path(args.resume))
    _validate(cfg)
    return cfg


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    try:
        loaded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"config file {path}: not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a JSON object, got {type(loaded).__name__}")
    known = set(default_config())
    unknown = sorted(set(loaded) - known)
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown keys {unknown} (expected a jem_ext.train config.json)"
        )
    types = {k: type(v) for k, v in default_config().items() if v is not None}
    for key, value in loaded.items():
        want = types.get(key)
        if want is None or value is None:
            continue
        ok = isinstance(value, want) or (want is float and isinstance(value, int))
        if isinstance(value, bool) and want is not bool:
            ok = False
        if not ok:
            raise ConfigError(
                f"config file {path}: key {key!r} expected {want.__name__}, got {value!r}"
            )
    return loaded


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _model_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    norm = None if cfg["norm"] in (None, "none") else cfg["norm"]
    if cfg["model"] == "wrn":
        kw: dict[str, Any] = {"norm": norm, "dropout": cfg["dropout"]}
        if cfg["depth"] is not None:
            kw["depth"] = cfg["depth"]
        if cfg["width"] is not None:
            kw["widen_factor"] = cfg["width"]
    elif cfg["model"] == "small_cnn":
        kw = {"norm": norm, "dropout": cfg["dropout"]}
        if cfg["width"] is not None:
            kw["width"] = cfg["width"]
    else:
        kw = {}
        if cfg["depth"] is not None:
            kw["depth"] = cfg["depth"]
        if cfg["width"] is not None:
            kw["hidden"] = cfg["width"]
    return kw


def load_data(cfg: dict[str, Any]) -> dict[str, jdata.ImageData]:
    """Load the train/val/test splits named by the config (raises DataError)."""
    return {
        split: jdata.load_dataset(cfg["dataset"], cfg["data_root"], split, seed=cfg["seed"])
        for split in ("train", "val", "test")
    }


def make_sampler(cfg: dict[str, Any], train_data: jdata.ImageData, device: torch.device,
                 generator: torch.Generator | None = None):
    """Build the SGLD sampler (with its replay buffer) described by the config, or None for CE."""
    if cfg["objective"] == "ce":
        return None
    from .sampler import GaussianInit, ReplayBuffer, SGLDSampler, UniformInit

    conditional = cfg["objective"] == "factored"
    if cfg["init"] == "gaussian":
        init = GaussianInit.fit(train_data.x, train_data.y, train_data.num_classes)
    else:
        init = UniformInit(-1.0, 1.0)
    clamp = (-1.0, 1.0) if cfg["proximal"] else None
    grad_clip = cfg["grad_clip"]
    if cfg["proximal"] and grad_clip is None:
        grad_clip = 0.03
    buffer = None
    if cfg["buffer_size"] > 0:
        buffer = ReplayBuffer(
            cfg["buffer_size"], train_data.shape,
            num_classes=train_data.num_classes if conditional else None,
            device=device, reinit_prob=cfg["reinit_prob"], init=init, generator=generator,
        )
    return SGLDSampler(
        n_steps=cfg["sgld_steps"], step_size=cfg["sgld_step_size"], noise_std=cfg["sgld_noise"],
        clamp=clamp, grad_clip=grad_clip, buffer=buffer, init=init, conditional=conditional,
        sample_shape=train_data.shape,
    )


def make_optimizer(cfg: dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam (betas 0.9, 0.999, as in JEM) or SGD with momentum 0.9."""
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9,
                           weight_decay=cfg["weight_decay"])


def learning_rate(cfg: dict[str, Any], iteration: int, epoch: int, scale: float = 1.0) -> float:
    """Learning rate at ``iteration`` (0-based) in ``epoch``: warm-up, step decay, recovery scale."""
    lr = cfg["lr"] * scale
    if cfg["warmup_iters"] > 0:
        lr *= min(1.0, (iteration + 1) / cfg["warmup_iters"])
    lr *= cfg["decay_rate"] ** sum(1 for e in cfg["decay_epochs"] if epoch >= e)
    return lr


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: jdata.ImageData, device: torch.device,
             batch_size: int = 500) -> float:
    """Classification accuracy of ``model`` on ``data`` (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y, _ in jdata.batches(data, batch_size, shuffle=False):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    model.train(was_training)
    return correct / max(1, len(data))


def _epoch_order_generator(seed: int, epoch: int) -> torch.Generator:
    """The data-order generator of one epoch: a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (2**63))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _save_samples(x: torch.Tensor, path: Path, data: jdata.ImageData) -> None:
    """Write a sample grid (images) or a scatter plot over the data (2-D points)."""
    if x.dim() == 4:
        jdata.save_image_grid(x[:64], path, nrow=8)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    d = data.x[:1000].cpu()
    ax.scatter(d[:, 0], d[:, 1], s=2, c="lightgray", label="data")
    s = x.detach().cpu()
    ax.scatter(s[:, 0], s[:, 1], s=4, c="tab:red", label="samples")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_aspect("equal")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _injections(cfg: dict[str, Any]) -> set[int]:
    its = set(cfg.get("debug_inject_nan_at") or [])
    env = os.environ.get(INJECT_ENV, "").strip()
    if env:
        try:
            its |= set(_int_list(env))
        except argparse.ArgumentTypeError:
            raise ConfigError(f"{INJECT_ENV}: expected integers separated by commas, got {env!r}")
    return its


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def train(cfg: dict[str, Any], resume_state: dict[str, Any] | None = None,
          datasets: dict[str, jdata.ImageData] | None = None) -> dict[str, Any]:
    """Train according to ``cfg`` (see :func:`default_config`), writing the run folder ``cfg["out"]``.

    Args:
        cfg: config dict; missing keys take their defaults (:func:`default_config`), and
            ``cfg["out"]`` (the run folder, created here) defaults to a fresh ``runs/...``.
        resume_state: a checkpoint dict to continue from (``--resume``).
        datasets: already loaded splits (as returned by :func:`load_data`), else loaded here.

    Returns:
        The summary dict (also written to ``summary.json``).

    Raises:
        DataError, ConfigError, CheckpointError: bad inputs (before the run folder is created).
        TrainingDiverged: more than ``max_recoveries`` divergences (summary.json still written).
    """
    from .objectives import jem_loss

    cfg = {**default_config(), **cfg}
    if cfg["out"] is None:
        cfg["out"] = _fresh_out(cfg)
    _validate(cfg)
    device = _resolve_device(cfg["device"])
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    if datasets is None:
        datasets = load_data(cfg)
    train_d, val_d, test_d = datasets["train"], datasets["val"], datasets["test"]
    inject = _injections(cfg)
    seed = cfg["seed"]

    # Model, optimiser, sampler: deterministic in the seed.
    torch.manual_seed(seed)
    model = build_model(cfg["model"], train_d.num_classes, train_d.shape, **_model_kwargs(cfg))
    model.to(device)
    optimizer = make_optimizer(cfg, model)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    sampler_gen = torch.Generator(device=gen_device).manual_seed(seed + 101)
    aug_gen = torch.Generator(device=gen_device).manual_seed(seed + 202)
    sampler = make_sampler(cfg, train_d, device, generator=sampler_gen)
    labeled_all = jdata.labeled_mask(train_d.y, cfg["labels_per_class"], seed=seed)
    augment = None if cfg["no_augment"] else jdata.default_augment(cfg["dataset"])
    train_x = train_d.x.to(device)
    train_data_dev = jdata.ImageData(train_x, train_d.y.to(device), train_d.num_classes,
                                     train_d.name, train_d.classes)

    out = Path(cfg["out"])
    ckpt_dir, sample_dir = out / "checkpoints", out / "samples"
    metrics_path = out / "metrics.jsonl"

    steps_per_epoch = math.ceil(len(train_d) / cfg["batch_size"])
    total_iters = steps_per_epoch * cfg["epochs"]
    progress = {"iteration": 0, "epoch": 0, "pos": 0, "lr_scale": 1.0, "recoveries": 0,
                "best_val_accuracy": -1.0, "seconds": 0.0, "reseeds": 0}

    if resume_state is not None:
        try:
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
            if sampler is not None and resume_state.get("sampler") is not None:
                sampler.load_state_dict(resume_state["sampler"])
            restore_rng(resume_state["rng"], {"sampler": sampler_gen, "augment": aug_gen})
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"--resume: the checkpoint does not fit this run's config ({first})"
            ) from None
        progress.update(resume_state.get("progress", {}))
        progress["iteration"] = int(resume_state["iteration"])
        progress["epoch"] = int(resume_state["epoch"])
        progress["best_val_accuracy"] = float(resume_state.get("best_val_accuracy", -1.0))
        _truncate_metrics(metrics_path, progress["iteration"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json",
                           json.dumps(cfg, indent=2, sort_keys=True, default=_json_default) + "\n")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sample_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = open(metrics_path, "a")

    def log(row: dict[str, Any]) -> None:
        metrics_file.write(json.dumps(row, default=_json_default) + "\n")
        metrics_file.flush()

    def make_state() -> dict[str, Any]:
        return new_state(
            model_spec=model_spec(model),
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            sampler=sampler.state_dict() if sampler is not None else None,
            rng=capture_rng({"sampler": sampler_gen, "augment": aug_gen}),
            iteration=progress["iteration"],
            epoch=progress["epoch"],
            config=json.loads(json.dumps(cfg, default=_json_default)),
            best_val_accuracy=progress["best_val_accuracy"],
            progress=dict(progress),
        )

    last_good: dict[str, Any] = {}

    def checkpoint(name: str = "last.pt") -> dict[str, Any]:
        state = make_state()
        save_checkpoint(ckpt_dir / name, state)
        last_good["model"] = copy.deepcopy(state["model"])
        last_good["optimizer"] = copy.deepcopy(state["optimizer"])
        return state

    if resume_state is None:
        checkpoint()
    else:
        last_good["model"] = copy.deepcopy(model.state_dict())
        last_good["optimizer"] = copy.deepcopy(optimizer.state_dict())

    bar = None
    if not cfg["no_progress"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_iters, initial=min(progress["iteration"], total_iters),
                   desc=f"{cfg['dataset']}/{cfg['objective']}", unit="it", dynamic_ncols=True,
                   file=sys.stderr)

    last_xq: torch.Tensor | None = None
    t_start = time.perf_counter() - progress["seconds"]
    status = "completed"
    error: str | None = None

    def elapsed() -> float:
        return time.perf_counter() - t_start

    def write_samples(tag: str) -> None:
        x = last_xq
        if x is None:  # CE runs (or nothing sampled yet): a short chain from a private generator
            from .sampler import sgld_chain

            g = torch.Generator(device=gen_device).manual_seed(seed * 7 + progress["iteration"])
            x0 = torch.rand((64, *train_d.shape), generator=g, device=gen_device).to(device) * 2 - 1
            clamp = (-1.0, 1.0) if cfg["proximal"] else None
            x = sgld_chain(model, x0, max(1, cfg["sgld_steps"]), cfg["sgld_step_size"],
                           cfg["sgld_noise"], clamp=clamp, generator=g)
        _save_samples(x, sample_dir / f"samples_{tag}.png", train_d)

    try:
        model.train()
        while progress["epoch"] < cfg["epochs"]:
            epoch = progress["epoch"]
            order_gen = _epoch_order_generator(seed, epoch)
            for pos, (x, y, idx) in enumerate(
                jdata.batches(train_data_dev, cfg["batch_size"], shuffle=True, generator=order_gen)
            ):
                if pos < progress["pos"]:
                    continue  # resuming inside the epoch: skip batches already trained on
                it = progress["iteration"]
                lr = learning_rate(cfg, it, epoch, progress["lr_scale"])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if augment is not None:
                    x = augment(x, generator=aug_gen)
                labeled = labeled_all[idx].to(device) if cfg["labels_per_class"] else None
                x_q = None
                if sampler is not None:
                    y_q = y if sampler_conditional(sampler) else None
                    x_q = sampler.sample(model, x.shape[0], y=y_q, generator=sampler_gen)
                    last_xq = x_q
                model.train()
                loss, terms = jem_loss(model, x, y, x_q=x_q, labeled=labeled,
                                       objective=cfg["objective"], w_px=cfg["w_px"],
                                       w_pyx=cfg["w_pyx"], l2_energy=cfg["l2_energy"])
                if it in inject:
                    inject.discard(it)
                    loss = loss * float("nan")
                    terms["loss"] = float("nan")
                reason = _divergence(loss, terms, cfg["divergence_threshold"],
                                     check_gap=cfg["objective"] != "ce")
                if reason is not None:
                    progress["recoveries"] += 1
                    row = {"event": "recovery", "iteration": it, "epoch": epoch, "reason": reason,
                           "recoveries": progress["recoveries"], "seconds": elapsed()}
                    if progress["recoveries"] > cfg["max_recoveries"]:
                        row["event"] = "stopped"
                        log(row)
                        raise TrainingDiverged(
                            f"training diverged at iteration {it} ({reason}) after "
                            f"{cfg['max_recoveries']} recoveries; stopping. The last good "
                            f"checkpoint is {ckpt_dir / 'last.pt'}: lower --lr, raise "
                            "--sgld-steps or --l2-energy, or try another --seed"
                        )
                    model.load_state_dict(last_good["model"])
                    optimizer.load_state_dict(last_good["optimizer"])
                    progress["lr_scale"] *= cfg["recover_lr_factor"]
                    progress["reseeds"] += 1
                    sampler_gen.manual_seed(seed + 101 + 1000 * progress["reseeds"])
                    sampler = make_sampler(cfg, train_d, device, generator=sampler_gen)
                    row["lr_scale"] = progress["lr_scale"]
                    log(row)
                    if bar is not None:
                        bar.write(f"recovery {progress['recoveries']}/{cfg['max_recoveries']} at "
                                  f"iteration {it}: {reason}; lr x{progress['lr_scale']:.3g}")
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                progress["iteration"] = it + 1
                progress["pos"] = pos + 1
                progress["seconds"] = elapsed()
                if reason is None and (it + 1) % cfg["log_every"] == 0:
                    row = {"iteration": it + 1, "epoch": epoch}
                    row.update({k: _finite_or_none(v) for k, v in terms.items()})
                    row.update({"lr": lr, "seconds": progress["seconds"]})
                    log(row)
                if bar is not None:
                    bar.update(1)
                    if reason is None:
                        bar.set_postfix(loss=f"{terms['loss']:.3g}",
                                        acc=f"{terms.get('accuracy', float('nan')):.2f}",
                                        refresh=False)
                if cfg["sample_every"] and (it + 1) % cfg["sample_every"] == 0:
                    write_samples(f"{it + 1:07d}")
                if cfg["ckpt_every"] and (it + 1) % cfg["ckpt_every"] == 0 \
                        and progress["pos"] < steps_per_epoch:
                    checkpoint()
            # epoch end
            progress["epoch"] = epoch + 1
            progress["pos"] = 0
            if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
                val_acc = accuracy(model, val_d, device)
                log({"iteration": progress["iteration"], "epoch": epoch + 1,
                     "val_accuracy": val_acc, "seconds": elapsed()})
                if val_acc > progress["best_val_accuracy"]:
                    progress["best_val_accuracy"] = val_acc
                    checkpoint("best.pt")
                if bar is not None:
                    bar.set_description(f"{cfg['dataset']}/{cfg['objective']} val {val_acc:.3f}")
            checkpoint()
    except TrainingDiverged as err:
        status, error = "diverged", str(err)
    finally:
        if bar is not None:
            bar.close()

    if status == "completed":
        write_samples("final")
    seconds = elapsed()
    test_acc = accuracy(model, test_d, device)
    val_acc = accuracy(model, val_d, device)
    best_path = ckpt_dir / "best.pt"
    best_test = None
    if best_path.is_file():
        from .checkpoint import model_from_checkpoint

        best_test = accuracy(model_from_checkpoint(load_checkpoint(best_path), device), test_d, device)
    summary = {
        "status": status,
        "error": error,
        "dataset": cfg["dataset"],
        "objective": cfg["objective"],
        "model": cfg["model"],
        "test_accuracy": test_acc,
        "val_accuracy": val_acc,
        "best_val_accuracy": progress["best_val_accuracy"] if progress["best_val_accuracy"] >= 0 else None,
        "best_test_accuracy": best_test,
        "iterations": progress["iteration"],
        "epochs": progress["epoch"],
        "recoveries": progress["recoveries"],
        "seconds": seconds,
        "seconds_per_iteration": seconds / max(1, progress["iteration"]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "best_checkpoint": str(best_path) if best_path.is_file() else None,
        "last_checkpoint": str(ckpt_dir / "last.pt"),
        "run_dir": str(out),
    }
    metrics_file.close()
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if status == "diverged":
        raise TrainingDiverged(error)
    return summary


def sampler_conditional(sampler: Any) -> bool:
    """Whether a sampler draws class-conditional samples (needs labels)."""
    return bool(getattr(sampler, "conditional", False))


def _divergence(loss: torch.Tensor, terms: dict[str, float], threshold: float,
                check_gap: bool = True) -> str | None:
    value = float(loss.detach())
    if not math.isfinite(value):
        return f"non-finite loss ({value})"
    if abs(value) > threshold:
        return f"|loss| = {abs(value):.3g} > {threshold:g}"
    ed, es = terms.get("energy_data"), terms.get("energy_sample")
    if check_gap and ed is not None and es is not None:
        gap = abs(float(ed) - float(es))
        if not math.isfinite(gap) or gap > threshold:
            return f"energy gap |energy_data - energy_sample| = {gap:.3g} > {threshold:g}"
    return None


def _finite_or_none(value: Any) -> float | None:
    """JSON-safe float: NaN/inf (e.g. terms an objective does not compute) become null."""
    value = float(value)
    return value if math.isfinite(value) else None


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metrics rows written after ``iteration`` (by the run that was interrupted)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the crash
        if isinstance(row, dict) and row.get("iteration", 0) <= iteration:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _fresh_out(cfg: dict[str, Any]) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{cfg['dataset']}-{cfg['objective']}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return str(out)


def prepare(argv: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None,
                                                     dict[str, jdata.ImageData]]:
    """Parse and validate everything (config, data, checkpoint) before any file is written.

    Returns:
        ``(config, resume_state or None, datasets)``.

    Raises:
        ConfigError, DataError, CheckpointError.
    """
    cfg = config_from_args(argv)
    resume_state = None
    if cfg["resume"] is not None:
        ckpt = Path(cfg["resume"]) / "checkpoints" / "last.pt"
        resume_state = load_checkpoint(ckpt)
        for key in ("model", "optimizer", "rng", "iteration", "epoch"):
            if key not in resume_state:
                raise CheckpointError(f"checkpoint {ckpt}: missing key {key!r} (not a training checkpoint)")
    datasets = load_data(cfg)
    # Build the model once to surface bad model flags before touching the disk.
    try:
        model = build_model(cfg["model"], datasets["train"].num_classes, datasets["train"].shape,
                            **_model_kwargs(cfg))
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    if resume_state is not None:
        try:
            model.load_state_dict(resume_state["model"])
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(
                f"--resume: checkpoint does not match the config's model ({first})"
            ) from None
    if cfg["labels_per_class"] is not None:
        jdata.labeled_mask(datasets["train"].y, cfg["labels_per_class"], seed=cfg["seed"])
    if cfg["resume"] is None:
        if cfg["out"] is None:
            cfg["out"] = _fresh_out(cfg)
        out = Path(cfg["out"])
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(
                f"--out {out}: already exists and is not empty (use --resume to continue a run)"
            )
    return cfg, resume_state, datasets


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 diverged, 2 bad input)."""
    try:
        cfg, resume_state, datasets = prepare(argv)
    except (ConfigError, jdata.DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg, resume_state=resume_state, datasets=datasets)
    except CheckpointError as err:  # a resume state that does not fit (nothing written yet)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python -m jem_ext.train --resume {cfg['out']}",
              file=sys.stderr)
        return 130
    best = summary["best_val_accuracy"]
    print(
        f"{summary['dataset']}/{summary['objective']}: test accuracy {summary['test_accuracy']:.4f}, "
        f"val accuracy {summary['val_accuracy']:.4f} (best {best if best is None else f'{best:.4f}'}), "
        f"{summary['iterations']} iterations in {summary['seconds']:.1f} s, "
        f"{summary['recoveries']} recoveries; run folder {summary['run_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
