"""Build facts, the torch-version guard and `python -m jem_ext.info`."""

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
    for op in ("sgld_step_", "_sgld_step_philox_", "energy", "energy_ce", "energy_backward"):
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
