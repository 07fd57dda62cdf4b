"""Tiny checkpoints the tests of jem_ext.load and jem_ext.score share (a second or so each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jem_ext.checkpoint import save_checkpoint
from jem_ext.data import load_dataset
from jem_ext.models import build_model, model_spec
from jem_ext.sampler import ReplayBuffer, SGLDSampler


def train_on_digits(model: torch.nn.Module, steps: int) -> None:
    """A few cross-entropy steps on digits (batches of 64, Adam 1e-2), so that a tiny model's
    scores differ between inputs."""
    data = load_dataset("digits", split="train")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(len(data), (64,))
        loss = torch.nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def save_run(
    folder: Path,
    in_shape=(1, 8, 8),
    config: dict | None = None,
    buffer_classes: int | None = None,
    buffer: bool = True,
    train_steps: int = 20,
    name: str = "best.pt",
    sampler_settings: dict | None = None,
    num_classes: int = 10,
) -> Path:
    """A run folder holding ``checkpoints/<name>`` of a small_cnn (a few CE steps on digits
    when its input is digits-shaped, so that its scores differ between inputs)."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes, in_shape, width=8)
    if train_steps and tuple(in_shape) == (1, 8, 8) and num_classes == 10:
        train_on_digits(model, train_steps)
    settings = dict(n_steps=3, step_size=0.5, noise_std=0.01, clamp=(-1.0, 1.0))
    settings.update(sampler_settings or {})
    sampler = SGLDSampler(
        **settings,
        buffer=ReplayBuffer(40, in_shape, num_classes=buffer_classes) if buffer else None,
        sample_shape=in_shape,
    )
    path = folder / "checkpoints" / name
    save_checkpoint(
        path,
        {
            "model_spec": model_spec(model),
            "model": model.state_dict(),
            "sampler": sampler.state_dict(),
            "config": config
            or {"dataset": "digits", "data_root": None, "objective": "jem", "seed": 0},
            "iteration": train_steps,
            "best_val_accuracy": None,
        },
    )
    return folder


def write_image_folder(root: Path, per_class: int = 10, colour: bool = False) -> Path:
    """An image folder data set (train/ and test/, three classes of 8x8 PNGs) from digits."""
    data = load_dataset("digits", split="train")
    pixels = ((data.x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    names = {0: "zero", 1: "one", 2: "two"}
    for split, start in (("train", 0), ("test", 2 * per_class)):
        for k, name in names.items():
            idx = np.flatnonzero(data.y.numpy() == k)[start : start + per_class]
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in idx:
                img = pixels[i, 0]
                im = Image.fromarray(np.stack([img] * 3, -1) if colour else img)
                im.save(root / split / name / f"{i:04d}.png")
    return root
