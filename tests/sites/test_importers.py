"""`fedmri sites import`: each importer on a tiny fixture written in its dataset's published layout.

Every fixture is written here, in the layout cited in the importer's module docstring (file
names, HDF5 keys, header fields, spreadsheet columns), with 12 x 12 x 8 volumes. Each imported
site is checked through the client's reader (sites.bids.index_site) and `fedmri sites summary`.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from simulation.cli import app
from sites.bids import SiteDataError, index_site, lesion_mask_path, load_volume
from sites.config import load_site
from sites.importers import import_dataset
from sites.importers.site_writer import DatasetImportError, Options, parse_assumptions

SIDECAR_FIELDS = ("MagneticFieldStrength", "RepetitionTime", "EchoTime", "InversionTime")


# ---- fixture helpers ---------------------------------------------------------------------------


def _head(seed: int) -> np.ndarray:
    """A bright ellipsoid in a dark frame. -> [12, 12, 8] float32"""
    x, y, z = np.meshgrid(np.arange(12), np.arange(12), np.arange(8), indexing="ij")
    inside = ((x - 5.5) / 4.5) ** 2 + ((y - 5.5) / 5) ** 2 + ((z - 3.5) / 3.5) ** 2 <= 1
    noise = np.random.default_rng(seed).uniform(0.8, 1.2, inside.shape)
    return (inside * 1000 * noise).astype(np.float32)


def _nifti(path: Path, seed: int = 0, data: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_head(seed) if data is None else data, np.diag([2.0, 2.0, 4.0, 1.0])), path)
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _import(dataset: str, src: Path, out: Path, *assume: str, copy: bool = False, **extra: Path) -> list[Path]:
    options = Options(out, copy, parse_assumptions(list(assume)))
    return import_dataset(dataset, src, options, f"test import {dataset}", lambda line: None, **extra)


def _summary(yaml_paths: list[Path]) -> dict:
    result = CliRunner().invoke(app, ["sites", "summary", "--json", *map(str, yaml_paths)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _indexed(yaml_path: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(participant -> pathology label, what the reader skipped) of an imported site, read strictly:
    a sidecar field the dataset does not state is an unknown condition, never a skipped scan."""
    site = load_site(yaml_path)
    index = index_site(site.data.bids_root, strict=True)
    return {s: p.label for s, p in index.subjects.items()}, index.skipped


# ---- IXI ---------------------------------------------------------------------------------------


@pytest.fixture
def ixi(tmp_path: Path) -> Path:
    """IXI-T1/T2/PD.tar extracted: IXI<nnn>-<hospital>-<nnnn>-<modality>.nii.gz (brain-development.org)."""
    src = tmp_path / "IXI"
    for i, name in enumerate(
        [
            "IXI002-Guys-0828-T1",
            "IXI002-Guys-0828-T2",
            "IXI002-Guys-0828-PD",
            "IXI002-Guys-0828-MRA",
            "IXI012-HH-1211-T1",
            "IXI012-HH-1211-T2",
            "IXI013-HH-1212-T1",
            "IXI025-IOP-0900-T1",
        ]
    ):
        _nifti(src / f"{name}.nii.gz", i)
    return src


def test_ixi_gives_one_site_per_hospital_with_its_scanner(ixi: Path, tmp_path: Path) -> None:
    paths = _import("ixi", ixi, tmp_path / "out")

    assert [p.name for p in paths] == ["ixi-guys.yaml", "ixi-hh.yaml", "ixi-iop.yaml"]
    fields = {}
    for path in paths:
        root = Path(load_site(path).data.bids_root)
        sidecars = [json.loads(p.read_text()) for p in root.glob("sub-*/anat/*.json")]
        fields[path.stem] = {s["MagneticFieldStrength"] for s in sidecars}
        assert all("RepetitionTime" not in s for s in sidecars)  # IXI's files state no TR: left out
        assert all(p.is_symlink() for p in root.glob("sub-*/anat/*.nii.gz"))  # linked, the default
        assert "symbolic links" in (root / "README").read_text()
    assert fields == {"ixi-guys": {1.5}, "ixi-hh": {3.0}, "ixi-iop": {1.5}}
    assert _indexed(paths[1])[0] == {"sub-IXI012": "healthy", "sub-IXI013": "healthy"}
    guys = Path(load_site(paths[0]).data.bids_root)
    assert sorted(p.name for p in guys.glob("sub-IXI002/anat/*.nii.gz")) == [
        "sub-IXI002_PDw.nii.gz",
        "sub-IXI002_T1w.nii.gz",
        "sub-IXI002_T2w.nii.gz",
    ]
    assert "IXI002-Guys-0828-MRA.nii.gz: modality 'MRA' is not an anatomical contrast" in (guys / "README").read_text()


def test_ixi_summary_shows_the_hospitals(ixi: Path, tmp_path: Path) -> None:
    summary = _summary(_import("ixi", ixi, tmp_path / "out"))
    assert summary["ixi-hh"]["field_strengths"] == [3.0] and summary["ixi-hh"]["subjects"] == 2
    assert summary["ixi-guys"]["modalities"].keys() == {"T1w", "T2w", "PDw"}


def test_ixi_unknown_hospital_is_named(ixi: Path, tmp_path: Path) -> None:
    bad = _nifti(ixi / "IXI030-KCL-0001-T1.nii.gz")
    expected = f"{bad}: unknown IXI hospital 'KCL' in the file name; known: Guys, HH, IOP"
    with pytest.raises(DatasetImportError, match=f"^{re.escape(expected)}$"):
        _import("ixi", ixi, tmp_path / "out")
    assert not (tmp_path / "out" / "ixi-guys").exists()  # nothing is written before every file is checked


# ---- BraTS -------------------------------------------------------------------------------------


def _brats_case(root: Path, case: str, sep: str, keys: list[str], seed: int) -> Path:
    for i, key in enumerate(keys):
        data = (_head(seed)[:, :, :] > 0).astype(np.uint8) * np.uint8(2) if key == "seg" else None
        _nifti(root / case / f"{case}{sep}{key}.nii.gz", seed + i, data)
    return root / case


@pytest.fixture
def brats2021(tmp_path: Path) -> Path:
    """BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz (Baid et al. 2021)."""
    src = tmp_path / "BraTS2021_Training_Data"
    _brats_case(src, "BraTS2021_00000", "_", ["t1", "t1ce", "t2", "flair", "seg"], 0)
    _brats_case(src, "BraTS2021_00001", "_", ["t1", "t2", "flair", "seg"], 10)  # no t1ce
    return src


def test_brats2021_imports_glioma_with_masks_and_reports_a_missing_modality(brats2021: Path, tmp_path: Path) -> None:
    (path,) = _import("brats", brats2021, tmp_path / "out", "field=3")

    root = Path(load_site(path).data.bids_root)
    assert path.name == "brats2021.yaml"
    assert sorted(p.name for p in root.glob("sub-00001/anat/*.nii.gz")) == [
        "sub-00001_FLAIR.nii.gz",
        "sub-00001_T1w.nii.gz",
        "sub-00001_T2w.nii.gz",
    ]
    assert (root / "sub-00000/anat/sub-00000_ce-gadolinium_T1w.nii.gz").exists()
    missing = brats2021 / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz"
    readme = (root / "README").read_text()
    assert f"- {missing}: missing: BraTS2021_00001 has no t1ce (T1ce); its other scans are kept" in readme
    assert "MagneticFieldStrength: stated by the user: --assume field=3 (7 scans)" in readme
    mask = lesion_mask_path(root, "sub-00000")
    assert mask is not None and mask.name == "sub-00000_desc-lesion_mask.nii.gz"
    sidecar = json.loads((root / "sub-00000/anat/sub-00000_T1w.json").read_text())
    assert sidecar["MagneticFieldStrength"] == 3.0 and "fedmriAssumptions" in sidecar
    assert _indexed(path)[0] == {"sub-00000": "glioma", "sub-00001": "glioma"}


def test_brats_needs_the_field_stated(brats2021: Path, tmp_path: Path) -> None:
    first = brats2021 / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz"
    expected = (
        f"{first}: the dataset does not state the magnetic field strength; state it with --assume field=<tesla>, "
        "or --assume field=unknown to leave MagneticFieldStrength out of the sidecars"
    )
    with pytest.raises(DatasetImportError, match=f"^{re.escape(expected)}$"):
        _import("brats", brats2021, tmp_path / "out")


def test_brats_corrupt_file_is_named(brats2021: Path, tmp_path: Path) -> None:
    seg = brats2021 / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz"
    _truncate(seg)
    with pytest.raises(DatasetImportError, match=f"^{re.escape(str(seg))}: corrupt or truncated NIfTI file "):
        _import("brats", brats2021, tmp_path / "out", "field=3")


def test_brats2023_naming_keeps_one_timepoint_per_patient(tmp_path: Path) -> None:
    """ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz."""
    src = tmp_path / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    keys = ["t1n", "t1c", "t2w", "t2f", "seg"]
    _brats_case(src, "BraTS-GLI-00000-000", "-", keys, 0)
    _brats_case(src, "BraTS-GLI-00000-001", "-", keys, 10)
    _brats_case(src, "BraTS-GLI-00002-000", "-", keys, 20)

    (path,) = _import("brats", src, tmp_path / "out", "field=unknown")

    root = Path(load_site(path).data.bids_root)
    assert path.name == "brats2023.yaml"
    assert sorted(p.name for p in root.glob("sub-*")) == ["sub-00000", "sub-00002"]
    names = sorted(p.name for p in root.glob("sub-00002/anat/*.nii.gz"))
    assert names == [
        "sub-00002_FLAIR.nii.gz",
        "sub-00002_T1w.nii.gz",
        "sub-00002_T2w.nii.gz",
        "sub-00002_ce-gadolinium_T1w.nii.gz",
    ]
    assert "MagneticFieldStrength" not in json.loads((root / "sub-00002/anat/sub-00002_T1w.json").read_text())
    assert "a later timepoint of the same patient" in (root / "README").read_text()
    legend = json.loads((root / "derivatives/lesions/sub-00002/anat/sub-00002_desc-lesion_mask.json").read_text())
    assert legend["Labels"]["enhancing tumour"] == 3


def test_brats_summary_shows_glioma(brats2021: Path, tmp_path: Path) -> None:
    summary = _summary(_import("brats", brats2021, tmp_path / "out", "field=3"))["brats2021"]
    assert summary["subjects"] == 2 and summary["field_strengths"] == [3.0]
    assert summary["pathologies"]["glioma"] == 2
    assert summary["modalities"].keys() == {"T1w", "T1ce", "T2w", "FLAIR"}


# ---- FeTS --------------------------------------------------------------------------------------


@pytest.fixture
def fets(tmp_path: Path) -> Path:
    """MICCAI_FeTS2022_TrainingData/FeTS2022_<n>/..., partitioning_1.csv (FeTS-AI/Challenge Task_1)."""
    src = tmp_path / "MICCAI_FeTS2022_TrainingData"
    for i in range(4):
        _brats_case(src, f"FeTS2022_0000{i}", "_", ["t1", "t1ce", "t2", "flair", "seg"], 10 * i)
    rows = [("1", "FeTS2022_00000"), ("1", "FeTS2022_00001"), ("2", "FeTS2022_00002"), ("2", "FeTS2022_00009")]
    (src / "partitioning_1.csv").write_text("Partition_ID,Subject_ID\n" + "".join(f"{p},{s}\n" for p, s in rows))
    return src


def test_fets_gives_one_site_per_partition(fets: Path, tmp_path: Path) -> None:
    paths = _import("fets", fets, tmp_path / "out", "field=unknown", copy=True)

    assert [p.name for p in paths] == ["fets-p01.yaml", "fets-p02.yaml"]
    one, two = (Path(load_site(p).data.bids_root) for p in paths)
    assert sorted(p.name for p in one.glob("sub-*")) == ["sub-00000", "sub-00001"]
    assert sorted(p.name for p in two.glob("sub-*")) == ["sub-00002"]
    assert not any(p.is_symlink() for p in one.rglob("*.nii.gz"))  # --copy
    assert "copied into this folder" in (one / "README").read_text()
    assert "FeTS2022_00009: listed in partitioning_1.csv but no folder" in (two / "README").read_text()
    assert lesion_mask_path(two, "sub-00002") is not None
    assert _indexed(paths[0])[0] == {"sub-00000": "glioma", "sub-00001": "glioma"}


def test_fets_partitioning_needs_its_columns(fets: Path, tmp_path: Path) -> None:
    csv_path = fets / "partitioning_1.csv"
    csv_path.write_text("Institution,Case\n1,FeTS2022_00000\n")
    expected = f"{csv_path}: needs the columns Subject_ID and Partition_ID"
    with pytest.raises(DatasetImportError, match=f"^{re.escape(expected)}$"):
        _import("fets", fets, tmp_path / "out", "field=3")


def test_fets_summary_shows_the_partitions(fets: Path, tmp_path: Path) -> None:
    summary = _summary(_import("fets", fets, tmp_path / "out", "field=3"))
    assert summary["fets-p01"]["subjects"] == 2 and summary["fets-p02"]["subjects"] == 1


# ---- OASIS-3 -----------------------------------------------------------------------------------


def _oasis_scan(folder: Path, name: str, seed: int, sidecar: dict) -> None:
    _nifti(folder / f"{name}.nii.gz", seed)
    (folder / f"{name}.json").write_text(json.dumps(sidecar))


# What dcm2niix writes for OASIS-3's Siemens TIM Trio: tesla and seconds.
T1_SIDECAR = {"MagneticFieldStrength": 3, "Manufacturer": "Siemens", "RepetitionTime": 2.4, "EchoTime": 0.00316}
T2_SIDECAR = {"MagneticFieldStrength": 3, "Manufacturer": "Siemens", "RepetitionTime": 3.2, "EchoTime": 0.455}
FLAIR_SIDECAR = {"MagneticFieldStrength": 3, "RepetitionTime": 9.0, "EchoTime": 0.09, "InversionTime": 2.5}


@pytest.fixture
def oasis3(tmp_path: Path) -> Path:
    """OAS3xxxx_MR_dNNNN/anatN/ (NrgXnat/oasis-scripts) or anatN/NIFTI + anatN/BIDS (XNAT), and
    OASIS3_UDSb4_cdr.csv with OASISID, days_to_visit, CDRTOT."""
    src = tmp_path / "oasis3"
    s1 = src / "OAS30001_MR_d0129"
    _oasis_scan(s1 / "anat1", "sub-OAS30001_ses-d0129_run-01_T1w", 0, T1_SIDECAR)
    _oasis_scan(s1 / "anat2", "sub-OAS30001_ses-d0129_acq-TSE_T2w", 1, T2_SIDECAR)
    _oasis_scan(s1 / "anat3", "sub-OAS30001_ses-d0129_FLAIR", 2, FLAIR_SIDECAR)
    _oasis_scan(s1 / "anat4", "sub-OAS30001_ses-d0129_angio", 3, {})
    s2 = src / "OAS30002_MR_d0000" / "anat1"
    _nifti(s2 / "NIFTI" / "sub-OAS30002_ses-d0000_T1w.nii.gz", 4)
    (s2 / "BIDS").mkdir()
    (s2 / "BIDS" / "sub-OAS30002_ses-d0000_T1w.json").write_text(json.dumps(T1_SIDECAR))
    _oasis_scan(src / "OAS30002_MR_d1200" / "anat1", "sub-OAS30002_ses-d1200_T1w", 5, T1_SIDECAR)
    _oasis_scan(src / "OAS30003_MR_d0000" / "anat1", "sub-OAS30003_ses-d0000_T1w", 6, T1_SIDECAR)
    rows = [
        ("OAS30001_UDSb4_d0100", "OAS30001", "100", "0.0"),
        ("OAS30002_UDSb4_d0030", "OAS30002", "30", "0.5"),
        ("OAS30002_UDSb4_d1190", "OAS30002", "1190", "1.0"),
        ("OAS30003_UDSb4_d2000", "OAS30003", "2000", "0.0"),  # no visit within a year of its MR session
    ]
    clinical = src / "clinical" / "OASIS3_UDSb4_cdr.csv"
    clinical.parent.mkdir()
    with open(clinical, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["OASIS_session_label", "OASISID", "days_to_visit", "age at visit", "MMSE", "CDRTOT", "CDRSUM"])
        writer.writerows([(label, sid, day, "70", "29", cdr, "0") for label, sid, day, cdr in rows])
    return src


def test_oasis3_labels_subjects_by_cdr(oasis3: Path, tmp_path: Path) -> None:
    (path,) = _import("oasis3", oasis3, tmp_path / "out")

    root = Path(load_site(path).data.bids_root)
    assert (root / "sub-OAS30001/ses-d0129/anat/sub-OAS30001_ses-d0129_acq-TSE_T2w.nii.gz").exists()
    assert sorted(p.name for p in root.glob("sub-OAS30002/ses-*")) == ["ses-d0000"]  # one session per subject
    sidecar = json.loads((root / "sub-OAS30002/ses-d0000/anat/sub-OAS30002_ses-d0000_T1w.json").read_text())
    assert sidecar == T1_SIDECAR  # copied as the dataset states it
    readme = (root / "README").read_text()
    assert "no CDR visit within 365 days in OASIS3_UDSb4_cdr.csv" in readme
    assert "a later session of OAS30002" in readme and "angio.nii.gz: not a T1w, T2w or FLAIR scan" in readme
    subjects, skipped = _indexed(path)
    assert subjects == {"sub-OAS30001": "healthy", "sub-OAS30002": "dementia"} and not skipped


def test_oasis3_summary_shows_cdr_pathologies(oasis3: Path, tmp_path: Path) -> None:
    summary = _summary(_import("oasis3", oasis3, tmp_path / "out"))["oasis3"]
    assert summary["subjects"] == 2 and summary["field_strengths"] == [3.0]
    assert summary["pathologies"] == {"healthy": 1, "dementia": 1}
    assert summary["modalities"].keys() == {"T1w", "T2w", "FLAIR"}


def test_oasis3_unmapped_cdr_is_named(oasis3: Path, tmp_path: Path) -> None:
    clinical = oasis3 / "clinical" / "OASIS3_UDSb4_cdr.csv"
    clinical.write_text(clinical.read_text().replace(",0.5,", ",n/a,"))
    expected = (
        f"{clinical}: line 3: CDRTOT: CDRTOT 'n/a' is not a CDR (0, 0.5, 1, 2, 3); "
        "state the label with --assume pathology=<label>"
    )
    with pytest.raises(DatasetImportError, match=f"^{re.escape(expected)}$"):
        _import("oasis3", oasis3, tmp_path / "out")


# ---- HDF5: fastMRI brain and M4Raw -------------------------------------------------------------


def _ismrmrd_header(field: float | None, tr: float, te: float, ti: float | None, fov=(220, 220, 5)) -> bytes:
    """An ISMRMRD header as fastMRI stores it (ismrmrd/ismrmrd schema/ismrmrd_example.xml): field in
    tesla, TR/TE/TI in ms, encodedSpace with 2x readout oversampling, reconSpace 12 x 12 x 1."""
    system = "<systemVendor>SIEMENS</systemVendor><systemModel>Skyra</systemModel>"
    if field is not None:
        system += f"<systemFieldStrength_T>{field}</systemFieldStrength_T>"
    inversion = f"<TI>{ti}</TI>" if ti is not None else ""
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<acquisitionSystemInformation>{system}<receiverChannels>2</receiverChannels></acquisitionSystemInformation>"
        "<experimentalConditions><H1resonanceFrequency_Hz>123200000</H1resonanceFrequency_Hz></experimentalConditions>"
        "<encoding><encodedSpace><matrixSize><x>24</x><y>12</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{2 * fov[0]}</x><y>{fov[1]}</y><z>{fov[2]}</z></fieldOfView_mm></encodedSpace>"
        "<reconSpace><matrixSize><x>12</x><y>12</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{fov[0]}</x><y>{fov[1]}</y><z>{fov[2]}</z></fieldOfView_mm></reconSpace>"
        "<trajectory>cartesian</trajectory><encodingLimits><kspace_encoding_step_1><minimum>0</minimum>"
        "<maximum>11</maximum><center>6</center></kspace_encoding_step_1></encodingLimits></encoding>"
        f"<sequenceParameters><TR>{tr}</TR><TE>{te}</TE>{inversion}<flipAngle_deg>90</flipAngle_deg>"
        "</sequenceParameters></ismrmrdHeader>"
    ).encode()


def _h5(path: Path, header: bytes, attrs: dict, seed: int, rss: bool = True) -> Path:
    """kspace [slices, coils, height, width], reconstruction_rss [slices, height, width], ismrmrd_header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("kspace", data=np.zeros((8, 2, 24, 12), dtype=np.complex64))
        if rss:
            handle.create_dataset("reconstruction_rss", data=np.transpose(_head(seed), (2, 1, 0)) / 1e4)
        handle.create_dataset("ismrmrd_header", data=header)
        handle.attrs.update(attrs)
    return path


@pytest.fixture
def fastmri(tmp_path: Path) -> Path:
    """multicoil_train/file_brain_<ACQ>_<nnn>_<nnnnnnn>.h5 (facebookresearch/fastMRI)."""
    src = tmp_path / "brain_multicoil_train" / "multicoil_train"
    skyra = _ismrmrd_header(2.89362, 250, 2.64, None)
    _h5(src / "file_brain_AXT1POST_201_6002780.h5", skyra, {"acquisition": "AXT1POST", "patient_id": "ab12"}, 0)
    _h5(
        src / "file_brain_AXT2_201_6002781.h5",
        _ismrmrd_header(2.89362, 6000, 113, None),
        {"acquisition": "AXT2", "patient_id": "ab12"},
        1,
    )
    aera = _ismrmrd_header(1.494, 9000, 81, 2500)
    _h5(src / "file_brain_AXFLAIR_200_6002447.h5", aera, {"acquisition": "AXFLAIR", "patient_id": "cd34"}, 2)
    return src


def test_fastmri_brain_uses_the_stored_magnitude_and_the_header(fastmri: Path, tmp_path: Path) -> None:
    (path,) = _import("fastmri-brain", fastmri.parent, tmp_path / "out", "pathology=healthy")

    root = Path(load_site(path).data.bids_root)
    flair = root / "sub-cd34/anat/sub-cd34_acq-AXFLAIR_run-01_FLAIR"
    sidecar = json.loads(flair.with_suffix(".json").read_text())
    assert sidecar["MagneticFieldStrength"] == 1.494
    assert (sidecar["RepetitionTime"], sidecar["EchoTime"], sidecar["InversionTime"]) == (9.0, 0.081, 2.5)
    assert sidecar["fedmriImage"].startswith("reconstruction_rss: the root-sum-of-squares magnitude image")
    image = nib.load(f"{flair}.nii.gz")
    assert image.shape == (12, 12, 8)
    assert np.allclose(image.header.get_zooms(), (220 / 12, 220 / 12, 5.0))  # reconSpace FOV / matrix
    assert (root / "sub-ab12/anat/sub-ab12_acq-AXT1POST_run-01_ce-gadolinium_T1w.nii.gz").exists()
    assert "pathology: --assume pathology=healthy (2 subjects" in (root / "README").read_text()


def test_fastmri_brain_summary_shows_fields_and_contrasts(fastmri: Path, tmp_path: Path) -> None:
    summary = _summary(_import("fastmri-brain", fastmri, tmp_path / "out", "pathology=healthy"))["fastmri-brain"]
    assert summary["subjects"] == 2 and summary["field_strengths"] == [1.494, 2.894]
    assert summary["modalities"].keys() == {"T1ce", "T2w", "FLAIR"}
    assert summary["pathologies"] == {"healthy": 2}


def test_fastmri_brain_with_pathology_stated_as_other_is_read_as_other(fastmri: Path, tmp_path: Path) -> None:
    """fastMRI states no diagnosis: `--assume pathology=other` says so, and the reader then uses
    the slices with the pathology unknown instead of a label nobody stated."""
    summary = _summary(_import("fastmri-brain", fastmri, tmp_path / "out", "pathology=other"))["fastmri-brain"]
    assert summary["pathologies"] == {"other": 2}


def test_fastmri_brain_without_reconstruction_is_named(fastmri: Path, tmp_path: Path) -> None:
    bad = _h5(fastmri / "file_brain_AXT2_209_6001000.h5", _ismrmrd_header(3, 6000, 113, None), {}, 3, rss=False)
    expected = (
        f"{bad}: no 'reconstruction_rss' dataset (keys: ismrmrd_header, kspace); fedmri imports the stored "
        "magnitude image, which test-set files leave out"
    )
    with pytest.raises(DatasetImportError, match=f"^{re.escape(expected)}$"):
        _import("fastmri-brain", fastmri, tmp_path / "out", "pathology=healthy")


def test_fastmri_brain_needs_a_stated_pathology(fastmri: Path, tmp_path: Path) -> None:
    expected = f"{fastmri}: fastMRI brain files state no diagnosis; state it with --assume pathology=<label>"
    with pytest.raises(DatasetImportError, match=f"^{re.escape(expected)}$"):
        _import("fastmri-brain", fastmri, tmp_path / "out")


@pytest.fixture
def m4raw(tmp_path: Path) -> Path:
    """multicoil_train/<subject>_<T1|T2|FLAIR><nn>.h5 (mylyu/M4Raw); the header states no field here."""
    src = tmp_path / "M4Raw" / "multicoil_train"
    attrs = {"max": 1.0, "patient_id": "88448eec274d9248d1a2487a8548ee41"}
    t1 = _ismrmrd_header(None, 500, 18, None, fov=(240, 220, 5))
    _h5(src / "2022061003_T101.h5", t1, {**attrs, "acquisition": "AXT1"}, 0)
    _h5(src / "2022061003_T102.h5", t1, {**attrs, "acquisition": "AXT1"}, 1)
    _h5(src / "2022061003_T201.h5", _ismrmrd_header(None, 4000, 118, None), {**attrs, "acquisition": "AXT2"}, 2)
    _h5(src / "2022061003_FLAIR01.h5", _ismrmrd_header(None, 8000, 125, 2000), {**attrs, "acquisition": "AXFLAIR"}, 3)
    _h5(src / "2022061004_T101.h5", t1, {"acquisition": "AXT1"}, 4)
    return src


def test_m4raw_is_one_low_field_site_with_repetitions_as_runs(m4raw: Path, tmp_path: Path) -> None:
    (path,) = _import("m4raw", m4raw, tmp_path / "out")

    root = Path(load_site(path).data.bids_root)
    assert sorted(p.name for p in root.glob("sub-2022061003/anat/*T1w.nii.gz")) == [
        "sub-2022061003_run-01_T1w.nii.gz",
        "sub-2022061003_run-02_T1w.nii.gz",
    ]
    sidecar = json.loads((root / "sub-2022061003/anat/sub-2022061003_run-01_T1w.json").read_text())
    assert sidecar["MagneticFieldStrength"] == 0.3 and sidecar["RepetitionTime"] == 0.5
    assert np.allclose(
        nib.load(root / "sub-2022061003/anat/sub-2022061003_run-01_T1w.nii.gz").header.get_zooms(), (220 / 12, 20, 5)
    )
    assert _indexed(path) == ({"sub-2022061003": "healthy", "sub-2022061004": "healthy"}, [])


def test_m4raw_summary_shows_0p3_tesla(m4raw: Path, tmp_path: Path) -> None:
    summary = _summary(_import("m4raw", m4raw, tmp_path / "out"))["m4raw"]
    assert summary["subjects"] == 2 and summary["field_strengths"] == [0.3]
    assert summary["modalities"].keys() == {"T1w", "T2w", "FLAIR"} and summary["pathologies"] == {"healthy": 2}


def test_m4raw_corrupt_file_is_named(m4raw: Path, tmp_path: Path) -> None:
    bad = m4raw / "2022061004_T101.h5"
    _truncate(bad)
    with pytest.raises(DatasetImportError, match=f"^{re.escape(str(bad))}: corrupt or truncated HDF5 file "):
        _import("m4raw", m4raw, tmp_path / "out")


# ---- the command -------------------------------------------------------------------------------


def test_cli_imports_prints_one_line_per_subject_and_refuses_to_overwrite(oasis3: Path, tmp_path: Path) -> None:
    args = ["sites", "import", "oasis3", str(oasis3), "--out", str(tmp_path / "out")]
    first = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert first.exit_code == 0, first.output
    assert "image data linked (symlinks to SRC)" in first.output
    assert "oasis3: sub-OAS30001 (healthy): FLAIR, T1w, T2w" in first.output
    again = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert again.exit_code == 2 and "already exists" in again.output


def test_cli_rejects_an_unknown_assumption(ixi: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["sites", "import", "ixi", str(ixi), "--out", str(tmp_path / "o"), "--assume", "te=3"],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2 and "expectedKEY=VALUEwithKEYoneof:field=" in "".join(result.output.split())


def test_the_reader_refuses_an_imported_site_whose_link_broke(ixi: Path, tmp_path: Path) -> None:
    """Linked sites point into SRC: if SRC moves, the reader says so by file (it is not silently empty)."""
    paths = _import("ixi", ixi, tmp_path / "out")
    (ixi / "IXI025-IOP-0900-T1.nii.gz").unlink()
    with pytest.raises(SiteDataError, match=re.escape("sub-IXI025_T1w.nii.gz")):
        load_volume(Path(load_site(paths[2]).data.bids_root) / "sub-IXI025" / "anat" / "sub-IXI025_T1w.nii.gz")


# ---- every importer: one malformed case of each kind it can meet ---------------------------------


@pytest.mark.parametrize("dataset", ["ixi", "fets", "oasis3", "fastmri-brain"])
def test_a_corrupt_file_is_named(dataset: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """(BraTS and M4Raw have their own above.) The import stops at the first corrupt file, by name."""
    fixture = {"ixi": "ixi", "fets": "fets", "oasis3": "oasis3", "fastmri-brain": "fastmri"}[dataset]
    src: Path = request.getfixturevalue(fixture)
    bad = (
        src
        / {
            "ixi": "IXI012-HH-1211-T1.nii.gz",
            "fets": "FeTS2022_00001/FeTS2022_00001_t1.nii.gz",
            "oasis3": "OAS30001_MR_d0129/anat1/sub-OAS30001_ses-d0129_run-01_T1w.nii.gz",
            "fastmri-brain": "file_brain_AXT2_201_6002781.h5",
        }[dataset]
    )
    _truncate(bad)
    kind = "HDF5" if dataset == "fastmri-brain" else "NIfTI"
    assume = {"fets": ["field=3"], "fastmri-brain": ["pathology=healthy"]}.get(dataset, [])
    with pytest.raises(DatasetImportError, match=f"^{re.escape(str(bad))}: corrupt or truncated {kind} file "):
        _import(dataset, src, tmp_path / "out", *assume)


def test_oasis3_a_sidecar_without_field_strength_needs_it_stated(oasis3: Path, tmp_path: Path) -> None:
    sidecar = next(oasis3.rglob("sub-OAS30001_ses-d0129_FLAIR.json"))
    sidecar.write_text(json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "MagneticFieldStrength"}))  # fmt: skip
    with pytest.raises(
        DatasetImportError, match=f"^{re.escape(str(sidecar))}: the dataset does not state the magnetic"
    ):
        _import("oasis3", oasis3, tmp_path / "out")
    (path,) = _import("oasis3", oasis3, tmp_path / "out", "field=3")
    flair = next(Path(load_site(path).data.bids_root).rglob("*_FLAIR.json"))
    assert json.loads(flair.read_text())["fedmriAssumptions"] == {"MagneticFieldStrength": "stated by the user: --assume field=3"}  # fmt: skip


def test_fastmri_brain_a_header_without_field_strength_needs_it_stated(fastmri: Path, tmp_path: Path) -> None:
    bad = _h5(fastmri / "file_brain_AXT2_209_6001000.h5", _ismrmrd_header(None, 6000, 113, None), {}, 3)
    with pytest.raises(DatasetImportError, match=f"^{re.escape(str(bad))}: the dataset does not state the magnetic"):
        _import("fastmri-brain", fastmri, tmp_path / "out", "pathology=healthy")


@pytest.mark.parametrize(
    ("dataset", "fixture", "assume", "stated"),
    [
        ("ixi", "ixi", "pathology=healthy", "IXI states every scanner's field strength"),
        ("ixi", "ixi", "field=3", "IXI states every scanner's field strength"),
        ("m4raw", "m4raw", "field=1.5", "M4Raw states its one 0.3 T scanner"),
        ("fets", "fets", "pathology=other", "FeTS (BraTS) states that every subject has a glioma"),
    ],
)
def test_an_assumption_for_what_the_dataset_states_is_refused(
    dataset: str, fixture: str, assume: str, stated: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    key = assume.split("=")[0]
    with pytest.raises(
        DatasetImportError, match=f"^--assume {key}=... does not apply to {dataset}: {re.escape(stated)}"
    ):
        _import(dataset, request.getfixturevalue(fixture), tmp_path / "out", assume)


def test_hdf5_sites_say_they_were_converted_not_linked(m4raw: Path, tmp_path: Path) -> None:
    args = ["sites", "import", "m4raw", str(m4raw.parent), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "image data converted from HDF5 (reconstruction_rss) and written as NIfTI" in result.output
    readme = (tmp_path / "out" / "m4raw" / "README").read_text()
    assert "Image data from the source: 5 scans converted from the source's HDF5" in readme
    assert "symbolic links" not in readme
    assert not any(p.is_symlink() for p in (tmp_path / "out" / "m4raw").rglob("*.nii.gz"))


def test_the_recorded_command_runs_again(fets: Path, tmp_path: Path) -> None:
    """The site README's "Imported with:" line holds every option given, so it imports the same sites."""
    csv_path = tmp_path / "my-partitioning.csv"
    csv_path.write_text((fets / "partitioning_1.csv").read_text())
    args = ["sites", "import", "fets", str(fets), "--out", str(tmp_path / "a"), "--copy",
            "--assume", "field=3", "--partitioning", str(csv_path)]  # fmt: skip
    assert CliRunner().invoke(app, args, env={"COLUMNS": "300"}).exit_code == 0
    line = next(
        x for x in (tmp_path / "a" / "fets-p01" / "README").read_text().splitlines() if x.startswith("Imported with: ")
    )
    words = shlex.split(line.removeprefix("Imported with: "))
    assert words[0] == "fedmri" and words[words.index("--out") + 1] == str(tmp_path / "a")
    words[words.index("--out") + 1] = str(tmp_path / "b")
    again = CliRunner().invoke(app, words[1:], env={"COLUMNS": "300"})
    assert again.exit_code == 0, again.output
    for name in ("fets-p01", "fets-p02"):
        first, second = (
            sorted(p.relative_to(tmp_path / r / name) for p in (tmp_path / r / name).rglob("*")) for r in "ab"
        )
        assert first == second
    assert not any(p.is_symlink() for p in (tmp_path / "b").rglob("*.nii.gz"))  # --copy was recorded


def test_what_belongs_to_no_site_is_listed_beside_the_sites(ixi: Path, fets: Path, tmp_path: Path) -> None:
    """A file no hospital claims, a case no partition lists, and a partition left without scans are
    named with their reasons in OUT/<dataset>-left-out.tsv, not only on the console."""
    odd = _nifti(ixi / "notes" / "scout.nii.gz")
    _import("ixi", ixi, tmp_path / "ixi")
    rows = (tmp_path / "ixi" / "ixi-left-out.tsv").read_text().splitlines()
    assert rows == ["file\treason", f"{odd}\tnot an IXI file name (IXI<nnn>-<hospital>-<nnnn>-<modality>.nii.gz)"]

    unlisted = _brats_case(fets, "FeTS2022_00005", "_", ["t1", "t1ce", "t2", "flair", "seg"], 50)
    csv_path = fets / "partitioning_1.csv"
    csv_path.write_text(csv_path.read_text() + "3,FeTS2022_00007\n")
    paths = _import("fets", fets, tmp_path / "fets", "field=3")
    assert [p.stem for p in paths] == ["fets-p01", "fets-p02"]
    rows = (tmp_path / "fets" / "fets-left-out.tsv").read_text().splitlines()
    assert f"{unlisted}\tnot listed in {csv_path}" in rows
    assert "fets-p03\tno scans left, so no site was written" in rows
    assert any(r.startswith("FeTS2022_00007\tlisted in partitioning_1.csv but no folder") for r in rows)


def test_the_summary_table_names_every_skipped_file(ixi: Path, tmp_path: Path) -> None:
    """Lenient sites drop unusable files: the plain summary (not only --json) names each one."""
    paths = _import("ixi", ixi, tmp_path / "out")
    hh = paths[1]
    hh.write_text(hh.read_text().replace("strict: true", "strict: false"))
    assert load_site(hh).data.strict is False
    (ixi / "IXI013-HH-1212-T1.nii.gz").unlink()  # the site's link to it breaks
    result = CliRunner().invoke(app, ["sites", "summary", str(hh)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    flat = "".join(result.output.split())  # rich wraps long paths anywhere
    assert "skippedfiles(1),eachwithitsreason:" in flat
    assert re.search(r"ixi-hh:\S+sub-IXI013_T1w\.nii\.gz:corruptortruncatedNIfTIfile", flat), result.output


def test_oasis3_a_scan_of_another_subject_in_a_session_folder_is_left_out(oasis3: Path, tmp_path: Path) -> None:
    stray = oasis3 / "OAS30001_MR_d0129" / "anat9" / "sub-OAS30002_ses-d0129_T2w.nii.gz"
    _oasis_scan(stray.parent, "sub-OAS30002_ses-d0129_T2w", 9, T2_SIDECAR)
    (path,) = _import("oasis3", oasis3, tmp_path / "out")
    root = Path(load_site(path).data.bids_root)
    assert f"{stray}: names subject OAS30002 but lies in OAS30001's session folder" in (root / "README").read_text()
    assert not list(root.glob("sub-OAS30002/**/*_T2w.nii.gz"))
