"""OASIS-3: ageing and Alzheimer's disease, one site; pathology from the Clinical Dementia Rating.

Layouts:
- MR sessions as downloaded by NrgXnat/oasis-scripts (download_oasis_scans.sh: "directory_name/
  OAS30001_MR_d0129/anat1/file.json, file.nii.gz"), or as XNAT resources with the NIfTI under
  `anatN/NIFTI/` and its JSON sidecar under `anatN/BIDS/` (the layout aramis-lab/clinica's
  oasis3_to_bids converter reads). File names are BIDS-like, e.g.
  `sub-OAS30001_ses-d0129_run-01_T1w.nii.gz`, `sub-OAS30001_ses-d0129_acq-TSE_T2w.nii.gz`; the
  session label `d0129` is days since the subject's entry into the study.
- Clinical data: `OASIS3_UDSb4_cdr.csv` (UDS form B4) with the columns `OASISID`,
  `days_to_visit` and `CDRTOT` (global CDR: 0, 0.5, 1, 2, 3), as read by clinica's converter
  (`on=["OASISID", "days_to_visit", ...]`, `"CDRTOT": "cdr"`).
The JSON sidecars are dcm2niix output: MagneticFieldStrength in tesla, times in seconds.
"""

from __future__ import annotations

import csv
import json
import re
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
    pathology_label,
    with_field,
    write_site,
)

DATASET = DatasetInfo(
    name="OASIS-3",
    url="https://sites.wustl.edu/oasisbrains/",
    license="OASIS Data Use Agreement (free registration; no redistribution, cite OASIS-3)",
    layout_source="NrgXnat/oasis-scripts download_oasis_scans.sh; aramis-lab/clinica oasis3_to_bids",
)
CDR_FILE = "OASIS3_UDSb4_cdr.csv"
MAX_VISIT_GAP_DAYS = 365  # our choice: a CDR visit labels an MR session only within a year of it
MODALITIES = {"T1w": Modality.T1w, "T2w": Modality.T2w, "FLAIR": Modality.FLAIR}
_SESSION = re.compile(r"^(OAS3\d+)_MR_d(\d+)$")
_FILE = re.compile(r"^sub-(OAS3\d+)_ses-(d\d+)((?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_([A-Za-z0-9]+)\.nii(\.gz)?$")
NOTES = [
    "MagneticFieldStrength, RepetitionTime, EchoTime, InversionTime: the scan's own OASIS-3 JSON sidecar "
    "(dcm2niix: tesla, seconds), copied unchanged",
    f"pathology: global CDR (CDRTOT in {CDR_FILE}) of the clinical visit nearest the MR session, within "
    f"{MAX_VISIT_GAP_DAYS} days: CDR 0 -> healthy, CDR > 0 -> dementia",
    "one MR session per subject (the earliest with a CDR label): fedmri labels pathology per subject",
]


def read_cdr(path: Path) -> dict[str, list[tuple[int, str, int]]]:
    """OASISID -> [(days_to_visit, CDRTOT as written, CSV line)], from the UDS B4 spreadsheet."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"OASISID", "days_to_visit", "CDRTOT"} <= set(rows[0]):
        raise DatasetImportError(f"{path}: needs the columns OASISID, days_to_visit and CDRTOT")
    visits: dict[str, list[tuple[int, str, int]]] = {}
    for line, row in enumerate(rows, start=2):
        try:
            day = int(float(row["days_to_visit"]))
        except ValueError:
            raise DatasetImportError(
                f"{path}: line {line}: days_to_visit {row['days_to_visit']!r} is not a number"
            ) from None
        visits.setdefault(row["OASISID"].strip(), []).append((day, row["CDRTOT"].strip(), line))
    return visits


def pathology_of_cdr(text: str, where: str, assume: Assumptions) -> tuple[Pathology | None, str]:
    """CDR 0 -> healthy, CDR > 0 -> dementia; anything else needs --assume pathology."""
    try:
        cdr = float(text)
    except ValueError:
        cdr = -1.0
    if cdr == 0:
        return Pathology.healthy, ""
    if cdr in (0.5, 1, 2, 3):
        return Pathology.dementia, ""
    if assume.pathology is not None or assume.pathology_other:
        return assume.pathology, f"--assume pathology={pathology_label(assume.pathology)}"
    raise DatasetImportError(
        f"{where}: CDRTOT {text!r} is not a CDR (0, 0.5, 1, 2, 3); state the label with --assume pathology=<label>"
    )


def _find_cdr(src: Path, clinical: Path | None) -> Path:
    if clinical is not None:
        return clinical
    found = sorted(src.rglob(CDR_FILE))
    if not found:
        raise DatasetImportError(f"{src}: no {CDR_FILE} below it; pass the CDR spreadsheet with --clinical")
    return found[0]


def _sidecar_of(nifti: Path) -> Path:
    """The JSON beside the NIfTI, or in the sibling BIDS/ folder of an XNAT NIFTI/ resource."""
    stem = nifti.name.split(".nii")[0]
    beside = nifti.with_name(f"{stem}.json")
    return beside if beside.exists() or nifti.parent.name != "NIFTI" else nifti.parent.parent / "BIDS" / f"{stem}.json"


def _session_scans(folder: Path, owner: str, site: Site, assume: Assumptions) -> list[Scan]:
    """The scans of one session folder of subject `owner`."""
    scans, seen = [], set()
    for path in sorted(folder.glob("anat*/**/*.nii*")):
        match = _FILE.match(path.name)
        if not match or match.group(4) not in MODALITIES:
            site.skipped.append((str(path), "not a T1w, T2w or FLAIR scan fedmri reads"))
            continue
        subject, session, entities, suffix = match.group(1), match.group(2), match.group(3), match.group(4)
        if subject != owner:
            site.skipped.append((str(path), f"names subject {subject} but lies in {owner}'s session folder"))
            continue
        stem = f"{session}{entities}_{suffix}"
        if stem in seen:
            site.skipped.append((str(path), "same BIDS name as another scan of this session (no run entity)"))
            continue
        seen.add(stem)
        check_nifti(path)
        sidecar_path = _sidecar_of(path)
        try:
            sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.exists() else {}
        except json.JSONDecodeError as err:
            raise DatasetImportError(f"{sidecar_path}: not valid JSON: {err}") from None
        stated = sidecar.get("MagneticFieldStrength")
        tesla, assumed = field_strength(stated if isinstance(stated, int | float) else None, str(sidecar_path), assume)
        sidecar.pop("MagneticFieldStrength", None)
        scans.append(
            Scan(subject, MODALITIES[suffix], with_field(sidecar, tesla, assumed), path, None, entities, session)
        )
    return scans


def import_oasis3(src: Path, options: Options, command: str, report: Report, clinical: Path | None) -> list[Path]:
    """Import OASIS-3 MR sessions and their CDR as the site `oasis3`."""
    cdr_path = _find_cdr(src, clinical)
    visits = read_cdr(cdr_path)
    sessions: dict[str, list[tuple[int, Path]]] = {}
    for folder in sorted(p for p in src.rglob("OAS3*_MR_d*") if p.is_dir()):
        match = _SESSION.match(folder.name)
        if match:
            sessions.setdefault(match.group(1), []).append((int(match.group(2)), folder))
    if not sessions:
        raise DatasetImportError(f"{src}: no OASIS-3 MR session folders (OAS3<nnnn>_MR_d<nnnn>)")
    site = Site("oasis3", notes=list(NOTES))
    for subject, found in sorted(sessions.items()):
        chosen = None
        for day, folder in sorted(found):
            if chosen is not None:
                site.skipped.append((str(folder), f"a later session of {subject}; one session per subject"))
                continue
            near = [v for v in visits.get(subject, []) if abs(v[0] - day) <= MAX_VISIT_GAP_DAYS]
            if near:
                _, cdr, line = min(near, key=lambda v: (abs(v[0] - day), v[0]))
                pathology, assumed = pathology_of_cdr(cdr, f"{cdr_path}: line {line}: CDRTOT", options.assume)
            elif options.assume.pathology is not None or options.assume.pathology_other:
                pathology, assumed = (
                    options.assume.pathology,
                    f"--assume pathology={pathology_label(options.assume.pathology)}",
                )
            else:
                site.skipped.append((str(folder), f"no CDR visit within {MAX_VISIT_GAP_DAYS} days in {cdr_path.name}"))
                continue
            scans = _session_scans(folder, subject, site, options.assume)
            if scans:
                chosen = folder
                site.scans.extend(scans)
                site.participants[subject] = Participant(
                    subject, pathology, source_id=subject, assumed_pathology=assumed
                )
    return [write_site(site, DATASET, options, command, report)]
