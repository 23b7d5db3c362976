"""`fedmri bench`: every key, measured for real at smoke sizes; stdout carries only the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulation import bench
from simulation.cli import app

KEYS = ("dp_step_over_plain_step", "dp_step_over_plain_step_with_multiplicity", "multiplicity_signal",
        "upload_bytes_per_round", "federation_overhead", "calibration", "fresh_process_rounds", "sampler_speedup",
        "scale", "machine")  # fmt: skip


@pytest.mark.slow  # real processes (Ray, fresh Python workers)
def test_bench_measures_every_key_at_smoke_sizes(tmp_path: Path) -> None:
    sizes = bench.BenchSizes(batch=2, step_repeats=1, memory_modes=("lora",), overhead_steps=1, sampler_samples=1,
                             ddpm_steps=10, scale_counts=(2,), scale_subjects=3, scale_steps=1, multiplicity_repeats=1,
                             signal_subjects=3, signal_repeats=1, fresh_rounds=1, fresh_subjects=3, fresh_steps=1,
                             calibration_accountant="rdp")  # fmt: skip
    result = json.loads(json.dumps(bench.run_bench(sizes, tmp_path, progress=lambda _: None)))
    assert all(key in result for key in KEYS)
    steps = result["dp_step_over_plain_step"]
    for mode in bench.MODES:
        assert steps[mode]["dp_step_s"] > 0 and steps[mode]["plain_step_s"] > 0
        assert steps[mode]["dp_torch_noise_step_s"] > 0 and steps[mode]["secure_noise_over_torch_noise"] > 0
    assert steps["lora"]["peak_memory"]["dp_step_peak_mib"] > 0
    multiplied = result["dp_step_over_plain_step_with_multiplicity"]
    assert multiplied["rows"] == 2 * multiplied["slices_per_subject"] * multiplied["noise_draws"]
    assert multiplied["dp_step_s"] > 0 and multiplied["ratio"] > 0
    signal = result["multiplicity_signal"]["table"]
    assert {(r["mode"], r["slices_per_subject"], r["noise_draws"], r["clip"]) for r in signal} == {
        (mode, k, m, c) for mode in ("attention", "conditioning") for k, m in bench.MULTIPLICITIES for c in bench.CLIPS
    }
    dimension = result["multiplicity_signal"]["dimension"]
    assert 0 < dimension["conditioning"] < dimension["attention"]
    assert all(abs(r["aligned"]) <= 1 and r["median_subject_grad_norm"] > 0 for r in signal)
    uploads = result["upload_bytes_per_round"]
    assert uploads["full"]["bytes"] > uploads["attention"]["bytes"] > uploads["lora"]["bytes"] > 0
    assert uploads["lora"]["full_over_mode"] >= 50  # the lora target holds by construction of rank-4 adapters
    overhead = result["federation_overhead"]
    assert overhead["simulated_round_s"] > 0 and overhead["standalone_round_s"] > 0
    calibration = result["calibration"]
    assert (
        calibration["bisect"]["sigma"] / 1.01 <= calibration["secant"]["sigma"] <= calibration["bisect"]["sigma"] * 1.01
    )
    fresh = result["fresh_process_rounds"]["1"]
    assert fresh["status"] == "trained" and fresh["imports_s"] > 0 and fresh["site_round_s"] > 0
    assert fresh["process_wall_s"] > fresh["imports_s"] + fresh["site_data_s"] + fresh["site_round_s"]
    sampler = result["sampler_speedup"]
    assert sampler["ddpm"]["steps"] == 10 and 0 <= sampler["dpm++"]["modality_adherence"] <= 1
    assert result["scale"]["2"]["accepted"] == 2 and result["scale"]["2"]["peak_rss_mib"] > 100
    assert result["machine"]["cores"] >= 1 and result["machine"]["device"] in ("cpu", "cuda")


def test_the_cli_prints_only_json_on_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    def noisy(sizes: bench.BenchSizes, work: Path | None, progress, device: str) -> dict:
        print("a progress line that must not reach stdout")
        progress("stage")
        return {"quick": sizes == bench.BenchSizes.quick()}

    monkeypatch.setattr(bench, "run_bench", noisy)
    result = CliRunner().invoke(app, ["bench", "--quick"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"quick": True}
