"""Evaluation at a site: only whitelisted aggregates come back; the closest-pairs PNGs stay at the site."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.evaluate import CONDITION_KEYS, check_keys, run_site_evaluation
from common.model import load_ldm, model_configs
from common.protocol import EvalRequest


def test_a_site_returns_aggregates_for_its_held_out_conditions(
    tiny_sites: Path, source_base: Path, tmp_path: Path
) -> None:
    """A model with the source branch is also scored on translation, if the site's policy opts in
    (tiny-a does, as the demo hospitals do); a site that does not opt in answers the rest only."""
    ldm = load_ldm(source_base)
    settings = EvalRequest(
        3, steps=2, min_subjects=1, few_shot_k=1, few_shot_repeats=1, model_configs=model_configs(source_base)
    )
    yaml_path = str(tiny_sites / "tiny-a.yaml")
    site_id, metrics, private = run_site_evaluation(
        yaml_path, settings, ldm.vae.state_dict(), ldm.denoiser.state_dict()
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
    assert "translate/T1w+T2w/FLAIR/ssim" in metrics
    opted_out = _site_with(tiny_sites, tmp_path, evaluate_translation=False, min_eval_subjects=1)
    _, without, _ = run_site_evaluation(opted_out, settings, ldm.vae.state_dict(), ldm.denoiser.state_dict())
    assert not [k for k in without if k.startswith("translate/")] and set(without) == set(metrics) - {
        k for k in metrics if k.startswith("translate/")
    }


def test_only_whitelisted_keys_may_leave() -> None:
    check_keys({"T1w/healthy/fd": 1.0, "utility_real_only": 0.5, "held/T1w/healthy/2": 1.0,
                "translate/T1w+T2w/FLAIR/ssim": 0.8})  # fmt: skip
    for key in ("T1w/healthy/closest_subject", "translate/T1w+T2w/FLAIR/subject_ssim",
                "translate/sub-07/FLAIR/ssim", "translate/T1w/sub-07/psnr"):  # fmt: skip
        with pytest.raises(ValueError, match="not on the whitelist"):
            check_keys({key: 3.0})


def _site_with(tiny_sites: Path, tmp_path: Path, **privacy: object) -> str:
    """tiny-a's YAML with its own home (ledger, key) and the given privacy policy fields."""
    import yaml

    raw = yaml.safe_load((tiny_sites / "tiny-a.yaml").read_text())
    raw["data"]["bids_root"] = str(tiny_sites / "tiny-a")
    raw["data"]["cache_dir"] = str(tiny_sites / ".fedmri-cache" / "tiny-a")
    raw["home"] = str(tmp_path / "home")
    raw["privacy"] = {**raw.get("privacy", {}), **privacy}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny-a.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_the_site_policy_sets_the_evaluation_cohort_and_the_server_cannot_lower_it(
    tiny_sites: Path, tiny_base: Path, tmp_path: Path, ledger_of
) -> None:
    ldm = load_ldm(tiny_base)
    asks_for_one = EvalRequest(
        2, steps=2, min_subjects=1, few_shot_k=1, few_shot_repeats=1, model_configs=model_configs(tiny_base)
    )
    parts = (asks_for_one, ldm.vae.state_dict(), ldm.denoiser.state_dict())
    declines = _site_with(tiny_sites, tmp_path / "declines", evaluate=False)
    with pytest.raises(PermissionError, match=r"privacy\.evaluate: false"):
        run_site_evaluation(declines, *parts)
    strict = _site_with(tiny_sites, tmp_path / "strict", min_eval_subjects=10)  # the default
    with pytest.raises(PermissionError, match="held-out subjects < the minimum cohort 10"):
        run_site_evaluation(strict, *parts)  # the server asked for 1
    from sites.config import load_site

    assert not load_site(strict).ledger_path.exists()  # nothing answered, nothing recorded

    answers = _site_with(tiny_sites, tmp_path / "answers", min_eval_subjects=1)
    run_site_evaluation(answers, *parts, run_id=9)
    (entry,) = ledger_of(Path(answers))["entries"]
    assert entry["status"] == "evaluated" and entry["run_id"] == 9 and entry["segment"] is None
    assert entry["num_subjects"] == 1 and "NOT covered by DP" in entry["notes"][0]  # the cohort size
    assert entry["signature"] and entry["global_digest"]  # signed, naming the weights evaluated
