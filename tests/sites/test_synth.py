"""Generated scans against their own ground truth: contrast order, lesions, enhancement, SNR."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common.conditions import Modality, Pathology
from sites import scenarios
from sites.config import SiteConfig
from sites.pathology import GLIOMA_LABELS, MS_LABEL
from sites.synth import SubjectVolumes, synthesize_subject

DEMO = {site.site_id: site for site in scenarios.create("demo").hospitals}


def _subject(
    site: SiteConfig, pathology: Pathology, index: int = 0, in_plane_mm: float | None = None
) -> SubjectVolumes:
    spec = site.synthetic
    assert spec is not None
    scanner = spec.scanner if in_plane_mm is None else dataclasses.replace(spec.scanner, in_plane_mm=in_plane_mm)
    return synthesize_subject(dataclasses.replace(spec, pathology_mix={pathology: 1.0}, scanner=scanner), index)


@pytest.fixture(scope="module")
def glioma() -> SubjectVolumes:
    return _subject(DEMO["hospital-a"], Pathology.glioma, in_plane_mm=2.0)


@pytest.fixture(scope="module")
def ms() -> SubjectVolumes:
    return _subject(DEMO["hospital-b"], Pathology.ms, in_plane_mm=2.0)


def _pure(volumes: SubjectVolumes, name: str) -> np.ndarray:
    """Voxels that are at least 90 % of one tissue and free of lesion."""
    return (volumes.tissue[name] > 0.9) & (volumes.lesion_labels == 0)


def _median(volumes: SubjectVolumes, modality: Modality, mask: np.ndarray) -> float:
    assert mask.sum() > 20, "too few voxels to compare"
    return float(np.median(volumes.scans[modality][mask]))


def test_t1w_white_above_grey_above_csf(glioma: SubjectVolumes, ms: SubjectVolumes) -> None:
    for volumes in (glioma, ms):
        wm, gm, csf = (_median(volumes, Modality.T1w, _pure(volumes, t)) for t in ("WM", "GM", "CSF"))
        assert wm > gm > csf


def test_t2w_csf_above_grey_above_white(glioma: SubjectVolumes, ms: SubjectVolumes) -> None:
    for volumes in (glioma, ms):
        wm, gm, csf = (_median(volumes, Modality.T2w, _pure(volumes, t)) for t in ("WM", "GM", "CSF"))
        assert csf > gm > wm


def test_flair_csf_darkest_and_grey_above_white(glioma: SubjectVolumes, ms: SubjectVolumes) -> None:
    for volumes in (glioma, ms):
        wm, gm, csf = (_median(volumes, Modality.FLAIR, _pure(volumes, t)) for t in ("WM", "GM", "CSF"))
        assert csf < wm < gm


@pytest.mark.parametrize("modality", [Modality.T2w, Modality.FLAIR])
def test_lesions_are_hyperintense(glioma: SubjectVolumes, ms: SubjectVolumes, modality: Modality) -> None:
    edema = glioma.lesion_labels == GLIOMA_LABELS["edema"]
    assert _median(glioma, modality, edema) > 1.3 * _median(glioma, modality, _pure(glioma, "WM"))
    plaques = ms.lesion_labels == MS_LABEL
    assert _median(ms, modality, plaques) > 1.3 * _median(ms, modality, _pure(ms, "WM"))


def test_enhancing_rim_brighter_on_t1ce_than_t1w(glioma: SubjectVolumes) -> None:
    # Each scan has its own arbitrary scanner gain, so compare the rim relative to white matter.
    rim = glioma.lesion_labels == GLIOMA_LABELS["enhancing"]
    wm = _pure(glioma, "WM")
    on_t1ce = _median(glioma, Modality.T1ce, rim) / _median(glioma, Modality.T1ce, wm)
    on_t1w = _median(glioma, Modality.T1w, rim) / _median(glioma, Modality.T1w, wm)
    assert on_t1ce > 1.3 * on_t1w


def _snr(volumes: SubjectVolumes) -> float:
    """White-matter median over the noise sigma of the air in the FOV corners (Rayleigh)."""
    scan = volumes.scans[Modality.T1w]
    corners = np.concatenate(
        [scan[:8, :8].ravel(), scan[-8:, :8].ravel(), scan[:8, -8:].ravel(), scan[-8:, -8:].ravel()]
    )
    sigma = np.sqrt(np.mean(corners.astype(np.float64) ** 2) / 2.0)
    return _median(volumes, Modality.T1w, _pure(volumes, "WM")) / sigma


def test_low_field_site_has_lower_snr_than_3t_site() -> None:
    low = _snr(_subject(DEMO["hospital-c"], Pathology.healthy))
    high = _snr(_subject(DEMO["hospital-a"], Pathology.healthy))
    assert low < 0.7 * high


def test_subjects_are_deterministic_and_distinct() -> None:
    site = DEMO["hospital-c"]
    a = _subject(site, Pathology.healthy, index=1, in_plane_mm=3.0)
    b = _subject(site, Pathology.healthy, index=1, in_plane_mm=3.0)
    c = _subject(site, Pathology.healthy, index=2, in_plane_mm=3.0)
    assert np.array_equal(a.scans[Modality.T2w], b.scans[Modality.T2w])
    assert not np.allclose(a.tissue["GM"], c.tissue["GM"], atol=0.05)


def test_dementia_enlarges_ventricles() -> None:
    site = DEMO["hospital-b"]
    healthy = _subject(site, Pathology.healthy, index=3, in_plane_mm=3.0)
    demented = _subject(site, Pathology.dementia, index=3, in_plane_mm=3.0)
    assert (
        demented.draw.pathology.atrophy.ventricle_expansion_mm > healthy.draw.pathology.atrophy.ventricle_expansion_mm
    )
    assert demented.tissue["CSF"].sum() > 1.05 * healthy.tissue["CSF"].sum()
