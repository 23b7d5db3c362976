"""The public lesion-mask prior: requests read as written, masks where and as large as asked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.conditions import Pathology
from sites.lesion_prior import (
    LesionRequest,
    Lobe,
    Side,
    lesion_mask,
    parse_request,
    random_request,
)
from sites.pathology import GLIOMA_LABELS

PIXEL_MM = 220.0 / 64


def test_requests_are_read_as_written() -> None:
    assert parse_request("glioma, 3 cm, left frontal") == LesionRequest(
        Pathology.glioma, 0.55, 30.0, Side.left, Lobe.frontal
    )
    assert parse_request("Glioma 25 mm right temporal", slice_position=0.6) == LesionRequest(
        Pathology.glioma, 0.6, 25.0, Side.right, Lobe.temporal
    )
    assert parse_request("glioma 2.5cm") == LesionRequest(Pathology.glioma, 0.55, 25.0)
    assert parse_request("ms") == LesionRequest(Pathology.ms)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tumour, 3 cm", "starts with 'tumour'; it must start with glioma or ms"),
        ("glioma, 3 cm, upper", "cannot read 'upper'; after the pathology it takes a size"),
        ("glioma, 9 cm", "glioma diameter must lie in 10-60 mm, got 90 mm"),
        ("ms, 3 cm", "an MS mask takes no size, side or lobe"),
        ("dementia", "lesion masks are drawn for glioma or ms, not dementia"),
        ("", "empty lesion request"),
    ],
)
def test_a_request_it_cannot_read_is_refused_with_the_word(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_request(text)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


@pytest.mark.parametrize(
    ("side", "lobe", "anterior", "left"),
    [(Side.left, Lobe.frontal, True, True), (Side.right, Lobe.occipital, False, False)],
)
def test_the_tumour_lies_where_it_was_asked(side: Side, lobe: Lobe, anterior: bool, left: bool) -> None:
    """Rows run anterior to posterior and columns from the patient's left, as the reader's slices."""
    mask = lesion_mask(LesionRequest(Pathology.glioma, 0.6, 25.0, side, lobe), np.random.default_rng(1))
    row, col = _centroid(mask > 0)
    assert (row < 31.5) == anterior and (col < 31.5) == left, (row, col)


def test_the_tumour_is_as_large_as_asked_and_shelled_like_brats() -> None:
    areas = {}
    for diameter in (20.0, 40.0):
        mask = lesion_mask(
            LesionRequest(Pathology.glioma, 0.6, diameter, Side.left, Lobe.parietal), np.random.default_rng(2)
        )
        tumour = np.isin(mask, [GLIOMA_LABELS["necrotic_core"], GLIOMA_LABELS["enhancing"]])
        expected = math.pi * (diameter / 2 / PIXEL_MM) ** 2  # the enhancing tumour's disc, in pixels
        areas[diameter] = tumour.sum()
        # The slice crosses the tumour within half its radius of its centre (>= 0.75 of the widest
        # section), and the phantom's boundary wobbles by up to a third.
        assert 0.5 * expected <= tumour.sum() <= 1.4 * expected, (diameter, tumour.sum(), expected)
        core = mask == GLIOMA_LABELS["necrotic_core"]
        edema = mask == GLIOMA_LABELS["edema"]
        assert core.any() and edema.sum() > tumour.sum() / 2  # oedema surrounds the tumour
        assert np.abs(np.array(_centroid(core)) - np.array(_centroid(tumour))).max() < 2.0
    assert areas[40.0] > 2.5 * areas[20.0]


def test_ms_plaques_are_small_and_the_prior_is_seeded() -> None:
    request = LesionRequest(Pathology.ms, 0.55)
    mask = lesion_mask(request, np.random.default_rng(3))
    assert set(np.unique(mask)) == {0, 1} and 2 <= mask.sum() <= 150
    assert np.array_equal(mask, lesion_mask(request, np.random.default_rng(3)))
    assert not np.array_equal(mask, lesion_mask(request, np.random.default_rng(4)))


def test_random_requests_are_plausible_and_impossible_ones_say_where_to_look() -> None:
    rng = np.random.default_rng(5)
    for _ in range(4):
        request = random_request(Pathology.glioma, rng, slice_position=0.6)
        assert 12.0 <= (request.diameter_mm or 0) <= 28.0 and request.side and request.lobe
        assert (lesion_mask(request, rng) > 0).sum() > 10
    with pytest.raises(ValueError, match=r"at slice position 0\.1; there is at positions 0\.45, 0\.50, "):
        lesion_mask(LesionRequest(Pathology.glioma, 0.1, 20.0, Side.left, Lobe.frontal), rng)
    message = r"left temporal lobe has no tumour-bearing white matter at slice position 0\.8; it has at positions 0\.45"
    with pytest.raises(ValueError, match=message):
        lesion_mask(LesionRequest(Pathology.glioma, 0.8, 12.0, Side.left, Lobe.temporal), rng)
