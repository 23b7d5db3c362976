"""The shipped evaluator: verified on load, and its classifiers separate right labels from shuffled ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.conditions import Modality
from common.evaluator import EVALUATOR_DIR, FIELD_CLASSES, field_class, load_evaluator
from common.metrics import adherence


def test_field_classes_are_the_nearest_in_log_tesla() -> None:
    assert list(field_class(np.array([0.2, 0.3, 0.55, 1.0, 1.5, 2.0, 3.0, 7.0]))) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert FIELD_CLASSES == (0.3, 1.5, 3.0)


def test_shipped_evaluator_has_provenance_and_refuses_changed_weights(tmp_path: Path) -> None:
    evaluator = load_evaluator()
    provenance = evaluator.provenance
    assert provenance["command"].startswith("fedmri train-evaluator")
    assert set(provenance["data"]) == {"reference-0p3t", "reference-1p5t", "reference-3t"}
    assert min(provenance["validation_accuracy"].values()) > 0.5
    copy = tmp_path / "eval"
    shutil.copytree(EVALUATOR_DIR, copy)
    weights = copy / "evaluator.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_evaluator(copy)
    (copy / "provenance.json").write_text(json.dumps({**provenance, "files": {"missing.bin": "0" * 64}}))
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        load_evaluator(copy)


def _merge(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    return np.array([mapping.get(int(v), int(v)) for v in labels])


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3-subject copies of demo hospitals A (3 T) and C (0.3 T): scanners the evaluator never saw."""
    from sites import scenarios
    from sites.cli import make_scenario_sites

    out = tmp_path_factory.mktemp("demo-like")
    hospitals = [h for h in scenarios.create("demo").hospitals if h.site_id in ("hospital-a", "hospital-c")]
    make_scenario_sites(hospitals, out, contact_sheets=False, subjects=3)
    return out


def test_adherence_is_high_on_real_slices_and_near_chance_on_shuffled_labels(demo_like: Path) -> None:
    from sites.bids import read_site

    evaluator = load_evaluator()
    rng = np.random.default_rng(0)
    for site in ("hospital-a", "hospital-c"):
        data = read_site(demo_like / site, image_size=64)
        middle = (data.slice_position > 0.2) & (data.slice_position < 0.8)
        images = data.images[middle].astype(np.float32)
        predicted = evaluator.predict(images)
        truth = {"modality": data.modality[middle], "field": field_class(data.field_strength[middle])}
        # T1ce differs from T1w only in enhancing tumour, so the pair is scored as one contrast family here.
        family = {Modality.T1ce.ordinal: Modality.T1w.ordinal}
        assert adherence(_merge(predicted["modality"], family), _merge(truth["modality"], family)) > 0.9, site
        assert adherence(predicted["field"], truth["field"]) > 0.85, site
        shuffled = rng.permutation(truth["modality"])  # the same labels, no longer matching their slices
        # Agreement by chance: the predicted and the true label frequencies, independent.
        counts = [np.bincount(labels, minlength=len(Modality)) for labels in (predicted["modality"], shuffled)]
        chance = float((counts[0] * counts[1]).sum()) / len(images) ** 2
        assert abs(adherence(predicted["modality"], shuffled) - chance) < 0.1, site
