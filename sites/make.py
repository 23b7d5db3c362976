"""Write a synthetic hospital as a BIDS dataset: raw scans, sidecars, participants and ground truth."""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from omegaconf import OmegaConf

from common.conditions import Modality
from sites import physics
from sites.anatomy import load_anatomy
from sites.config import SiteConfig, SyntheticSpec, site_to_dict
from sites.pathology import GLIOMA_LABELS, MS_LABEL
from sites.synth import SubjectVolumes, anatomy_tensor, synthesize_subject

GROUND_TRUTH = "derivatives/groundtruth"
# BIDS file name part of each modality (T1ce is a T1w with a contrast-agent entity).
BIDS_SUFFIX = {
    Modality.T1w: "T1w",
    Modality.T1ce: "ce-gadolinium_T1w",
    Modality.T2w: "T2w",
    Modality.FLAIR: "FLAIR",
    Modality.PDw: "PDw",
}
_STAMP = ".fedmri-site.json"  # spec hash of a finished site: lets `sites make` skip unchanged sites


def spec_hash(spec: SyntheticSpec) -> str:
    """Stable hash of everything that determines a synthetic site's files."""
    container = OmegaConf.to_container(OmegaConf.structured(spec), enum_to_str=True)
    text = json.dumps(container, sort_keys=True)
    return hashlib.sha256(f"fedmri-sites-v1:{text}".encode()).hexdigest()[:16]


def make_site(
    site: SiteConfig,
    out_dir: Path,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> bool:
    """Generate `site` into out_dir/<site_id>/ (BIDS). Returns False if an identical site exists.

    The dataset is written to a temporary folder and renamed into place, so an interrupted run
    never leaves a half-written site behind.
    """
    spec = site.synthetic
    if spec is None:
        raise ValueError(f"site {site.site_id!r} has no 'synthetic' section: it is a real site")
    root = out_dir / site.site_id
    digest = spec_hash(spec)
    stamp = root / _STAMP
    if stamp.exists() and json.loads(stamp.read_text()).get("spec_hash") == digest:
        if progress:
            progress(spec.num_subjects)
        return False
    tmp = out_dir / f".tmp-{site.site_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_dataset_descriptions(tmp, site)

    rows = []
    for row in _generate(tmp, spec, workers):
        rows.append(row)
        if progress:
            progress(1)
    _write_participants(tmp, rows)
    (tmp / _STAMP).write_text(json.dumps({"spec_hash": digest}))
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return True


def _single_threaded() -> None:
    """Forked workers run torch on one thread: a fork after the parent used OpenMP deadlocks
    in the child's first parallel region (libgomp is not fork-safe), and the workers already
    share the cores between them."""
    import torch

    torch.set_num_threads(1)


def _make_subject(root: Path, spec: SyntheticSpec, index: int) -> dict:
    return _write_subject(root, spec, synthesize_subject(spec, index))


def _generate(root: Path, spec: SyntheticSpec, workers: int) -> Iterator[dict]:
    """Synthesize and write every subject, yielding participants.tsv rows in subject order."""
    n = spec.num_subjects
    if workers <= 1:
        for i in range(n):
            yield _make_subject(root, spec, i)
        return
    load_anatomy()  # build once in the parent; forked workers share it copy-on-write
    anatomy_tensor()  # and the sampling tensor made from it
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_single_threaded) as pool:
        yield from pool.map(_make_subject, [root] * n, [spec] * n, range(n))


def _write_dataset_descriptions(root: Path, site: SiteConfig) -> None:
    generated_by = [{"Name": "fedmri sites make", "Description": "synthetic MRI from the MNI152 2009a template"}]
    description = {
        "Name": f"fedmri synthetic hospital {site.site_id}",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": generated_by,
    }
    (root / "dataset_description.json").write_text(json.dumps(description, indent=2))
    truth = root / GROUND_TRUTH
    truth.mkdir(parents=True)
    derived = {**description, "Name": f"ground truth of {site.site_id}", "DatasetType": "derivative"}
    (truth / "dataset_description.json").write_text(json.dumps(derived, indent=2))
    columns = {
        "age": {"Description": "age at scan", "Units": "year"},
        "sex": {"Description": "F or M"},
        "pathology": {
            "Description": "diagnosis",
            "Levels": {
                "healthy": "no pathology",
                "glioma": "glioma",
                "ms": "multiple sclerosis",
                "dementia": "dementia",
            },
        },
        "ventricle_expansion_mm": {"Description": "tissue around the lateral ventricles turned to CSF", "Units": "mm"},
        "cortical_thinning_mm": {"Description": "cortical grey matter turned to CSF on the pial side", "Units": "mm"},
        "hippocampal_atrophy": {"Description": "fraction of hippocampal grey matter lost (0-1)"},
    }
    (root / "participants.json").write_text(json.dumps(columns, indent=2))


def _save(data: np.ndarray, affine: np.ndarray, orientation: str, path: Path, dtype: type) -> None:
    """Save a RAS volume as NIfTI, stored in the site's axis orientation (e.g. LPS)."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(tuple(orientation))
    )
    stored = nib.orientations.apply_orientation(data, transform)
    stored_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    image = nib.Nifti1Image(np.ascontiguousarray(stored), stored_affine)
    image.header.set_data_dtype(dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(stored_affine, code=1)
    image.set_sform(stored_affine, code=1)
    nib.save(image, path)


def _write_subject(root: Path, spec: SyntheticSpec, volumes: SubjectVolumes) -> dict:
    draw = volumes.draw
    sub = draw.participant_id
    anat = root / sub / "anat"
    anat.mkdir(parents=True)
    orientation = spec.scanner.orientation
    for modality, scan in volumes.scans.items():
        stem = anat / f"{sub}_{BIDS_SUFFIX[modality]}"
        _save(
            np.clip(np.round(scan), 0, 32767).astype(np.int16),
            volumes.affine,
            orientation,
            Path(f"{stem}.nii.gz"),
            np.int16,
        )
        Path(f"{stem}.json").write_text(json.dumps(_sidecar(spec, modality), indent=2))

    truth = root / GROUND_TRUTH / sub / "anat"
    truth.mkdir(parents=True)
    _save(volumes.lesion_labels, volumes.affine, orientation, truth / f"{sub}_desc-lesion_mask.nii.gz", np.uint8)
    labels = (
        dict(GLIOMA_LABELS) if draw.pathology.glioma else ({"ms_lesion": MS_LABEL} if draw.pathology.ms_lesions else {})
    )
    (truth / f"{sub}_desc-lesion_mask.json").write_text(
        json.dumps({"Labels": labels, "Pathology": draw.pathology.pathology.value}, indent=2)
    )
    for name, fraction in volumes.tissue.items():
        # Stored as uint8 with a NIfTI scale factor (nibabel sets scl_slope): 1/255 precision.
        _save(
            np.clip(fraction, 0, 1), volumes.affine, orientation, truth / f"{sub}_label-{name}_probseg.nii.gz", np.uint8
        )

    atrophy = asdict(draw.pathology.atrophy)
    return {
        "participant_id": sub,
        "age": f"{draw.age:.1f}",
        "sex": draw.sex,
        "pathology": draw.pathology.pathology.value,
        **{k: f"{v:.3f}" for k, v in atrophy.items()},
    }


def _sidecar(spec: SyntheticSpec, modality: Modality) -> dict:
    seq = spec.sequences[modality]
    sidecar = {
        "MagneticFieldStrength": spec.field_strength,
        "RepetitionTime": seq.repetition_time,
        "EchoTime": seq.echo_time,
        "SliceThickness": spec.scanner.slice_thickness_mm,
        "Manufacturer": "fedmri-synthetic",
        "ScanningSequence": "IR" if modality is Modality.FLAIR else "SE",
    }
    if modality is Modality.FLAIR:
        sidecar["InversionTime"] = round(
            seq.inversion_time or physics.flair_inversion_time(spec.field_strength, seq.repetition_time), 4
        )
    if modality is Modality.T1ce:
        sidecar["ContrastBolusIngredient"] = "GADOLINIUM"
    return sidecar


def _write_participants(root: Path, rows: list[dict]) -> None:
    with open(root / "participants.tsv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_site_yaml(site: SiteConfig, out_dir: Path) -> Path:
    """Write the site's YAML beside its data, with bids_root relative to the YAML file.

    The site's home (ledger, signing key) is written as an absolute path: moving the YAML file
    later does not move, and so cannot reset, the site's privacy budget."""
    raw = site_to_dict(site)
    raw["data"]["bids_root"] = f"./{site.site_id}"
    raw["home"] = site.home or str((out_dir / ".fedmri-home" / site.site_id).resolve())
    path = out_dir / f"{site.site_id}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
