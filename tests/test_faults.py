"""Faults around a run: SIGTERM, full or read-only disks, a run folder removed under a run,
runs stopped before their first checkpoint, --threads beyond the machine.

Each fault must end in one line on stderr (no traceback), a clear exit status, no temporary
files left behind, and nothing lost that could be resumed.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from toy_runs import TOY

import jem_ext._io as jio
from jem_ext import _cli
from jem_ext import train as jtrain
from jem_ext.bench import cli as bench_cli
from jem_ext.checkpoint import load_checkpoint, save_checkpoint
from jem_ext.eval import cli as eval_cli
from jem_ext.eval import writers
from jem_ext.training import loop

ROOT = Path(__file__).resolve().parents[1]
HEX = "0123456789abcdef" * 2  # 32 hex digits, as atomic_path names its temporaries


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if jio.is_temporary(p)]


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _die_at(monkeypatch, iteration: int, action) -> None:
    """Run ``action()`` when the loop reaches ``iteration`` (0-based)."""
    real = loop.learning_rate

    def hooked(cfg, it, epoch, scale=1.0):
        if it == iteration:
            action()
        return real(cfg, it, epoch, scale)

    monkeypatch.setattr(loop, "learning_rate", hooked)


# ------------------------------------------------------------------------------- SIGTERM


def test_sigterm_while_writing_a_checkpoint_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save = jio.torch_save
    saves = []

    def slow_save(obj, path):
        saves.append(path)
        real_save(obj, path)
        if len(saves) == 3:  # the temporary is written, not yet renamed: SIGTERM now
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr("jem_ext.checkpoint.torch_save", slow_save)
    code = jtrain.main(TOY + ["--epochs", "3", "--ckpt-every", "8", "--out", str(run)])
    assert code == 143
    line = _one_line(capsys.readouterr().err)
    assert line == (f"terminated (SIGTERM); continue with: python -m jem_ext.train --resume {run}")
    assert jio.is_temporary(saves[2]) and not saves[2].exists()
    assert _temporaries(run) == []
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 8
    assert not (run / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler given back


def test_sigterm_before_the_first_checkpoint_removes_the_run_folder(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"

    def terminate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler raises at the next bytecode

    monkeypatch.setattr("jem_ext.training.cli.load_data", terminate)
    assert jtrain.main(TOY + ["--out", str(run)]) == 143
    assert _one_line(capsys.readouterr().err) == (
        "terminated (SIGTERM) before training started; nothing was written"
    )
    assert not run.exists()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.1)


def test_sigterm_to_a_training_process(tmp_path):
    """The real thing: ``timeout``'s signal to ``python -m jem_ext.train``; then a stale
    temporary, as SIGKILL leaves one, is removed by the resume, which completes the run."""
    run = tmp_path / "run"
    argv = TOY + ["--epochs", "400", "--ckpt-every", "16", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jem_ext.train", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(run / "checkpoints" / "last.pt", proc)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert _one_line(err) == (
        f"terminated (SIGTERM); continue with: python -m jem_ext.train --resume {run}"
    )
    assert _temporaries(run) == []
    stale = run / "checkpoints" / f".last.pt.{HEX}.tmp.pt"
    stale.write_bytes(b"half a checkpoint")
    staged = run / f".report.{HEX}.tmp"
    staged.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "jem_ext.train", "--resume", str(run), "--epochs", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert _temporaries(run) == [] and not staged.exists()


def test_sigterm_stops_evaluation_without_a_half_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text("{}")  # an earlier report: kept as it was

    def draw_then_terminate(name):
        def draw(path):
            path.write_bytes(b"png")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)

        return (name, draw)

    report = {"seconds": 0.0, "files": []}
    monkeypatch.setattr(eval_cli, "parse_settings", lambda argv: _Settings(out))
    monkeypatch.setattr(
        eval_cli,
        "run",
        lambda s: writers.write_report(out, report, [draw_then_terminate("a.png")]) or report,
    )
    monkeypatch.setattr(writers, "render_markdown", lambda r, images=True: "report")
    assert eval_cli.main([]) == 143
    assert "terminated (SIGTERM); no report was written" in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert (out / "report.json").read_text() == "{}"


class _Settings:
    def __init__(self, out: Path) -> None:
        self.job = SimpleNamespace(out=str(out))


def test_sigterm_handler_exits_a_blocked_main_thread(tmp_path):
    """A main thread stuck in one call (a collective) cannot run the Python handler; the
    watchdog ends the process with 143 after the grace period."""
    script = (
        "import datetime, jem_ext._cli as c, torch.distributed as dist\n"
        "c.TERMINATE_GRACE_S = 0.5\n"
        "store = dist.TCPStore('127.0.0.1', 0, 1, is_master=True)\n"
        "with c.terminate_as_interrupt():\n"
        "    print('ready', flush=True)\n"
        "    try:\n"
        "        store.wait(['never'], datetime.timedelta(seconds=60))  # one call, no handlers\n"
        "    except KeyboardInterrupt:  # SIGTERM came before the call: a clean-up that hangs\n"
        "        store.wait(['never'], datetime.timedelta(seconds=60))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert _one_line(err) == "terminated (SIGTERM): stopped"


# ------------------------------------------------------------------ full and read-only disks


class _FullFile(io.RawIOBase):
    """A file whose writes fail with ``code`` once ``room`` bytes are written."""

    def __init__(self, path, code: int, room: int) -> None:
        self._f = open(path, "wb")  # noqa: SIM115
        self.code, self.room = code, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.room < len(data):
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(data)
        return self._f.write(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def test_torch_save_raises_the_disks_error_not_torchs(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    monkeypatch.setattr(jio, "open", lambda p, mode: _FullFile(p, errno.ENOSPC, 300), raising=False)
    with pytest.raises(OSError) as info:
        save_checkpoint(target, {"w": torch.zeros(10_000)})
    assert info.value.errno == errno.ENOSPC  # not "unexpected pos ..."
    assert not target.exists() and _temporaries(tmp_path) == []
    monkeypatch.undo()
    save_checkpoint(target, {"w": torch.zeros(10)})  # the real path still saves
    assert torch.equal(load_checkpoint(target)["w"], torch.zeros(10))


@pytest.mark.parametrize(
    "code, words", [(errno.ENOSPC, "no space left on the device"), (errno.EROFS, "read-only")]
)
def test_full_or_read_only_disk_stops_training_in_one_line(
    tmp_path, monkeypatch, capsys, code, words
):
    run = tmp_path / "run"
    real_open = open
    calls = []

    def failing_open(path, mode):
        calls.append(path)
        if len(calls) == 3:  # the third checkpoint
            return _FullFile(path, code, 1000)
        return real_open(path, mode)

    monkeypatch.setattr(jio, "open", failing_open, raising=False)
    assert jtrain.main(TOY + ["--epochs", "2", "--ckpt-every", "8", "--out", str(run)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {run / 'checkpoints' / 'last.pt'}: {words}")
    assert line.endswith(f"continue with: python -m jem_ext.train --resume {run}")
    assert _temporaries(run) == []
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 8
    monkeypatch.undo()
    assert jtrain.main(["--resume", str(run)]) == 0  # nothing lost: the run completes
    assert json.loads((run / "summary.json").read_text())["iterations"] == 64


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_failed_writes_of_a_run(tmp_path, monkeypatch, capsys, seed):
    """Seeded fuzz: the k-th file a run moves into place fails with a random errno; always one
    line naming the cause, exit 1, no temporaries, and a resumable run when a checkpoint
    exists."""
    rng = random.Random(seed)
    code = rng.choice([errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EIO])
    k = rng.randint(1, 8)
    run = tmp_path / "run"
    real_replace = os.replace
    count = []

    def failing_replace(src, dst):
        if Path(dst).is_relative_to(run):
            count.append(dst)
            if len(count) == k:
                raise OSError(code, os.strerror(code), str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    argv = TOY + ["--epochs", "2", "--ckpt-every", "8", "--sample-every", "20", "--out", str(run)]
    status = jtrain.main(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err
    if len(count) < k:
        assert status == 0
        return
    assert status == 1, err
    line = _one_line(err)
    assert line.startswith("error: cannot write ") and jio._WRITE_ERRORS[code] in line
    assert f"{count[-1]}:" in line  # the file it was to become, not the temporary
    assert _temporaries(run) == []
    if (run / "checkpoints" / "last.pt").is_file():
        assert "--resume" in line
        assert jtrain.main(["--resume", str(run)]) == 0
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_sigterm_during_the_writes_of_a_run(tmp_path, monkeypatch, capsys, seed):
    """Seeded fuzz: SIGTERM arrives while the run writes its k-th file (the temporary is
    written, the rename not done): exit 143, one line, no temporaries, and the resumed run
    completes when a checkpoint exists."""
    k = random.Random(seed).randint(1, 10)
    run = tmp_path / "run"
    real_replace = os.replace
    count = []

    def interrupted_replace(src, dst):
        if Path(dst).is_relative_to(run):
            count.append(dst)
            if len(count) == k:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler raises here
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    argv = TOY + ["--epochs", "2", "--ckpt-every", "8", "--sample-every", "20", "--out", str(run)]
    status = jtrain.main(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert status == 143, err
    line = _one_line(err)
    assert line.startswith("terminated (SIGTERM)")
    if "--resume" in line:
        assert _temporaries(run) == []
        assert jtrain.main(["--resume", str(run)]) == 0
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    else:
        assert "nothing to resume" in line and not run.exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_evaluation_that_cannot_write_leaves_the_folder_as_it_was(
    tmp_path, monkeypatch, capsys, code
):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text("{}")
    (out / "a.png").write_bytes(b"old")

    def draw(path):
        path.write_bytes(b"new")

    def failing_write(path, text):
        raise OSError(code, os.strerror(code), str(path))

    report = {"seconds": 0.0, "files": ["report.json", "report.md", "a.png"]}
    monkeypatch.setattr(eval_cli, "parse_settings", lambda argv: _Settings(out))
    monkeypatch.setattr(
        eval_cli, "run", lambda s: writers.write_report(out, report, [("a.png", draw)])
    )
    monkeypatch.setattr(writers, "render_markdown", lambda r, images=True: "report")
    monkeypatch.setattr(writers, "atomic_write_text", failing_write)
    assert eval_cli.main([]) == 1
    line = _one_line(capsys.readouterr().err)
    assert jio._WRITE_ERRORS[code] in line and "no report was written" in line
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "report.json"]
    assert (out / "a.png").read_bytes() == b"old"


def test_eval_out_on_a_read_only_file_system(tmp_path, monkeypatch, capsys):
    """``--out`` that cannot be created: one line that says so and where."""
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "eval":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    out = tmp_path / "eval"
    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setattr(eval_cli, "parse_settings", lambda argv: _Settings(out))
    monkeypatch.setattr(eval_cli, "run", lambda s: writers.write_report(out, {"files": []}, []))
    monkeypatch.setattr(writers, "render_markdown", lambda r, images=True: "report")
    assert eval_cli.main([]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"jem_ext.eval: error: cannot write {out}: read-only file system")


# --------------------------------------------------------------- the run folder removed


@pytest.mark.parametrize("what", ["folder", "config", "recreated"])
def test_run_folder_removed_mid_run_stops_without_recreating_it(
    tmp_path, monkeypatch, capsys, what
):
    run = tmp_path / "run"

    def remove():
        if what == "config":
            (run / "config.json").unlink()
        else:
            shutil.rmtree(run)
            if what == "recreated":
                run.mkdir()

    _die_at(monkeypatch, 12, remove)
    assert jtrain.main(TOY + ["--epochs", "2", "--ckpt-every", "8", "--out", str(run)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: run folder {run}")
    assert "config.json was removed" in line if what == "config" else "was removed" in line
    if what == "folder":
        assert not run.exists()  # not recreated with only part of a run in it
    elif what == "recreated":
        assert list(run.iterdir()) == []
    else:
        assert not (run / "summary.json").exists()


# ------------------------------------------------------- a run stopped before its checkpoint


def _killed_before_first_checkpoint(run: Path, with_config: bool) -> None:
    """The folder of ``TOY --out run`` killed (SIGKILL) before its first checkpoint."""
    run.mkdir()
    (run / ".lock").touch()
    if with_config:
        record = {"out": str(run), "global_batch_size": 64, "world_size": 1}
        (run / "config.json").write_text(json.dumps(record))
        (run / "samples").mkdir()
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / f".last.pt.{HEX}.tmp.pt").write_bytes(b"half")


@pytest.mark.parametrize("with_config", [False, True])
def test_resume_before_the_first_checkpoint_says_to_rerun(tmp_path, capsys, with_config):
    run = tmp_path / "run"
    _killed_before_first_checkpoint(run, with_config)
    assert jtrain.main(["--resume", str(run)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == (
        f"error: --resume {run}: the run stopped before its first checkpoint (no "
        f"checkpoints/last.pt), so there is nothing to resume; re-running its command with "
        f"--out {run} starts it afresh"
    )
    # ... and it does
    assert jtrain.main(TOY + ["--epochs", "1", "--out", str(run)]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 32
    assert _temporaries(run) == []


def test_a_folder_with_someone_elses_config_is_not_taken(tmp_path, capsys):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"lr": 0.1}))  # a config file kept there
    assert jtrain.main(TOY + ["--epochs", "1", "--out", str(run)]) == 2
    assert "already exists and is not empty" in _one_line(capsys.readouterr().err)
    assert (run / "config.json").read_text() == json.dumps({"lr": 0.1})


# -------------------------------------------------------------------------------- threads


def test_threads_beyond_the_cores_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_cli, "machine_cores", lambda: 2)
    run = tmp_path / "run"
    assert jtrain.main(TOY + ["--threads", "1000", "--out", str(run)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        "error: --threads 1000: this machine has 2 cores; expected 0 (torch's default) to 2"
    )
    assert not run.exists()
    assert bench_cli.main(["--smoke", "--threads", "3", "--out", str(tmp_path / "b")]) == 2
    assert "--threads 3: this machine has 2 cores" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "b").exists()
    # a run's config that asks for more threads than this machine has: say how to override
    assert jtrain.main(TOY + ["--epochs", "1", "--threads", "2", "--out", str(run)]) == 0
    monkeypatch.setattr(_cli, "machine_cores", lambda: 1)
    assert jtrain.main(["--resume", str(run)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--threads 2: this machine has 1 core;" in line and "give --threads" in line


# ------------------------------------------------------- a real small and read-only disk


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (root only, where mounting is allowed; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip("mount is not permitted here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_real_full_then_read_only_disk(small_disk, capsys):
    run = small_disk / "run"
    argv = ["--dataset", "moons", "--model", "mlp", "--width", "64", "--depth", "3"]
    assert jtrain.main(argv + ["--epochs", "3", "--no-progress", "--out", str(run)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: cannot write ") and "no space left on the device" in line
    assert "unexpected pos" not in line and _temporaries(run) == []
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "eval"
    evaluate = ["--checkpoint", str(run), "--out", str(out), "--tasks", "accuracy", "--no-progress"]
    assert eval_cli.main(evaluate) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"jem_ext.eval: error: cannot write {out}: read-only file system")
    assert not out.exists()


@pytest.mark.parametrize("script", ["bench_ddp.py", "bench_ops.py", "bench_sampler.py"])
def test_benchmark_scripts_refuse_threads_beyond_the_cores(script):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--threads", "100000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr  # argparse's usage, then the one error line
    assert "--threads 100000: this machine has" in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("world", [1, 3])
def test_a_failed_write_and_sigterm_name_the_same_continue_command(tmp_path, monkeypatch, world):
    """The line after a failed write gives the command that continues the job as it was
    launched (torchrun for a job of several processes), as the SIGTERM line does."""
    from types import SimpleNamespace

    from jem_ext.training import cli as train_cli
    from jem_ext.training import distributed

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    monkeypatch.setattr(distributed, "current", lambda: distributed.Dist(world_size=world))
    folder = SimpleNamespace(path=tmp_path)
    prepared = train_cli.Prepared({}, None, {}, folder, None)
    failed = train_cli._write_failed(OSError(errno.ENOSPC, "No space left on device"), prepared)
    stopped = train_cli._interrupted(folder, "terminated (SIGTERM)")
    launch = f"torchrun --nproc-per-node {world}" if world > 1 else "python -m jem_ext.train"
    command = f"continue with: {launch}"
    assert command in failed and command in stopped
    assert failed.endswith(f"--resume {tmp_path}") and stopped.endswith(f"--resume {tmp_path}")
