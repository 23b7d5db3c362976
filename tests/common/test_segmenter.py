"""The shipped lesion segmenter and the mask-adherence Dice it measures (common/segmenter.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from common.conditions import Modality, Pathology
from common.segmenter import SEGMENTER_DIR, SegmenterConfig, dice, load_segmenter, mask_adherence, train_segmenter
from sites.bids import read_site


def test_dice_counts_the_whole_lesion_and_leaves_out_empty_pairs() -> None:
    a = np.zeros((4, 8, 8), np.uint8)
    b = np.zeros((4, 8, 8), np.uint8)
    a[0, :4, :4], b[0, :4, :4] = 1, 2  # same place, other label: one whole lesion
    a[1, :4, :4], b[1, 4:, 4:] = 3, 3  # disjoint
    a[2, :4, :4], b[2, :2, :4] = 2, 2  # 8 of 16 and 8: 2·8 / 24
    scores = dice(a, b)
    assert scores[:3].tolist() == [1.0, 0.0, pytest.approx(2 / 3)] and np.isnan(scores[3])


@pytest.fixture(scope="module")
def glioma_slices(tiny_sites: Path) -> tuple[np.ndarray, np.ndarray]:
    """tiny-a's glioma FLAIR slices that show the tumour, and their masks: a site the segmenter never saw."""
    slices = read_site(tiny_sites / "tiny-a", image_size=64)
    rows = (slices.pathology == Pathology.glioma.ordinal) & (slices.modality == Modality.FLAIR.ordinal)
    rows &= (slices.lesion_mask > 0).reshape(len(slices), -1).sum(1) >= 20
    assert rows.sum() >= 4
    return slices.images[rows].astype(np.float32), slices.lesion_mask[rows]


def test_mask_adherence_tells_a_faithful_slice_from_a_misplaced_mask(glioma_slices) -> None:
    """Real slices with their own masks stand for a generator that follows its masks perfectly; the
    same slices with masks moved by 16 px (a quarter of the field) for one that ignores them."""
    images, masks = glioma_slices
    segmenter = load_segmenter()
    faithful = mask_adherence(segmenter, images, masks)
    misplaced = mask_adherence(segmenter, images, np.roll(masks, 16, axis=2))
    assert faithful >= 0.6, faithful
    assert misplaced <= 0.2 and faithful - misplaced >= 0.4, (faithful, misplaced)
    with pytest.raises(ValueError, match="no mask shows a lesion"):
        mask_adherence(segmenter, images, np.zeros_like(masks))


def test_the_shipped_segmenter_says_where_it_came_from_and_refuses_changed_weights(tmp_path: Path) -> None:
    provenance = load_segmenter().provenance
    assert provenance["command"].startswith("fedmri train-segmenter")
    assert set(provenance["data"]) == {"reference-0p3t", "reference-1p5t", "reference-3t"}
    assert provenance["validation_dice"]["glioma"] > 0.5
    copy = Path(shutil.copytree(SEGMENTER_DIR, tmp_path / "seg"))
    weights = copy / "segmenter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_segmenter(copy)


def test_training_needs_a_lesion_to_learn_from() -> None:
    images = np.zeros((4, 64, 64), np.float32)
    with pytest.raises(ValueError, match="no slice shows a lesion"):
        train_segmenter(images, np.zeros((4, 64, 64), np.uint8), SegmenterConfig(steps=1))
