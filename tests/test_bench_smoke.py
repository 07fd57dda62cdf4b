"""The one-call bench (python -m jem_ext.bench) in its --smoke mode, so that it cannot rot."""

from __future__ import annotations

import json

import pytest
import torch

from jem_ext import bench


def test_smoke_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    results = json.loads((out / "bench.json").read_text())
    for stage in bench.STAGES:
        assert stage in results and "error" not in results[stage], results[stage]
    chain = results["chain"]
    names = {o.name for o in bench.CPU_OPTIONS if not o.compile}
    assert {"reference"} | names <= set(chain)
    for name in names:
        assert "error" not in chain[name], chain[name]
        assert chain[name]["images_steps_per_s"] > 0 and chain[name]["speedup_vs_reference"] > 0
    ops_r = results["ops"]
    assert ops_r["sgld_step_"]["gbps"] > 0 and ops_r["energy_fwd_bwd"]["fraction_of_copy"] > 0
    for rows, classes in bench.SMOKE.energy_wide:  # the many-class figures
        r = ops_r[f"energy_fwd_bwd_c{classes}"]
        assert (r["rows"], r["classes"]) == (rows, classes) and r["fraction_of_copy"] > 0
    train = results["train"]
    assert train["recipe"]["iterations"] == 782 * 150
    assert train["fp32 eager"]["projected_hours"] > 0
    table = (out / "bench.md").read_text()
    assert "| sgld_step_ |" in table and "| reference |" in table and "projected hours" in table
    assert str(out / "bench.json") in capsys.readouterr().out


def test_failing_stage_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    def broken(device, sizes):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(bench.cli, "stage_ops", broken)
    out = tmp_path / "bench"
    assert bench.main(["--smoke", "--stages", "env,ops,train", "--out", str(out)]) == 0
    results = json.loads((out / "bench.json").read_text())
    assert "no kernel image" in results["ops"]["error"]
    assert "error" not in results["train"] and "error" not in results["env"]
    assert "ops error: RuntimeError: no kernel image" in (out / "bench.md").read_text()


def test_spent_budget_skips_options_and_partial_results_are_written(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    seen = []
    write = bench.write_results

    def spy(folder, results):
        seen.append(json.loads(json.dumps(sorted(results))))
        write(folder, results)

    monkeypatch.setattr(bench.cli, "write_results", spy)
    assert (
        bench.main(["--smoke", "--stages", "env,chain", "--budget-s", "1e-9", "--out", str(out)])
        == 0
    )
    results = json.loads((out / "bench.json").read_text())
    assert "images_steps_per_s" in results["chain"]["reference"]
    assert all("skipped" in r for k, r in results["chain"].items() if k != "reference")
    assert "skipped: time budget" in (out / "bench.md").read_text()
    assert len(seen) == 2 and "chain" not in seen[0]  # written after each stage


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stages", "env,warp"], "unknown warp"),
        (["--reps", "0"], "--reps"),
        (["--depth", "11"], "--depth: expected 6n + 4"),
        (["--budget-s", "0"], "--budget-s"),
        (["--options", "warp speed"], "--options: unknown warp speed"),
        (["--options", ","], "--options: unknown empty list"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    assert bench.main(["--smoke", "--out", str(tmp_path / "b"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_options_selects_option_sets_by_name(tmp_path):
    out = tmp_path / "bench"
    argv = ["--smoke", "--stages", "chain", "--options", "bf16", "--out", str(out)]
    assert bench.main(argv) == 0
    chain = json.loads((out / "bench.json").read_text())["chain"]
    assert set(chain) == {"reference", "bf16"} and "error" not in chain["bf16"]


def test_default_sizes_measure_bandwidth_beyond_the_l2_cache():
    # 64 MB or more per tensor: an H100's 50-60 MB L2 cannot hold the operands
    sizes = bench.Sizes()
    assert 4 * sizes.sgld_elements >= 64 * 2**20
    for rows, classes in ((sizes.energy_rows, sizes.energy_classes), *sizes.energy_wide):
        assert rows * classes >= 16 * 2**20
    timing = bench.timing.time_stream(lambda: None, torch.device("cpu"), 3)
    assert timing["reps"] == 3 and timing["mean_s"] >= 0


def test_model_factory_is_timed_instead_of_the_wrn(tmp_path, monkeypatch, capsys):
    from factory_models import MODULE, write_factories

    write_factories(tmp_path, monkeypatch)
    out = tmp_path / "bench"
    argv = ["--smoke", "--stages", "env,chain,train", "--out", str(out)]
    assert bench.main([*argv, "--model", f"{MODULE}:conv"]) == 0
    results = json.loads((out / "bench.json").read_text())
    assert results["env"]["sizes"]["model"] == f"{MODULE}:conv"
    assert "error" not in results["chain"]["fp32 eager"], results["chain"]
    assert "error" not in results["train"]["fp32 eager"], results["train"]
    assert f"Model: {MODULE}:conv" in (out / "bench.md").read_text()
    capsys.readouterr()
    for extra, message in (
        (["--model", f"{MODULE}:wrong_classes"], "expected float logits [2, 10]"),
        (["--model", "nowhere:net"], "--model nowhere:net: no module named 'nowhere'"),
        (["--model", f"{MODULE}:conv", "--depth", "10"], "--depth: apply to the WRN"),
    ):
        fresh = tmp_path / "refused"
        assert bench.main(["--smoke", "--out", str(fresh), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not fresh.exists()
