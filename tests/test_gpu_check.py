"""benchmarks/gpu_check.sh as the GPU machine runs it, on the CPU: its pre-flight and its
--smoke path (the real script file, a ``python3`` interpreter through PYTHON, no network),
and the summary it writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_summary  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _python3() -> str:
    """This interpreter under the name the GPU machine uses (python3)."""
    exe = Path(sys.executable)
    named = exe.with_name("python3")
    return str(named if named.exists() else exe)


def _run(args, tmp_path, python=None, timeout=240):
    env = {
        **os.environ,
        "PYTHON": python or _python3(),
        "TMPDIR": str(tmp_path),
        "PIP_NO_INDEX": "1",
        "no_proxy": "*",
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_smoke_path_runs_every_step_and_archives_the_folder(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--smoke", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    status = {s[0]: s[1] for s in steps}
    assert [s[0] for s in steps] == [
        "preflight",
        "build",
        "info",
        "tests",
        "sanitize_cpu",
        "bench",
        "compile",
    ]
    assert all(status[k] == "ok" for k in ("preflight", "info", "tests", "sanitize_cpu", "bench"))
    # -m cuda selects exactly the CUDA tests: here every selected one is skipped, none runs
    tests_log = (out / "tests.log").read_text()
    assert "skipped" in tests_log and "deselected" in tests_log and " passed" not in tests_log
    assert "sanitize_ops: ok (cpu)" in (out / "sanitize_cpu.log").read_text()
    bench = json.loads((out / "bench.json").read_text())
    assert bench["ops"]["sgld_step_"]["fraction_of_copy"] > 0
    summary = (out / "summary.md").read_text()
    assert "| tests | ok |" in summary and "sgld_step_ fraction of copy bandwidth" in summary
    assert ">= 0.85" in summary and "<= 4" in summary and ">= 3x" in summary
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"out/summary.md", "out/steps.tsv", "out/tests.log", "out/bench.json"} <= names
    # nothing of the build or test work folder is left behind
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_missing_interpreter_fails_the_preflight_in_one_line(tmp_path):
    proc = _run([str(tmp_path / "out")], tmp_path, python=str(tmp_path / "no" / "python3"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "interpreter" in lines[0] and "no/python3" in lines[0], lines
    assert "preflight\tFAIL" in (tmp_path / "out" / "steps.tsv").read_text()


def test_full_mode_without_a_gpu_fails_the_preflight_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run([str(tmp_path / "out")], tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: pre-flight: "), lines
    assert "CUDA" in lines[0] or "nvcc" in lines[0]
    assert (tmp_path / "out" / "summary.md").exists()


@pytest.mark.parametrize("args", [["--fast"], ["a", "b"]])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args):
    proc = _run(args, tmp_path, timeout=30)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "gpu_check:" in proc.stderr


def test_summary_puts_headline_figures_beside_their_targets(tmp_path):
    bench = {
        "ops": {
            "copy": {"gbps": 3000.0, "elements": 16 * 2**20},
            "sgld_step_": {"fraction_of_copy": 0.9},
            "energy_fwd_bwd": {"fraction_of_copy": 0.5, "rows": 2**21, "classes": 10},
        },
        "chain": {"bf16 + cuda-graph": {"speedup_vs_reference": 3.5}},
        "train": {"bf16 + cuda-graph": {"projected_hours": 5.0}},
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "steps.tsv").write_text("preflight\tok\t2\t\nbuild\tFAIL (exit 1)\t30\tnvcc died\n")
    assert gpu_summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "| build | FAIL (exit 1) | 30 | nvcc died |" in text
    assert "| sgld_step_ fraction of copy bandwidth | 0.9 | >= 0.85 | yes |" in text
    assert "energy fwd+bwd 2097152 x 10, fraction | 0.5 | >= 0.70 | **NO** |" in text
    assert "vs eager reference sampler (x) | 3.5 | >= 3x | yes |" in text
    assert "(GPU-hours) | 5 | <= 4 | **NO** |" in text
    assert gpu_summary.main([str(tmp_path / "missing")]) == 2
