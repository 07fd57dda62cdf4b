"""Tests of jem_ext.load and jem_ext.trained.Trained: the read-outs agree with the evaluation's,
the preprocessing is the training reader's, samples follow the run's chain settings."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trained_runs import save_run, write_image_folder

import jem_ext
from jem_ext.checkpoint import CheckpointError
from jem_ext.data import load_dataset
from jem_ext.eval.tasks import ood_scores
from jem_ext.trained import InputError, Trained

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return save_run(tmp_path_factory.mktemp("trained") / "run")


@pytest.fixture(scope="module")
def trained(run) -> Trained:
    return jem_ext.load(run)


@pytest.fixture(scope="module")
def test_x() -> torch.Tensor:
    return load_dataset("digits", split="test").x[:100]


def test_load_run_folder_prefers_best(tmp_path):
    folder = save_run(tmp_path / "r", name="last.pt", train_steps=0)
    assert jem_ext.load(folder).path.name == "last.pt"
    save_run(tmp_path / "r", name="best.pt", train_steps=0)
    t = jem_ext.load(folder)
    assert t.path == (folder / "checkpoints" / "best.pt").resolve()
    assert jem_ext.load(folder / "checkpoints" / "last.pt").path.name == "last.pt"


def test_load_bad_paths_raise_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        jem_ext.load(tmp_path / "missing")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError) as err:
        jem_ext.load(tmp_path / "junk.pt")
    assert "\n" not in str(err.value)


def test_model_eval_mode_on_device(trained):
    assert not trained.model.training
    assert all(not p.requires_grad for p in trained.model.parameters())
    assert trained.device == torch.device("cpu")
    assert trained.in_shape == (1, 8, 8) and trained.num_classes == 10
    assert (trained.chain.n_steps, trained.chain.step_size) == (3, 0.5)
    assert trained.chain.clamp == (-1.0, 1.0)
    assert "Trained(" in repr(trained)


def test_scores_match_the_evaluation(trained, test_x):
    """log p(x) and max p(y|x) equal the evaluation's OOD scores on the same inputs."""
    ev = ood_scores(trained.model, test_x, batch_size=37)
    s = trained.scores(test_x, batch_size=29)
    np.testing.assert_allclose(s.log_px.double().numpy(), ev["logpx"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.max_prob.double().numpy(), ev["maxprob"], rtol=1e-5, atol=1e-6)
    logits = trained.model(test_x)
    torch.testing.assert_close(s.probs, torch.softmax(logits, 1))
    torch.testing.assert_close(s.log_px, torch.logsumexp(logits, 1))
    assert torch.equal(s.pred, logits.argmax(1))
    torch.testing.assert_close(trained.probs(test_x), s.probs)
    torch.testing.assert_close(trained.log_px(test_x, batch_size=7), s.log_px)


def test_energies(trained, test_x):
    logits = trained.model(test_x)
    torch.testing.assert_close(trained.energy(test_x), -torch.logsumexp(logits, 1))
    y = torch.arange(len(test_x)) % 10
    torch.testing.assert_close(trained.energy(test_x, y), -logits.gather(1, y[:, None])[:, 0])
    torch.testing.assert_close(trained.energy(test_x, 3), -logits[:, 3])
    with pytest.raises(ValueError, match="class in 0 .. 9"):
        trained.energy(test_x, 10)
    with pytest.raises(ValueError, match="one label per sample"):
        trained.energy(test_x, y[:5])
    with pytest.raises(ValueError, match="expected inputs"):
        trained.logits(torch.zeros(2, 3, 8, 8))


def test_empty_batch(trained):
    s = trained.scores(torch.zeros(0, 1, 8, 8))
    assert s.probs.shape == (0, 10) and s.log_px.shape == (0,)


def test_sample_from_noise_follows_the_chain(trained):
    a = trained.sample(6, seed=1)
    assert a.shape == (6, 1, 8, 8) and a.device == trained.device
    assert a.min() >= -1 and a.max() <= 1  # the run's clamp
    torch.testing.assert_close(trained.sample(6, seed=1), a)
    assert not torch.equal(trained.sample(6, seed=2), a)
    # zero steps: the starts themselves, U(-1, 1) noise
    x0 = trained.sample(100, n_steps=0, seed=0)
    assert -1 <= x0.min() < -0.9 and 0.9 < x0.max() <= 1
    # the chain moves the starts downhill in energy (more steps: lower mean energy)
    e0 = trained.energy(trained.sample(16, n_steps=0, seed=3)).mean()
    e10 = trained.energy(trained.sample(16, n_steps=10, seed=3)).mean()
    assert e10 < e0


def test_class_conditional_samples_lower_their_class_energy(trained):
    x0 = trained.sample(16, y=4, n_steps=0, seed=5)
    x = trained.sample(16, y=4, n_steps=10, seed=5)
    assert trained.energy(x, 4).mean() < trained.energy(x0, 4).mean()
    y = torch.arange(8) % 10
    assert trained.sample(8, y=y, seed=0, batch_size=3).shape == (8, 1, 8, 8)


def test_samples_from_the_saved_buffer(trained):
    x = trained.sample(20, from_buffer=True, n_steps=0, seed=0)
    rows = trained.buffer.flatten(1)
    assert all((rows == r).all(1).any() for r in x.flatten(1))
    assert trained.sample(5, from_buffer=True, seed=0).shape == (5, 1, 8, 8)


def test_class_split_buffer_starts_from_its_class(tmp_path):
    t = jem_ext.load(save_run(tmp_path / "split", buffer_classes=10, train_steps=0))
    per_class = t.buffer.shape[0] // 10
    x = t.sample(12, y=7, from_buffer=True, n_steps=0, seed=0)
    own = t.buffer[7 * per_class : 8 * per_class].flatten(1)
    assert all((own == r).all(1).any() for r in x.flatten(1))


def test_no_buffer(tmp_path):
    t = jem_ext.load(save_run(tmp_path / "ce", buffer=False, train_steps=0))
    assert t.buffer is None
    with pytest.raises(ValueError, match="holds no replay buffer"):
        t.sample(2, from_buffer=True)
    assert t.sample(2, seed=0).shape == (2, 1, 8, 8)


def test_read_image_is_the_training_reader(tmp_path):
    """A folder's test images read one by one equal the folder data set's tensors."""
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    t = jem_ext.load(save_run(tmp_path / "r", train_steps=0, num_classes=3))
    data = load_dataset("folder", root, "test")
    files = sorted((root / "test").rglob("*.png"))
    x = torch.stack([t.read_image(f) for f in files])
    assert torch.equal(x, data.x)


def test_read_image_refuses_what_does_not_fit(tmp_path):
    t = jem_ext.load(save_run(tmp_path / "r", train_steps=0))
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(InputError, match=r"big.png: a 8x9 image; the model takes 8x8"):
        t.read_image(tmp_path / "big.png")
    with pytest.raises(InputError, match=r"rgb.png: a colour image \(mode RGB\)"):
        t.read_image(tmp_path / "rgb.png")
    with pytest.raises(InputError, match=r"junk.png: is not a readable PNG/JPEG"):
        t.read_image(tmp_path / "junk.png")


def test_rgb_model_reads_grey_images_as_training_does(tmp_path):
    t = jem_ext.load(save_run(tmp_path / "r", in_shape=(3, 8, 8), train_steps=0))
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "grey.png")
    x = t.read_image(tmp_path / "grey.png")
    assert x.shape == (3, 8, 8) and torch.equal(x, torch.ones(3, 8, 8))


def test_from_array_layouts(trained):
    u8 = np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    x = trained.from_array(u8)
    assert torch.equal(x, torch.from_numpy(u8).float().div(127.5).sub(1)[:, None])
    assert torch.equal(trained.from_array(u8[..., None]), x)
    assert torch.equal(trained.from_array(x.numpy().astype(np.float64)), x)
    with pytest.raises(InputError, match=r"a\.npy: a float array of shape \(4, 8, 8\)"):
        trained.from_array(x.numpy()[:, 0], "a.npy")
    bad = x.numpy().copy()
    bad[2, 0, 1, 1] = 3.0
    with pytest.raises(InputError, match=r"a\.npy\[2\]: values outside \[-1, 1\]"):
        trained.from_array(bad, "a.npy")
    bad[2, 0, 1, 1] = np.nan
    with pytest.raises(InputError, match=r"\[2\]: values outside \[-1, 1\] or not finite"):
        trained.from_array(bad, "a.npy")
    with pytest.raises(InputError, match="dtype int64"):
        trained.from_array(np.zeros((2, 1, 8, 8), np.int64))


def _readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("### Using a trained JEM")
    end = text.index("\n### ", start + 1)
    return text[start:end]


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The README's Python snippets for a trained JEM run as written, on a tiny run."""
    blocks = re.findall(r"```python\n(.*?)```", _readme_section(), flags=re.S)
    assert blocks, "the README section shows Python code"
    runs = set(re.findall(r"jem_ext\.load\(\"([^\"]+)\"", "".join(blocks)))
    assert runs, "the snippet loads a run folder by name"
    for name in runs:
        save_run(tmp_path / name, buffer_classes=None)
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


@pytest.mark.cuda
def test_read_outs_and_samples_never_sync_the_host(run):
    """On a GPU the methods queue work and return device tensors; no call waits for the GPU."""
    t = jem_ext.load(run, device="cuda")
    x = load_dataset("digits", split="test").x[:64].cuda()
    y = torch.arange(64, device="cuda") % 10
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = t.scores(x, batch_size=16)
        e = t.energy(x, y)
        a = t.sample(8, seed=0)
        b = t.sample(8, y=y[:8], from_buffer=True, seed=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.is_cuda for v in (s.probs, s.log_px, e, a, b))
    cpu = jem_ext.load(run, device="cpu").scores(x.cpu())
    torch.testing.assert_close(s.log_px.cpu(), cpu.log_px, rtol=1e-4, atol=1e-4)
