"""IXI: ~600 healthy adults from three London hospitals, one site per hospital.

Layout (as extracted from IXI-T1.tar, IXI-T2.tar, IXI-PD.tar): one NIfTI per scan, named
`IXI<patient>-<hospital>-<id>-<modality>.nii.gz`, e.g. `IXI002-Guys-0828-T1.nii.gz`; no sidecars.
Source: https://brain-development.org/ixi-dataset/ ("nearly 600 MR images from normal, healthy
subjects"; CC BY-SA 3.0), as restated in owkin/FLamby flamby/datasets/fed_ixi/README.md
("IXI[patient id]-[hospital name]-[id]-[modality].nii.gz"; hospitals Guys, HH, IOP).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.conditions import Modality, Pathology
from sites.importers.site_writer import (
    DatasetImportError,
    DatasetInfo,
    Options,
    Participant,
    Report,
    Scan,
    Site,
    check_nifti,
    write_left_out,
    write_site,
)

DATASET = DatasetInfo(
    name="IXI",
    url="https://brain-development.org/ixi-dataset/",
    license="CC BY-SA 3.0",
    layout_source="brain-development.org/ixi-dataset; owkin/FLamby flamby/datasets/fed_ixi/README.md",
)


@dataclass(frozen=True)
class Scanner:
    site_id: str
    institution: str
    field_strength: float  # tesla
    manufacturer: str


# The IXI site's scanner table: Hammersmith Hospital Philips 3 T, Guy's Hospital Philips 1.5 T,
# Institute of Psychiatry GE 1.5 T (brain-development.org/ixi-dataset).
SCANNERS = {
    "Guys": Scanner("ixi-guys", "Guy's Hospital", 1.5, "Philips"),
    "HH": Scanner("ixi-hh", "Hammersmith Hospital", 3.0, "Philips"),
    "IOP": Scanner("ixi-iop", "Institute of Psychiatry", 1.5, "GE"),
}
MODALITIES = {"T1": Modality.T1w, "T2": Modality.T2w, "PD": Modality.PDw}
_NAME = re.compile(r"^IXI(\d+)-([A-Za-z]+)-(\d+)-(.+)\.nii\.gz$")
NOTES = [
    "MagneticFieldStrength and Manufacturer: the IXI site's scanner table (Guy's 1.5 T Philips, "
    "Hammersmith 3 T Philips, IOP 1.5 T GE), chosen by the hospital in the file name",
    "RepetitionTime, EchoTime: not in the IXI NIfTI files; left out of the sidecars (unknown)",
    "pathology: healthy for every subject (IXI: 'normal, healthy subjects')",
]


def import_ixi(src: Path, options: Options, command: str, report: Report) -> list[Path]:
    """Import an extracted IXI download: one site per hospital. -> the sites' YAML paths"""
    sites = {scanner.site_id: Site(scanner.site_id, notes=list(NOTES)) for scanner in SCANNERS.values()}
    files = sorted(src.rglob("*.nii.gz"))
    if not files:
        raise DatasetImportError(f"{src}: no .nii.gz files; extract IXI-T1.tar, IXI-T2.tar and IXI-PD.tar here")
    unplaced = []
    for path in files:
        match = _NAME.match(path.name)
        if not match:
            unplaced.append((str(path), "not an IXI file name (IXI<nnn>-<hospital>-<nnnn>-<modality>.nii.gz)"))
            continue
        patient, hospital, _, contrast = match.groups()
        if hospital not in SCANNERS:
            raise DatasetImportError(
                f"{path}: unknown IXI hospital {hospital!r} in the file name; known: {', '.join(SCANNERS)}"
            )
        scanner = SCANNERS[hospital]
        site = sites[scanner.site_id]
        if contrast not in MODALITIES:
            site.skipped.append((str(path), f"modality {contrast!r} is not an anatomical contrast fedmri reads"))
            continue
        check_nifti(path)
        label = f"IXI{patient}"
        site.participants[label] = Participant(label, Pathology.healthy, source_id=f"IXI{patient}-{hospital}")
        sidecar = {
            "MagneticFieldStrength": scanner.field_strength,
            "Manufacturer": scanner.manufacturer,
            "InstitutionName": scanner.institution,
        }
        site.scans.append(Scan(label, MODALITIES[contrast], sidecar, source=path))
    paths = [write_site(site, DATASET, options, command, report) for site in sites.values() if site.scans]
    write_left_out(options.out, "ixi", unplaced, [site for site in sites.values() if not site.scans], report)
    return paths
