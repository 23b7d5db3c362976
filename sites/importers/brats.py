"""BraTS glioma cases (2021 and 2023 naming) as one site: T1, T1ce, T2, FLAIR and the tumour mask.

Layouts, one folder per case:
- 2021: `BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz`; seg labels 1 necrotic core,
  2 peritumoral oedema, 4 enhancing tumour. Source: Baid et al. 2021, "The RSNA-ASNR-MICCAI BraTS
  2021 Benchmark", arXiv:2107.02314, and the training archive's folders as listed e.g. in
  huggingface.co/datasets/rocky93/BraTS_segmentation (BraTS2021_00032/BraTS2021_00032_t1ce.nii.gz).
- 2023 (glioma): `BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`, the last
  three digits being the timepoint; seg labels 1 necrotic core, 2 surrounding FLAIR hyperintensity,
  3 enhancing tumour. Source: ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData as listed e.g. in
  huggingface.co/datasets/obi77/brats23-first-10-examples (BraTS-GLI-00012-000-t1c.nii.gz, ...).
All cases are pre-operative gliomas, skull-stripped, co-registered and resampled to 1 mm; no
case states its scanner, field strength, TR or TE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.conditions import Modality, Pathology
from sites.importers.site_writer import (
    Assumptions,
    DatasetImportError,
    DatasetInfo,
    Options,
    Participant,
    Report,
    Scan,
    Site,
    check_nifti,
    field_strength,
    with_field,
    write_site,
)

DATASET = DatasetInfo(
    name="BraTS",
    url="https://www.synapse.org/brats",
    license="BraTS data use terms (cite the BraTS papers; see the challenge's Synapse page)",
    layout_source="Baid et al. 2021 (arXiv:2107.02314); ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData",
)


@dataclass(frozen=True)
class Naming:
    """One year's case naming: folder pattern, file separator, file suffix -> modality, mask legend."""

    year: str
    folder: re.Pattern[str]  # group 1: the subject number; group 2 (2023): the timepoint
    separator: str
    modalities: dict[str, Modality]
    mask_labels: dict[str, int]


NAMINGS = (
    Naming(
        "2021",
        re.compile(r"^BraTS2021_(\d+)$"),
        "_",
        {"t1": Modality.T1w, "t1ce": Modality.T1ce, "t2": Modality.T2w, "flair": Modality.FLAIR},
        {"necrotic tumour core": 1, "peritumoral oedema": 2, "enhancing tumour": 4},
    ),
    Naming(
        "2023",
        re.compile(r"^BraTS-GLI-(\d+)-(\d+)$"),
        "-",
        {"t1n": Modality.T1w, "t1c": Modality.T1ce, "t2w": Modality.T2w, "t2f": Modality.FLAIR},
        {"necrotic tumour core": 1, "surrounding FLAIR hyperintensity": 2, "enhancing tumour": 3},
    ),
)
NOTES = [
    "pathology: glioma for every subject (BraTS holds pre-operative gliomas only); the lesion mask is the "
    "case's seg file (non-zero = tumour), under derivatives/lesions/",
    "MagneticFieldStrength, RepetitionTime, EchoTime: BraTS states none of them (its cases come from many "
    "institutions and scanners); left out unless --assume field=... was given",
    "SkullStripped: true (BraTS volumes are skull-stripped, co-registered and resampled to 1 mm)",
]


def read_case(folder: Path, case: str, naming: Naming, site: Site, assume: Assumptions, label: str) -> None:
    """Add one case's scans and its mask to `site`. A missing modality or seg is skipped and reported;
    a corrupt file is an error."""
    scans = []
    for key, modality in naming.modalities.items():
        path = folder / f"{case}{naming.separator}{key}.nii.gz"
        if not path.exists():
            site.skipped.append(
                (str(path), f"missing: {case} has no {key} ({modality.value}); its other scans are kept")
            )
            continue
        check_nifti(path)
        tesla, assumed = field_strength(None, str(path), assume)
        scans.append(Scan(label, modality, with_field({"SkullStripped": True}, tesla, assumed), source=path))
    if not scans:
        site.skipped.append((str(folder), f"{case} holds none of {', '.join(naming.modalities)}; case left out"))
        return
    seg = folder / f"{case}{naming.separator}seg.nii.gz"
    if seg.exists():
        check_nifti(seg)
    else:
        site.skipped.append((str(seg), "missing: no tumour mask, so every slice of this subject is labelled glioma"))
    site.scans.extend(scans)
    site.participants[label] = Participant(
        label, Pathology.glioma, seg if seg.exists() else None, naming.mask_labels, source_id=case
    )


def naming_of(folders: list[Path], src: Path) -> Naming:
    """The one naming the case folders under `src` follow; none or both is an error."""
    found = {n.year for n in NAMINGS for f in folders if n.folder.match(f.name)}
    if len(found) != 1:
        what = "both the 2021 and the 2023 naming" if found else "no BraTS case folder"
        raise DatasetImportError(
            f"{src}: {what} (expected BraTS2021_00000/ or BraTS-GLI-00000-000/ folders); import one release at a time"
        )
    return next(n for n in NAMINGS if n.year in found)


def import_brats(src: Path, options: Options, command: str, report: Report) -> list[Path]:
    """Import an extracted BraTS 2021 or 2023 glioma training set as the site `brats<year>`."""
    folders = sorted(p for p in src.iterdir() if p.is_dir()) if src.is_dir() else []
    naming = naming_of(folders, src)
    site = Site(f"brats{naming.year}", notes=list(NOTES))
    for folder in folders:
        match = naming.folder.match(folder.name)
        if not match:
            site.skipped.append((str(folder), "not a BraTS case folder of the " + naming.year + " naming"))
            continue
        if naming.year == "2023" and match.group(2) != "000":
            site.skipped.append((str(folder), "a later timepoint of the same patient; one timepoint per subject"))
            continue
        read_case(folder, folder.name, naming, site, options.assume, match.group(1))
    return [write_site(site, DATASET, options, command, report)]
