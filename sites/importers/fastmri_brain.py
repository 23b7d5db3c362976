"""fastMRI brain: NYU Langone's multi-coil brain scans (1.5 T and 3 T) as one site, from the stored magnitude image.

Layout: one HDF5 file per acquisition, `file_brain_<acquisition>_<nnn>_<nnnnnnn>.h5`, e.g.
`file_brain_AXT1POST_201_6002780.h5`, in `multicoil_train/` and `multicoil_val/`; the acquisition
(AXT1, AXT1PRE, AXT1POST, AXT2, AXFLAIR) is also the file's `acquisition` attribute, and
`patient_id` names the patient. Sources: facebookresearch/fastMRI fastmri/data/README.md (keys),
fastmri/data/mri_data.py (header fields); the acquisitions as in public fastMRI brain file lists
(e.g. file_brain_AXFLAIR_200_6002447.h5, file_brain_AXT1PRE_..., file_brain_AXT2_205_2050121.h5).
File and header reading: sites/importers/hdf5.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.conditions import Modality
from sites.importers import hdf5
from sites.importers.site_writer import (
    DatasetImportError,
    DatasetInfo,
    Options,
    Participant,
    Report,
    Scan,
    Site,
    bids_label,
    field_strength,
    pathology_or_assumed,
    with_field,
    write_site,
)

DATASET = DatasetInfo(
    name="fastMRI brain",
    url="https://fastmri.med.nyu.edu/",
    license="fastMRI Dataset Sharing Agreement (NYU Langone; research use, no redistribution)",
    layout_source="facebookresearch/fastMRI fastmri/data/README.md and fastmri/data/mri_data.py",
)
ACQUISITIONS = {
    "AXT1": Modality.T1w,
    "AXT1PRE": Modality.T1w,
    "AXT1POST": Modality.T1ce,
    "AXT2": Modality.T2w,
    "AXFLAIR": Modality.FLAIR,
}
_NAME = re.compile(r"^file_brain_([A-Z0-9]+)_(\d+)_(\d+)\.h5$")
NOTES = [
    f"image: {hdf5.IMAGE_NOTE}",
    f"geometry: {hdf5.GEOMETRY_NOTE}",
    "MagneticFieldStrength: ismrmrd_header acquisitionSystemInformation/systemFieldStrength_T, as stated "
    "(not rounded to the nominal field)",
    "RepetitionTime, EchoTime, InversionTime: ismrmrd_header sequenceParameters TR, TE, TI (ms), in seconds",
    "modality: the file's acquisition attribute (AXT1, AXT1PRE -> T1w; AXT1POST -> T1ce; AXT2 -> T2w; "
    "AXFLAIR -> FLAIR), kept as the acq- entity",
    "pathology: the fastMRI brain files state no diagnosis; every subject carries the --assume pathology label",
]


def import_fastmri_brain(src: Path, options: Options, command: str, report: Report) -> list[Path]:
    """Import fastMRI brain HDF5 files as the site `fastmri-brain` (one subject per patient_id)."""
    files = sorted(src.rglob("file_brain_*.h5"))
    if not files:
        raise DatasetImportError(f"{src}: no file_brain_*.h5 files (fastMRI brain multicoil_train / multicoil_val)")
    pathology, assumed = pathology_or_assumed(str(src), "fastMRI brain files state no diagnosis", options.assume)
    site = Site("fastmri-brain", notes=list(NOTES))
    runs: dict[tuple[str, str], int] = {}
    for path in files:
        match = _NAME.match(path.name)
        if not match:
            site.skipped.append((str(path), "not a fastMRI brain file name (file_brain_<ACQ>_<nnn>_<nnnnnnn>.h5)"))
            continue
        volume = hdf5.read_h5(path)
        acquisition = str(volume.attrs.get("acquisition", match.group(1)))
        if acquisition not in ACQUISITIONS:
            site.skipped.append((str(path), f"acquisition {acquisition!r} is not one of {', '.join(ACQUISITIONS)}"))
            continue
        source_id = str(volume.attrs.get("patient_id", f"{match.group(2)}{match.group(3)}"))
        label = bids_label(source_id, f"{path}: patient_id")
        tesla, assumed_field = field_strength(volume.header.field_strength, str(path), options.assume)
        runs[(label, acquisition)] = runs.get((label, acquisition), 0) + 1
        entities = f"_acq-{acquisition}_run-{runs[(label, acquisition)]:02d}"
        sidecar = with_field(hdf5.sidecar_of(volume.header, None), tesla, assumed_field)
        site.scans.append(
            Scan(label, ACQUISITIONS[acquisition], sidecar, volume=hdf5.as_nifti(volume), entities=entities)
        )
        site.participants[label] = Participant(label, pathology, source_id=source_id, assumed_pathology=assumed)
    return [write_site(site, DATASET, options, command, report)]
