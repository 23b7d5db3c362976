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
