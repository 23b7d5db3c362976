"""Server-side evaluation of a release: mask adherence over masks from the public prior."""

from __future__ import annotations

import math
from pathlib import Path

from common.model import load_ldm
from common.segmenter import load_segmenter
from server.evaluation import MASK_CONTRASTS, mask_adherence_rows


def test_mask_adherence_covers_each_lesion_contrast_and_field_beside_the_segmenters_real_ceiling(
    masked_base: Path,
) -> None:
    segmenter = load_segmenter()
    rows = mask_adherence_rows(load_ldm(masked_base), segmenter, samples=2, steps=2)
    expected = [(p.value, m.value, f) for p, ms in MASK_CONTRASTS.items() for m in ms for f in (0.3, 1.5, 3.0)]
    assert [(r["pathology"], r["modality"], r["field_T"]) for r in rows] == expected
    ceiling = segmenter.provenance["validation_dice_by_modality"]
    for row in rows:
        assert row["n"] == 2
        assert math.isnan(row["mask_dice"]) or 0.0 <= row["mask_dice"] <= 1.0
        assert row["segmenter_on_real"] == ceiling[row["pathology"]][row["modality"]] >= 0.5


def test_translation_rows_tabulate_each_sites_pairs_with_the_gain_over_the_copy() -> None:
    from server.evaluation import translation_rows

    figures = {"n_slices": 16.0, "n_subjects": 3.0, "psnr": 21.0, "ssim": 0.8, "psnr_copy": 17.5, "ssim_copy": 0.7}
    results = {
        "hospital-b": {f"translate/T1w+T2w/FLAIR/{k}": v for k, v in figures.items()} | {"T1w/ms/fd": 3.0},
        "hospital-a": {f"translate/T2w/T1w/{k}": v - 1 for k, v in figures.items()},
    }
    rows = translation_rows(results)
    assert [(r["site"], r["sources"], r["target"]) for r in rows] == [
        ("hospital-a", "T2w", "T1w"),
        ("hospital-b", "T1w+T2w", "FLAIR"),
    ]
    assert rows[1]["psnr_gain_db"] == 3.5 and math.isclose(rows[1]["ssim_gain"], 0.1)
    assert translation_rows({"hospital-c": {"T1w/healthy/fd": 1.0}}) == []


def test_pairs_no_site_holds_are_scored_on_public_sites_and_held_ones_are_not(
    tiny_sites: Path, source_base: Path
) -> None:
    """tiny-public (1.5 T: T1w, T2w, FLAIR, PDw). A site that reported T1w+T2w -> FLAIR and trained
    on FLAIR at 1.5 T holds that pair there, so the server scores every other pair, not that one;
    a site at 3 T holds nothing at 1.5 T."""
    from common.protocol import EvalRequest
    from server.evaluation import unseen_translation_rows

    reported = {"translate/T1w+T2w/FLAIR/ssim": 0.5, "held/FLAIR/healthy/1": 1.0}
    request = EvalRequest(samples_per_condition=2, steps=1, min_subjects=1)
    ldm = load_ldm(source_base)
    rows = unseen_translation_rows(ldm, [str(tiny_sites / "tiny-public.yaml")], {"site-15t": reported}, request)
    pairs = {(r["sources"], r["target"]) for r in rows}
    assert ("T1w+T2w", "FLAIR") not in pairs and len(pairs) == 4 * 3  # every single-source pair of 4 contrasts
    assert {r["held_by"] for r in rows} == {"none (unseen)"} and {r["field"] for r in rows} == {1.5}
    elsewhere = {"translate/T1w+T2w/FLAIR/ssim": 0.5, "held/FLAIR/healthy/2": 1.0}  # the same pair, at 3 T
    rows = unseen_translation_rows(ldm, [str(tiny_sites / "tiny-public.yaml")], {"site-3t": elsewhere}, request)
    assert ("T1w+T2w", "FLAIR") in {(r["sources"], r["target"]) for r in rows}


def test_segmentation_rows_give_each_sites_relative_gain() -> None:
    from server.evaluation import segmentation_rows

    figures = {"k": 5.0, "repeats": 3.0, "n_synthetic": 64.0, "n_test_subjects": 12.0,
               "dice_real_only": 0.5, "dice_with_synthetic": 0.57}  # fmt: skip
    rows = segmentation_rows({"hospital-a": {f"segment/glioma/{k}": v for k, v in figures.items()}, "hospital-c": {}})
    assert len(rows) == 1 and rows[0]["pathology"] == "glioma" and math.isclose(rows[0]["relative_gain"], 0.14)
