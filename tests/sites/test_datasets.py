"""Source pairs for the source branch (sites/datasets.source_rows): same subject, same position, another contrast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.conditions import Modality
from sites.bids import read_site
from sites.datasets import PAIR_TOLERANCE_MM, POSITION_SPAN_MM, SliceDataset, SubjectDataset, source_rows


@pytest.fixture(scope="module")
def tiny_a(tiny_sites: Path):
    return read_site(tiny_sites / "tiny-a", image_size=32)  # 4 subjects, T1w, T1ce, T2w and FLAIR each


def test_each_source_is_the_same_subjects_other_contrast_at_the_same_position(tiny_a) -> None:
    rows = source_rows(tiny_a)  # -> [N, 5]
    targets, slots = np.nonzero(rows >= 0)
    sources = rows[targets, slots]
    assert len(targets) == 3 * len(tiny_a)  # every slice of tiny-a has its 3 other contrasts
    assert np.array_equal(tiny_a.subject[sources], tiny_a.subject[targets])  # pairs never cross subjects
    assert np.array_equal(tiny_a.modality[sources], slots)  # the slot names the source's contrast
    assert not (tiny_a.modality[targets] == slots).any()  # never the target's own contrast
    distance = np.abs(tiny_a.slice_position[sources] - tiny_a.slice_position[targets]) * POSITION_SPAN_MM
    assert distance.max() <= PAIR_TOLERANCE_MM
    assert (rows[:, Modality.PDw.ordinal] == -1).all()  # tiny-a has no PDw


def test_pairs_never_cross_subjects_even_where_slices_line_up(tiny_a) -> None:
    """Give subject 1 only its T1w: its slices find no T2w source, although subject 0's T2w slices
    lie at the very same positions."""
    keep = ~((tiny_a.subject == 1) & (tiny_a.modality != Modality.T1w.ordinal))
    from dataclasses import replace

    alone = replace(tiny_a, **{name: getattr(tiny_a, name)[keep] for name in (
        "images", "lesion_mask", "subject", "scan", "modality", "pathology", "field_strength", "repetition_time",
        "echo_time", "inversion_time", "slice_position")})  # fmt: skip
    rows = source_rows(alone)
    assert (rows[alone.subject == 1] == -1).all()
    others = (alone.subject == 0) & (alone.modality != Modality.T2w.ordinal)
    assert (rows[others, Modality.T2w.ordinal] >= 0).all()


def test_a_slice_without_a_position_has_no_source(tiny_a) -> None:
    from dataclasses import replace

    unplaced = replace(tiny_a, slice_position=np.where(tiny_a.scan == tiny_a.scan[0], np.nan, tiny_a.slice_position))
    rows = source_rows(unplaced)
    first_scan = unplaced.scan == unplaced.scan[0]
    assert (rows[first_scan] == -1).all()  # its own slices find none
    assert (rows[:, unplaced.modality[0]][unplaced.subject == unplaced.subject[0]] == -1).all()  # and give none


def test_items_carry_the_source_images_and_nan_where_none(tiny_a) -> None:
    rows = source_rows(tiny_a)
    item = SliceDataset(tiny_a)[5]
    image, _, _, sources = item
    assert sources.shape == (5, 1, 32, 32)
    for slot, row in enumerate(rows[5]):
        if row < 0:
            assert torch.isnan(sources[slot]).all()
        else:
            expected = torch.from_numpy(tiny_a.images[row].astype(np.float32)) * 2 - 1
            assert torch.equal(sources[slot, 0], expected) and not torch.equal(sources[slot, 0], image[0])
    _images, _, _, subject_sources = SubjectDataset(tiny_a, seed=0, slices_per_subject=3)[2]
    assert subject_sources.shape == (3, 5, 1, 32, 32)
    assert (~torch.isnan(subject_sources).flatten(2).all(2)).sum(1).tolist() == [3, 3, 3]
