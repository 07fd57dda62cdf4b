"""Tests of data-parallel training (jem_ext.training.distributed, .shards and .collectives):
2 CPU processes over gloo.

The jobs are launched as torchrun launches them: one ``python`` process per rank with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set (and once through
torchrun itself). Each process runs ``jem_ext.train.main``; a small plan passed on its command
line installs test hooks in that process only (dying at an iteration, a corrupted loss on one
rank, saving its final weights), so the product has no test flags.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jem_ext import data as jdata
from jem_ext import train as jtrain
from jem_ext.checkpoint import load_checkpoint, model_from_checkpoint, replay_buffer_samples
from jem_ext.training import distributed, shards
from jem_ext.training.config import read_config_file
from jem_ext.training.distributed import Dist
from jem_ext.training.options import DataOptions

ROOT = Path(__file__).resolve().parents[1]

# A tiny JEM on the 8x8 digits: 20 iterations per epoch of a 4-channel SmallCNN.
TINY = [
    "--model",
    "small_cnn",
    "--width",
    "4",
    "--batch-size",
    "64",
    "--sgld-steps",
    "2",
    "--buffer-size",
    "200",
    "--warmup-iters",
    "5",
    "--no-progress",
    "--log-every",
    "1",
    "--sample-every",
    "0",
    "--seed",
    "3",
]

# Runs inside each launched process: installs the plan's hooks, then runs the trainer.
WORKER = r"""
import itertools, json, os, sys, time
import torch
from jem_ext import objectives, train as jtrain
from jem_ext.training import collectives, loop, trainer

plan, argv = json.loads(sys.argv[1]), sys.argv[2:]
rank = int(os.environ["RANK"])
restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
if rank in plan.get("exit_ranks", []) and not (plan.get("first_attempt") and restarted):
    real_lr = loop.learning_rate
    def dying_lr(cfg, iteration, epoch, scale=1.0):
        if iteration == plan["exit_at"]:
            os._exit(9)  # as if killed: no clean-up at all
        return real_lr(cfg, iteration, epoch, scale)
    loop.learning_rate = dying_lr
if rank in plan.get("stall_ranks", []):
    real_lr_ = loop.learning_rate
    def stalling_lr(cfg, iteration, epoch, scale=1.0):
        if iteration == plan["stall_at"]:
            time.sleep(plan["stall_s"])  # a process that stops answering
        return real_lr_(cfg, iteration, epoch, scale)
    loop.learning_rate = stalling_lr
if rank == plan.get("nan_rank"):
    real_loss, calls = objectives.batch_loss, itertools.count()
    def corrupted(*args, **kwargs):
        loss, terms = real_loss(*args, **kwargs)
        if next(calls) == plan["nan_at"]:
            loss, terms = loss * float("nan"), {**terms, "loss": float("nan")}
        return loss, terms
    objectives.batch_loss = corrupted
if plan.get("eval_batch"):
    collectives.EVAL_BATCH = plan["eval_batch"]
if plan.get("dump"):
    real_summarise = trainer.summarise
    def dumping(run, status, error):
        torch.save(run.ctx.model_for_chain.state_dict(), f"{plan['dump']}{rank}.pt")
        return real_summarise(run, status, error)
    trainer.summarise = dumping
sys.exit(jtrain.main(argv))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_without_rank() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    env = _env_without_rank()
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    return env


def launch(
    argv: list[str], plan: dict | None = None, world: int = 2, timeout: float = 240
) -> list[subprocess.CompletedProcess]:
    """Run one job of ``world`` processes; returns each rank's completed process."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(plan or {}), *argv],
            cwd=ROOT,
            env=_env(r, world, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results, started = [], time.perf_counter()
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done = subprocess.CompletedProcess(p.args, p.returncode, out, err)
            done.seconds = time.perf_counter() - started  # when rank 0 ended, for rank 0
            results.append(done)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ok(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]


# ------------------------------------------------------------------------- whole jobs
# Starting a process costs more than a tiny run, so the tests share the jobs they can.

JOB = TINY + ["--epochs", "2", "--ckpt-every", "7"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted 2-process job of 2 epochs; each process saves its final weights."""
    tmp = tmp_path_factory.mktemp("full")
    run = tmp / "run"
    results = launch(JOB + ["--out", str(run)], plan={"dump": str(tmp / "rank"), "eval_batch": 64})
    _ok(results)
    return run, results, tmp


def test_two_processes_train_one_model(full):
    run, results, tmp = full
    # the start line says what the batch means, once (rank 0)
    assert "global batch, 32 per process" in results[0].stderr
    assert "global batch" not in results[1].stderr and results[1].stdout == ""
    # the processes end with identical weights, and the checkpoint holds them
    w0, w1 = (torch.load(tmp / f"rank{r}.pt") for r in (0, 1))
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]) and torch.equal(w0[k], ckpt["model"][k]), k
    assert ckpt["iteration"] == 40  # 1258 rows in global batches of 64: as a single process
    assert len([r for r in _rows(run) if "loss" in r]) == 40  # one row per iteration
    # the checkpoint gathered both buffer shards (whole buffer in the single-process layout)
    assert ckpt["distributed"]["world_size"] == 2
    assert ckpt["distributed"]["shard_rows"] == [100, 100]
    assert len(ckpt["distributed"]["rng"]) == 2
    assert replay_buffer_samples(ckpt).shape == (200, 1, 8, 8)
    # config.json and summary.json record the launch; config.json still repeats the run
    cfg = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    for record in (cfg, summary):
        assert record["world_size"] == 2 and record["global_batch_size"] == 64
        assert record["batch_size_per_process"] == 32
    assert "world_size" not in read_config_file(run / "config.json")


def test_reduced_metrics_equal_a_single_process_evaluation(full):
    run = full[0]
    summary = json.loads((run / "summary.json").read_text())
    model = model_from_checkpoint(load_checkpoint(run / "checkpoints" / "last.pt"))
    datasets = jtrain.load_data(DataOptions(dataset="digits"), seed=3)
    # the processes evaluated batches of 64 rows, the single process evaluates all at once
    assert summary["test_accuracy"] == jtrain.accuracy(model, datasets["test"])
    assert summary["val_accuracy"] == jtrain.accuracy(model, datasets["val"])
    val_rows = [r for r in _rows(run) if "val_accuracy" in r]
    assert val_rows[-1]["val_accuracy"] == summary["val_accuracy"]


def test_killed_job_resumes_bitwise_under_torchrun(full, tmp_path):
    cut = tmp_path / "cut"
    # both processes die at iteration 25; the last checkpoint is at iteration 21
    killed = launch(JOB + ["--out", str(cut)], plan={"exit_ranks": [0, 1], "exit_at": 25})
    assert [r.returncode for r in killed] == [9, 9]
    assert load_checkpoint(cut / "checkpoints" / "last.pt")["iteration"] == 21
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "-m",
            "jem_ext.train",
            "--resume",
            str(cut),
            "--no-progress",
        ],
        cwd=ROOT,
        env=_env_without_rank(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_checkpoint(full[0] / "checkpoints" / "last.pt")
    b = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert a["iteration"] == b["iteration"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(replay_buffer_samples(a), replay_buffer_samples(b))
    for ra, rb in zip(a["distributed"]["rng"], b["distributed"]["rng"]):
        for name in ra["generators"]:
            assert torch.equal(ra["generators"][name], rb["generators"][name])

    def strip(rows):
        return [
            {k: v for k, v in r.items() if k != "seconds"}
            for r in rows
            if r.get("event") != "resume"
        ]

    assert strip(_rows(cut)) == strip(_rows(full[0]))


def _torchrun_command(args: list[str]) -> list[str]:
    """The venv's torchrun (as ``python -m torch.distributed.run``) on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        *args,
    ]


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run :func:`_torchrun_command` to its end, output captured."""
    return subprocess.run(
        _torchrun_command(args),
        cwd=ROOT,
        env={**_env_without_rank(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_elastic_restart_resumes_from_the_last_checkpoint(full, tmp_path):
    """torchrun --max-restarts 1, one process killed at iteration 25: the restarted job
    continues from last.pt (iteration 21), says so once, and ends as the uninterrupted job."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    run = tmp_path / "run"
    plan = {"exit_ranks": [1], "exit_at": 25, "first_attempt": True}
    done = _torchrun(
        ["--nproc-per-node", "2", "--max-restarts", "1", str(worker), json.dumps(plan)]
        + JOB
        + ["--out", str(run)]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "connectFullMesh" not in done.stderr
    assert done.stderr.count("torchrun restarted the job") == 1
    assert "(restart 1 of 1): resuming" in done.stderr and "(iteration 21)" in done.stderr
    a = load_checkpoint(full[0] / "checkpoints" / "last.pt")
    b = load_checkpoint(run / "checkpoints" / "last.pt")
    assert a["iteration"] == b["iteration"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(replay_buffer_samples(a), replay_buffer_samples(b))
    resumes = [r for r in _rows(run) if r.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["iteration"] == 21


def test_a_job_that_may_restart_needs_an_out_folder(tmp_path, capsys, monkeypatch):
    _as_rank_of(monkeypatch, 2)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.chdir(tmp_path)
    assert jtrain.main(TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --out: needed when torchrun may restart the job (--max-restarts 3): the "
        "restarted processes resume from the run folder"
    ]
    assert not (tmp_path / "runs").exists()


def test_command_line_error_under_torchrun_is_printed_once(tmp_path):
    """A batch of 64 does not split over 3 processes: rank 0 says so, every rank exits 2."""
    run = tmp_path / "run"
    done = _torchrun(["--nproc-per-node", "3", "-m", "jem_ext.train"] + TINY + ["--out", str(run)])
    message = "error: --batch-size 64: the global batch must be a multiple of the 3 processes"
    assert done.stderr.count(message) == 1, done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr  # torchrun's report (it stops the others itself)
    assert not run.exists()
    # launched directly, every process exits 2 and only rank 0 speaks
    results = launch(TINY + ["--out", str(run)], world=3, timeout=60)
    assert [r.returncode for r in results] == [2, 2, 2]
    assert results[0].stderr.strip() == message
    assert results[1].stderr == results[2].stderr == ""
    assert not run.exists()


def test_sigterm_to_torchrun_stops_the_job_cleanly(tmp_path):
    """SIGTERM to torchrun reaches every process: rank 0 prints the resume command once, and
    no temporary file is left in the run folder."""
    run = tmp_path / "run"
    command = _torchrun_command(
        ["--nproc-per-node", "2", "-m", "jem_ext.train", *TINY, "--epochs", "100"]
        + ["--ckpt-every", "3", "--out", str(run)]
    )
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**_env_without_rank(), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        end = time.time() + 90
        while not (run / "checkpoints" / "last.pt").exists():
            assert proc.poll() is None and time.time() < end, proc.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    line = (
        "terminated (SIGTERM); continue with: torchrun --nproc-per-node 2 -m jem_ext.train "
        f"--resume {run}"
    )
    assert err.count(line) == 1, err[-3000:]
    assert "Unable to shutdown process" not in err  # every process left before SIGKILL
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] >= 3


def test_resume_with_another_world_size_reshards(full, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full[0], run)
    before = replay_buffer_samples(load_checkpoint(run / "checkpoints" / "last.pt"))
    # continue the 2-process run in this single process
    assert jtrain.main(["--resume", str(run), "--epochs", "3"]) == 0
    err = capsys.readouterr().err
    assert "written by 2 processes and this run has 1" in err and "re-sharded" in err
    after = load_checkpoint(run / "checkpoints" / "last.pt")
    assert after["iteration"] == 60 and "distributed" not in after
    resume = [r for r in _rows(run) if r.get("event") == "resume"]
    assert [(r["world_size"], r["checkpoint_world_size"]) for r in resume] == [(1, 2)]
    assert replay_buffer_samples(after).shape == before.shape


def test_two_processes_make_the_single_process_update_on_the_global_batch(tmp_path):
    # Cross-entropy without augmentation: each iteration's averaged gradient over the two
    # halves is the gradient of the whole batch, so the weights follow the single process's.
    args = TINY + ["--objective", "ce", "--no-augment", "--epochs", "1"]
    _ok(launch(args + ["--out", str(tmp_path / "two")]))
    assert jtrain.main(args + ["--out", str(tmp_path / "one")]) == 0
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


def test_divergence_on_one_process_is_recovered_on_all(tmp_path):
    run = tmp_path / "nan"
    results = launch(
        TINY + ["--epochs", "1", "--ckpt-every", "4", "--out", str(run)],
        plan={"nan_rank": 1, "nan_at": 10, "dump": str(tmp_path / "rank")},
    )
    _ok(results)
    events = [r for r in _rows(run) if r.get("event")]
    assert len(events) == 1 and events[0]["event"] == "recovery"
    assert events[0]["iteration"] == 10
    assert events[0]["reason"].startswith("process 1: non-finite loss")
    assert json.loads((run / "summary.json").read_text())["recoveries"] == 1
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in w0:
        assert torch.isfinite(w0[k]).all() and torch.equal(w0[k], w1[k]), k


def test_a_dying_process_stops_the_job_with_a_clear_message(tmp_path):
    results = launch(
        TINY + ["--epochs", "2", "--dist-timeout", "20", "--out", str(tmp_path / "run")],
        plan={"exit_ranks": [1], "exit_at": 5},
        timeout=120,
    )
    assert results[1].returncode == 9
    assert results[0].returncode == 1, results[0].stderr[-2000:]
    lines = results[0].stderr.strip().splitlines()
    assert lines[-1].startswith("error: process 0 of 2: communication with the other processes")
    assert "Traceback" not in results[0].stderr


def test_a_stalled_process_times_out_the_job(tmp_path):
    results = launch(
        TINY + ["--epochs", "2", "--dist-timeout", "5", "--out", str(tmp_path / "run")],
        plan={"stall_ranks": [1], "stall_at": 5, "stall_s": 25},
        timeout=120,
    )
    assert results[0].returncode == 1, results[0].stderr[-2000:]
    last = results[0].stderr.strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 2: communication with the other processes")
    assert "--dist-timeout 5 s" in last
    # rank 0 gave up after about 5 s, long before rank 1 woke up (and failed in turn)
    assert results[1].returncode == 1
    assert results[1].seconds - results[0].seconds > 10


# ------------------------------------------------------------------------------ units


def test_single_process_does_not_initialise_torch_distributed(tmp_path):
    assert "WORLD_SIZE" not in os.environ
    assert jtrain.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert not torch.distributed.is_initialized()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert "distributed" not in ckpt and replay_buffer_samples(ckpt).shape[0] == 200


@pytest.mark.parametrize(
    "n, batch, world",
    [(1258, 64, 2), (130, 64, 2), (129, 64, 2), (128, 64, 4), (131, 32, 4), (10, 4, 1)],
)
def test_ranks_share_out_every_batch(n, batch, world):
    data = jdata.ImageData(
        torch.arange(n).float().view(n, 1), torch.zeros(n, dtype=torch.long), 1, "toy", ["0"]
    )
    single = [
        idx for _, _, idx in jdata.batches(data, batch, generator=torch.Generator().manual_seed(0))
    ]
    shares = [
        [
            idx
            for _, _, idx in jdata.batches(
                data, batch, rank=r, world_size=world, generator=torch.Generator().manual_seed(0)
            )
        ]
        for r in range(world)
    ]
    steps = jdata.num_batches(n, batch, world_size=world)
    assert all(len(s) == steps for s in shares)  # every rank runs the same iterations
    for step in range(steps):
        together = torch.cat([s[step] for s in shares])
        assert sorted(together.tolist()) == sorted(single[step].tolist())
        assert len({len(s[step]) for s in shares}) <= 2
    # only an epoch's last batch shorter than the world is skipped
    assert steps == len(single) - (1 if n % batch and n % batch < world else 0)


@pytest.mark.parametrize("classes, rows, world", [(1, 200, 2), (1, 7, 3), (10, 5, 2), (3, 4, 4)])
def test_buffer_shards_merge_to_the_single_process_layout(classes, rows, world):
    whole = torch.randn(classes * rows, 2, 3)
    parts = [shards.split_buffer(whole, classes, Dist(r, world)) for r in range(world)]
    sizes = [
        shards.buffer_shard_size(classes * rows, classes, Dist(r, world)) for r in range(world)
    ]
    assert [len(s) for s in parts] == sizes and sum(sizes) == classes * rows
    for s in parts:  # each shard keeps the class-major layout of a class-split buffer
        per = len(s) // classes
        for c in range(classes):
            rows_c = whole.view(classes, rows, 2, 3)[c]
            assert all(any(torch.equal(x, y) for y in rows_c) for x in s[c * per : (c + 1) * per])
    assert torch.equal(shards.merge_buffer(parts, classes), whole)


def test_generator_seeds_differ_by_rank_and_keep_rank_0():
    assert shards.generator_seed(104, 0) == 104
    seeds = {shards.generator_seed(104, r, i) for r in range(8) for i in range(3)}
    assert len(seeds) == 24


def test_more_processes_than_gpus_is_refused():
    with pytest.raises(distributed.LaunchError, match="only 1 CUDA device is visible"):
        distributed.check_devices(2, 1)
    distributed.check_devices(2, 2)


def test_config_checks_for_a_job():
    cfg = jtrain.config_from_args([])
    distributed.check_config(cfg, 2)
    with pytest.raises(distributed.LaunchError, match="multiple of the 3 processes"):
        distributed.check_config(cfg, 3)
    with pytest.raises(distributed.LaunchError, match="--buffer-size 20: too small"):
        distributed.check_config(cfg.replace(batch_size=40, buffer_size=20), 4, classes=10)


def test_help_says_what_the_batch_size_means(capsys):
    with pytest.raises(SystemExit):
        jtrain.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "under torchrun the global batch" in text and "--dist-timeout" in text


def _as_rank_of(monkeypatch, world: int) -> None:
    """Make this process look like one torchrun launched (before it would join the job)."""
    for key, value in dict(WORLD_SIZE=world, LOCAL_WORLD_SIZE=world, RANK=0, LOCAL_RANK=0).items():
        monkeypatch.setenv(key, str(value))


def test_batch_that_does_not_split_is_refused(tmp_path, capsys, monkeypatch):
    _as_rank_of(monkeypatch, 2)
    assert jtrain.main(TINY + ["--batch-size", "63", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --batch-size 63: the global batch must be a multiple of the 2 processes"]
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()


def test_more_processes_than_gpus_is_refused_at_launch(tmp_path, capsys, monkeypatch):
    _as_rank_of(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert jtrain.main(TINY + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --nproc-per-node 2: only 1 CUDA device")
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()


def test_a_job_with_a_factory_model_and_tensorboard(tmp_path, monkeypatch):
    """Each process builds the factory's model; rank 0 alone prints the BatchNorm note and
    writes the TensorBoard event files and curves.png."""
    pytest.importorskip("tensorboard")
    from factory_models import MODULE, write_factories

    write_factories(tmp_path, monkeypatch)  # PYTHONPATH reaches the launched processes
    run = tmp_path / "run"
    argv = [*TINY, "--epochs", "1", "--sample-every", "10", "--tensorboard", "--out", str(run)]
    argv[argv.index("small_cnn")] = f"{MODULE}:with_batchnorm"
    del argv[argv.index("--width") : argv.index("--width") + 2]
    results = launch(argv)
    _ok(results)
    assert results[0].stderr.count("BatchNorm layer") == 1
    assert "BatchNorm" not in results[1].stderr
    assert len(list((run / "tensorboard").iterdir())) == 1
    assert (run / "curves.png").is_file()
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["model_spec"]["name"].endswith(
        ":with_batchnorm"
    )
