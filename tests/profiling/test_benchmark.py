# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The benchmark command measures what it claims (on small inputs; the benchmark is not a timed test)."""

from __future__ import annotations

import json
import math

import pytest

from qtunet_monai.profiling import benchmark


@pytest.fixture
def small_scenarios(monkeypatch):
    """64^3 inference, the smallest SwinUNETR takes (at 32^3 its bottleneck is one voxel, which its instance norm
    refuses); 32^3 training, the smallest QT-UNet takes: 1/8 of 64^3's work."""
    monkeypatch.setitem(benchmark.SCENARIOS, "infer64", ("infer", 64))
    monkeypatch.setitem(benchmark.SCENARIOS, "train32", ("train", 32))


@pytest.mark.slow
def test_run_benchmark_alternates_models_and_reports_ratios(small_scenarios):
    log = []
    result = benchmark.run_benchmark(
        ["qtunet-tiny", "swinunetr"], ["infer64"], repeats=2, memory=True, flops=True, log=log.append,
    )
    rows = result["scenarios"]["infer64"]
    assert set(rows) == {"qtunet-tiny", "swinunetr"}
    assert rows["swinunetr"]["speedup_vs_swinunetr"] == pytest.approx(1.0)
    for row in rows.values():
        assert len(row["all_seconds"]) == 2 and row["seconds"] > 0
        assert row["peak_memory_mb"] > 0 and math.isfinite(row["peak_memory_mb"])
        assert row["speedup_vs_swinunetr"] == pytest.approx(rows["swinunetr"]["seconds"] / row["seconds"])
        assert row["memory_vs_swinunetr"] == pytest.approx(row["peak_memory_mb"] / rows["swinunetr"]["peak_memory_mb"])
        assert row["mode"] == "eager" and row["kernels_per_step"] > 100 and row["copies_per_step"] >= 0
        assert row["gflop_per_step"] == pytest.approx(2 * row["forward_gflops"])
    assert rows["qtunet-tiny"]["params_m"] == pytest.approx(6.65, rel=0.01)
    # timings alternate: within a repeat every model runs before any model runs again
    timed = [line.split()[-3].rstrip(":") for line in log if "repeat" in line and "infer64" in line]
    assert timed == ["qtunet-tiny", "swinunetr"] * 2
    table = benchmark.to_markdown(result)
    assert "| qtunet-tiny |" in table and "speed-up vs SwinUNETR" in table


@pytest.mark.slow
def test_training_rows_count_three_passes_and_volumes_per_second(small_scenarios):
    """A training step (SwinUNETR's costs minutes on a CPU at 64^3, so QT-UNet-T alone: no ratio)."""
    result = benchmark.run_benchmark(["qtunet-tiny"], ["train32"], repeats=1, memory=True, flops=True)
    row = result["scenarios"]["train32"]["qtunet-tiny"]
    assert row["seconds"] > 0 and row["volumes_per_second"] == pytest.approx(1 / row["seconds"])
    assert row["peak_memory_mb"] > 0 and "speedup_vs_swinunetr" not in row
    assert row["forward_gflops"] > 0 and row["gflop_per_step"] == pytest.approx(2 * 3 * row["forward_gflops"])
    assert row["kernels_per_step"] > 100


@pytest.mark.slow
def test_bench_writes_json_and_markdown(tmp_path, small_scenarios):
    benchmark.bench(models="qtunet-tiny,swinunetr", scenarios="infer64", repeats=1, memory=False, flops=False,
                    out_dir=str(tmp_path), tag="t")
    data = json.loads((tmp_path / "t.json").read_text())
    assert set(data["scenarios"]["infer64"]) == {"qtunet-tiny", "swinunetr"}
    table = (tmp_path / "t.md").read_text()
    assert table.count("| qtunet-tiny |") == 1 and "aten ops/step" in table and "copy_/step" in table


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown scenario 'infer7'"):
        benchmark.run_benchmark(["unet"], ["infer7"])
    with pytest.raises(ValueError, match="unknown model 'vnet'"):
        benchmark.build_model("vnet", 96, "cpu")
