"""Build facts, the torch-version guard and `python -m jem_ext.info`."""

import os
import subprocess
import sys

import torch

import jem_ext


def test_build_facts_readable():
    info = jem_ext.build_info
    assert jem_ext.__version__ == info["version"]
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert (info["cuda_archs"] != "") == info["cuda"]
    ops = ("sgld_step_", "_sgld_step_philox_", "energy", "energy_ce", "energy_backward")
    for op in (*ops, "_take_label_error"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"jem_ext::{op}", "CPU")
        if info["cuda"]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"jem_ext::{op}", "CUDA")


def test_import_against_another_torch_fails_with_a_message():
    code = "import torch; torch.__version__ = '0.0.1'; import jem_ext"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0
    assert "built against torch" in res.stderr and "0.0.1" in res.stderr


def test_info_cli():
    res = subprocess.run([sys.executable, "-m", "jem_ext.info"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"jem_ext {jem_ext.__version__}" in res.stdout
    assert "sgld_step_" in res.stdout and "energy" in res.stdout
    assert "cpu:" in res.stdout


def run_info(**env) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "JEM_EXT_CPU_LEVEL"}, **env}
    return subprocess.run(
        [sys.executable, "-m", "jem_ext.info"], capture_output=True, text=True, env=env
    )


def test_info_cli_prints_the_cpu_level_in_use():
    best = run_info()
    assert best.returncode == 0, best.stderr
    assert f"CPU level in use: {torch.ops.jem_ext._cpu_level()}" in best.stdout
    forced = run_info(JEM_EXT_CPU_LEVEL="baseline")
    assert forced.returncode == 0, forced.stderr
    assert "CPU level in use: baseline" in forced.stdout


def test_info_cli_unknown_cpu_level_is_one_line_and_exit_2():
    res = run_info(JEM_EXT_CPU_LEVEL="sse9")
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "python -m jem_ext.info: JEM_EXT_CPU_LEVEL=sse9: unknown CPU level "
        "(expected avx512, avx2 or baseline)"
    ]
