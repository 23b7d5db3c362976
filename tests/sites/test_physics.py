"""Signal equations and relaxation tables, checked against MR physics facts."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from common.conditions import Modality
from sites import physics
from sites.config import SequenceParams
from sites.physics import Tissue
from sites.synth import tissue_signal

FIELDS = st.floats(min_value=0.1, max_value=7.0)


@given(low=FIELDS, high=FIELDS)
def test_t1_grows_with_field_strength(low: float, high: float) -> None:
    # Arrange / Act
    lo, hi = sorted((low, high))
    # Assert: Bottomley's power law is monotone for every brain tissue
    for tissue in (Tissue.WM, Tissue.GM, Tissue.CSF):
        assert physics.relaxation(tissue, lo)[1] <= physics.relaxation(tissue, hi)[1]


def test_relaxation_matches_anchors_at_1p5_and_3_tesla() -> None:
    for tissue, props in physics.TISSUES.items():
        assert math.isclose(physics.relaxation(tissue, 1.5)[1], props.t1_1p5)
        assert math.isclose(physics.relaxation(tissue, 3.0)[1], props.t1_3)
        assert math.isclose(physics.relaxation(tissue, 3.0)[2], props.t2_3)


@given(field=st.floats(min_value=0.2, max_value=3.0), tr=st.floats(min_value=4.0, max_value=12.0))
def test_flair_inversion_time_nulls_csf(field: float, tr: float) -> None:
    seq = SequenceParams(repetition_time=tr, echo_time=0.1)
    csf = tissue_signal(Tissue.CSF, Modality.FLAIR, field, seq)
    wm = tissue_signal(Tissue.WM, Modality.FLAIR, field, seq)
    assert csf < 1e-9 < wm


def test_gadolinium_brightens_enhancing_tissue_only_on_t1ce() -> None:
    seq = SequenceParams(repetition_time=0.5, echo_time=0.012)
    plain = tissue_signal(Tissue.ENHANCING, Modality.T1w, 3.0, seq)
    enhanced = tissue_signal(Tissue.ENHANCING, Modality.T1ce, 3.0, seq)
    assert enhanced > 1.5 * plain
    assert tissue_signal(Tissue.WM, Modality.T1ce, 3.0, seq) == tissue_signal(Tissue.WM, Modality.T1w, 3.0, seq)


def test_snr_grows_with_field_and_voxel_volume() -> None:
    assert physics.snr(0.3, 4.0, 3.0) < physics.snr(3.0, 4.0, 3.0)
    assert physics.snr(1.5, 2.0, 3.0) < physics.snr(1.5, 8.0, 3.0)
