"""benchmarks/bench_ops.py: the sgld_step_ row carries the fraction of the memory limit
(1.5 copies' time over the op's, the two interleaved) beside its ratios to eager."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ops.py"


@pytest.fixture(scope="module")
def bench_ops():
    spec = importlib.util.spec_from_file_location("bench_ops", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sgld_row_reports_fraction_of_memory_limit(bench_ops, tmp_path, capsys):
    out = tmp_path / "ops.json"
    argv = ["--threads", "1", "--no-compile", "--no-energy", "--min-time", "0.001"]
    argv += ["--sgld-sizes", "5000", "20000", "--rounds", "3", "--json", str(out)]
    assert bench_ops.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["size"] for r in rows] == [5000, 20000]
    for r in rows:
        assert len(r["rounds"]) == 3
        for key in ("eager_s", "fused_s", "copy_s", "fused_with_copy_s"):
            assert r[key] == statistics.median(x[key] for x in r["rounds"]) > 0
        limit_s = 1.5 * r["copy_s"]  # the op moves 1.5 copies' bytes
        assert r["fraction_of_memory_limit"] == pytest.approx(limit_s / r["fused_with_copy_s"])
        assert r["speedup_vs_eager"] == pytest.approx(r["eager_s"] / r["fused_s"])
        assert r["fused_GBps"] == pytest.approx(3 * r["size"] * 4 / r["fused_s"] / 1e9)
    table = capsys.readouterr().out
    assert "of mem limit" in table
    assert f"{rows[0]['fraction_of_memory_limit']:.0%}" in table


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--rounds", "0"], "--rounds 0: expected a positive integer"),
        (["--sgld-sizes", "0"], "--sgld-sizes 0: expected a positive integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(bench_ops, capsys, argv, message):
    assert bench_ops.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"bench_ops.py: {message}"
