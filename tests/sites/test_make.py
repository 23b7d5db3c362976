"""`sites make` writes BIDS datasets that nibabel opens, deterministically."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sites import scenarios
from sites.config import load_site
from sites.make import make_site


def test_bids_layout_and_sidecars(tiny_sites: Path) -> None:
    root = tiny_sites / "tiny-a"
    assert json.loads((root / "dataset_description.json").read_text())["BIDSVersion"]
    rows = list(csv.DictReader((root / "participants.tsv").read_text().splitlines(), delimiter="\t"))
    assert [r["participant_id"] for r in rows] == ["sub-001", "sub-002", "sub-003", "sub-004"]
    assert {"age", "sex", "pathology"} <= set(rows[0])
    anat = root / "sub-001" / "anat"
    for stem in ("T1w", "ce-gadolinium_T1w", "T2w", "FLAIR"):
        image = nib.load(anat / f"sub-001_{stem}.nii.gz")
        assert image.ndim == 3 and np.asarray(image.dataobj).any()
        sidecar = json.loads((anat / f"sub-001_{stem}.json").read_text())
        assert sidecar["MagneticFieldStrength"] == 3.0
        assert 0 < sidecar["EchoTime"] < sidecar["RepetitionTime"] < 20  # seconds
    flair = json.loads((anat / "sub-001_FLAIR.json").read_text())
    assert 1.5 < flair["InversionTime"] < 3.0  # nulls CSF at 3 T


def test_derivatives_share_the_scan_grid(tiny_sites: Path) -> None:
    root = tiny_sites / "tiny-a"
    scan = nib.load(root / "sub-001" / "anat" / "sub-001_T1w.nii.gz")
    truth = root / "derivatives" / "groundtruth" / "sub-001" / "anat"
    for name in (
        "sub-001_desc-lesion_mask",
        "sub-001_label-GM_probseg",
        "sub-001_label-WM_probseg",
        "sub-001_label-CSF_probseg",
    ):
        image = nib.load(truth / f"{name}.nii.gz")
        assert image.shape == scan.shape
        assert np.allclose(image.affine, scan.affine)
    glioma_subjects = [
        r["participant_id"]
        for r in csv.DictReader((root / "participants.tsv").read_text().splitlines(), delimiter="\t")
        if r["pathology"] == "glioma"
    ]
    assert glioma_subjects
    sub = glioma_subjects[0]
    mask = np.asarray(
        nib.load(root / "derivatives" / "groundtruth" / sub / "anat" / f"{sub}_desc-lesion_mask.nii.gz").dataobj
    )
    assert set(np.unique(mask)) >= {0, 1, 2, 3}  # core, oedema, enhancing rim


def test_orientation_is_stored_as_configured(tiny_sites: Path) -> None:
    image = nib.load(tiny_sites / "tiny-a" / "sub-001" / "anat" / "sub-001_T1w.nii.gz")
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    image = nib.load(tiny_sites / "tiny-b" / "sub-001" / "anat" / "sub-001_T1w.nii.gz")
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")


def test_site_yaml_and_contact_sheet_written(tiny_sites: Path) -> None:
    site = load_site(tiny_sites / "tiny-a.yaml")
    assert Path(site.data.bids_root) == tiny_sites / "tiny-a"
    sheet = tiny_sites / "tiny-a_contact_sheet.png"
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sheet.stat().st_size > 10_000


def test_make_is_deterministic_and_reuses_unchanged_sites(tmp_path: Path) -> None:
    site = scenarios.create("tiny").hospitals[1]
    site = dataclasses.replace(site, synthetic=dataclasses.replace(site.synthetic, num_subjects=2))
    assert make_site(site, tmp_path / "one")
    assert make_site(site, tmp_path / "two")
    assert not make_site(site, tmp_path / "one")  # unchanged: reused
    for name in (
        "sub-002/anat/sub-002_T2w.nii.gz",
        "derivatives/groundtruth/sub-001/anat/sub-001_label-WM_probseg.nii.gz",
    ):
        a = np.asarray(nib.load(tmp_path / "one" / site.site_id / name).dataobj)
        b = np.asarray(nib.load(tmp_path / "two" / site.site_id / name).dataobj)
        assert np.array_equal(a, b)


@pytest.mark.timeout(120)
def test_parallel_make_after_threaded_torch_work_does_not_hang(tmp_path: Path) -> None:
    # A fork after the parent used OpenMP used to deadlock the workers (libgomp is not fork-safe).
    import torch

    torch.nn.functional.conv2d(torch.randn(1, 32, 128, 128), torch.randn(8, 32, 3, 3))
    site = scenarios.create("tiny").hospitals[1]
    site = dataclasses.replace(site, synthetic=dataclasses.replace(site.synthetic, num_subjects=2, seed=77))
    assert make_site(site, tmp_path, workers=2)
    assert (tmp_path / site.site_id / "sub-002" / "anat").is_dir()
