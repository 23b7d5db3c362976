"""Evaluation at a site: only whitelisted aggregates come back; the closest-pairs PNGs stay at the site."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.evaluate import CONDITION_KEYS, EvalSettings, check_keys, run_site_evaluation
from common.model import load_ldm, model_configs


def test_a_site_returns_aggregates_for_its_held_out_conditions(tiny_sites: Path, tiny_base: Path) -> None:
    ldm = load_ldm(tiny_base)
    settings = EvalSettings(samples_per_condition=3, steps=2, min_subjects=1, few_shot_k=1, few_shot_repeats=1)
    yaml_path = str(tiny_sites / "tiny-a.yaml")
    site_id, metrics, private = run_site_evaluation(
        yaml_path, model_configs(tiny_base), ldm.vae.state_dict(), ldm.denoiser.state_dict(), settings
    )
    assert site_id == "tiny-a"
    conditions = {tuple(k.split("/")[:2]) for k in metrics if k.count("/") == 2}
    assert conditions and all(m in {"T1w", "T1ce", "T2w", "FLAIR"} for m, _ in conditions)
    for modality, pathology in conditions:
        row = {k.split("/")[2]: v for k, v in metrics.items() if k.startswith(f"{modality}/{pathology}/")}
        assert set(row) == set(CONDITION_KEYS)
        assert row["n_generated"] == 3 and row["n_heldout_subjects"] == 1
        assert 0 <= row["adherence_modality"] <= 1 and 0 <= row["memorized"] <= 1
        assert (private / f"closest_{modality}_{pathology}.png").exists()
    assert 0 <= metrics["utility_real_only"] <= 1 and metrics["utility_k"] == 1
    assert any(k.startswith("held/T1w/") for k in metrics)
    assert private.is_relative_to(tiny_sites)  # the PNGs of patient slices stay beside the site's YAML


def test_only_whitelisted_keys_may_leave() -> None:
    check_keys({"T1w/healthy/fd": 1.0, "utility_real_only": 0.5, "held/T1w/healthy/2": 1.0})
    with pytest.raises(ValueError, match="not on the whitelist"):
        check_keys({"T1w/healthy/closest_subject": 3.0})
