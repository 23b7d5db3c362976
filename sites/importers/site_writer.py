"""Write one imported hospital as a BIDS site folder and a site YAML that `load_site` accepts."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from common.conditions import Modality, Pathology
from sites.config import DataSpec, PrivacyPolicy, SiteConfig, load_site, site_to_dict

# BIDS file name part of each modality; T1ce is a T1w with a contrast-agent entity (sites/bids.py).
BIDS_SUFFIX = {
    Modality.T1w: "T1w",
    Modality.T1ce: "ce-gadolinium_T1w",
    Modality.T2w: "T2w",
    Modality.FLAIR: "FLAIR",
    Modality.PDw: "PDw",
}
MASK_PIPELINE = "derivatives/lesions"  # sites/bids.py:lesion_mask_path reads derivatives/*/sub-X/anat/
OTHER_LABEL = "other"  # a participants.tsv label outside the vocabulary: sites/bids.py reads it as `other`
ASSUMABLE = {
    "field": "MagneticFieldStrength in tesla, or 'unknown' to leave it out of the sidecars",
    "pathology": "participants.tsv label for subjects the dataset gives none: "
    + ", ".join([*(p.value for p in Pathology), OTHER_LABEL]),
}
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_ENTITIES = re.compile(r"^(_[A-Za-z0-9]+-[A-Za-z0-9]+)*$")

Report = Callable[[str], None]


class DatasetImportError(ValueError):
    """A dataset that cannot be imported as it is; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Assumptions:
    """What the user stated with --assume for values the dataset does not give."""

    field: float | None = None  # tesla
    field_unknown: bool = False  # --assume field=unknown: leave MagneticFieldStrength out
    pathology: Pathology | None = None
    pathology_other: bool = False  # --assume pathology=other: read as `other`, never trained as a label

    def given(self) -> set[str]:
        """The keys the user stated: "field", "pathology"."""
        stated = {"field": self.field is not None or self.field_unknown,
                  "pathology": self.pathology is not None or self.pathology_other}  # fmt: skip
        return {key for key, value in stated.items() if value}


def pathology_label(pathology: Pathology | None) -> str:
    """participants.tsv's label: the pathology's, or OTHER_LABEL for None."""
    return OTHER_LABEL if pathology is None else pathology.value


def parse_assumptions(items: list[str]) -> Assumptions:
    """['field=3', 'pathology=healthy'] -> Assumptions; an unknown key or bad value is an error."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in ASSUMABLE:
            known = "; ".join(f"{k}=<{v}>" for k, v in ASSUMABLE.items())
            raise DatasetImportError(f"--assume {item!r}: expected KEY=VALUE with KEY one of: {known}")
        values[key] = value.strip()
    result = Assumptions()
    if "field" in values:
        if values["field"] == "unknown":
            result = Assumptions(field_unknown=True)
        else:
            try:
                tesla = float(values["field"])
            except ValueError:
                tesla = -1.0
            if not 0.05 <= tesla <= 11.7:
                raise DatasetImportError(f"--assume field={values['field']}: give tesla (0.05-11.7) or 'unknown'")
            result = Assumptions(field=tesla)
    if values.get("pathology") == OTHER_LABEL:
        result = Assumptions(result.field, result.field_unknown, None, pathology_other=True)
    elif "pathology" in values:
        try:
            pathology = Pathology(values["pathology"])
        except ValueError:
            valid = ", ".join([*(p.value for p in Pathology), OTHER_LABEL])
            raise DatasetImportError(f"--assume pathology={values['pathology']}: valid labels: {valid}") from None
        result = Assumptions(result.field, result.field_unknown, pathology)
    return result


@dataclass(frozen=True)
class Options:
    out: Path
    copy: bool  # False: symlink NIfTI sources (HDF5 sources are always converted and written)
    assume: Assumptions = field(default_factory=Assumptions)


@dataclass(frozen=True)
class DatasetInfo:
    """What the site's dataset_description.json and README say about where the data came from."""

    name: str
    url: str
    license: str
    layout_source: str  # where the published layout this importer reads is documented


@dataclass(frozen=True)
class Scan:
    """One scan to write: from a NIfTI file (`source`) or from an array (`volume`)."""

    subject: str  # BIDS label, without "sub-"
    modality: Modality
    sidecar: dict
    source: Path | None = None
    volume: tuple[np.ndarray, np.ndarray] | None = None  # (data [X, Y, Z], voxel-to-world affine [4, 4])
    entities: str = ""  # e.g. "_run-01"; written between the subject (and session) and the suffix
    session: str | None = None  # BIDS label, without "ses-"


@dataclass(frozen=True)
class Participant:
    label: str  # BIDS label, without "sub-"
    pathology: Pathology | None  # None: `other` (the reader never trains it as a label)
    lesion_mask: Path | None = None  # a NIfTI whose non-zero voxels are the lesion (BraTS/FeTS seg)
    mask_labels: dict[str, int] = field(default_factory=dict)
    source_id: str = ""  # the subject's id in the dataset
    assumed_pathology: str = ""  # the --assume behind `pathology`, when the dataset gives no label


@dataclass
class Site:
    """One hospital of an import: its subjects, its scans and what was left out, and why."""

    site_id: str
    participants: dict[str, Participant] = field(default_factory=dict)
    scans: list[Scan] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    notes: list[str] = field(default_factory=list)  # README lines: how values were obtained


def bids_label(text: str, where: str) -> str:
    """A dataset id as a BIDS label (letters and digits only); anything else is an error naming `where`."""
    if not _LABEL.match(text):
        raise DatasetImportError(f"{where}: id {text!r} is not a valid BIDS label (letters and digits only)")
    return text


def check_nifti(path: Path) -> tuple[int, ...]:
    """Read a NIfTI file to its last byte; a truncated or corrupt file is an error naming it. -> shape"""
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)  # type: ignore[attr-defined]
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise DatasetImportError(f"{path}: corrupt or truncated NIfTI file ({type(err).__name__}: {err})") from None
    return tuple(data.shape)


def field_strength(stated: float | None, where: str, assume: Assumptions) -> tuple[float | None, str | None]:
    """(tesla or None, the assumption used or None). Stated values win; a missing one needs --assume."""
    if stated is not None:
        return stated, None
    if assume.field is not None:
        return assume.field, f"--assume field={assume.field:g}"
    if assume.field_unknown:
        return None, "--assume field=unknown"
    raise DatasetImportError(
        f"{where}: the dataset does not state the magnetic field strength; state it with --assume field=<tesla>, "
        "or --assume field=unknown to leave MagneticFieldStrength out of the sidecars"
    )


def pathology_or_assumed(where: str, why: str, assume: Assumptions) -> tuple[Pathology | None, str]:
    """(the --assume'd pathology, its record) for a subject the dataset gives no label; else an error."""
    if assume.pathology is None and not assume.pathology_other:
        raise DatasetImportError(f"{where}: {why}; state it with --assume pathology=<label>")
    return assume.pathology, f"--assume pathology={pathology_label(assume.pathology)}"


def with_field(sidecar: dict, tesla: float | None, assumed: str | None) -> dict:
    """`sidecar` plus MagneticFieldStrength (when known) and a record of any assumption behind it."""
    out = dict(sidecar)
    if tesla is not None:
        out["MagneticFieldStrength"] = tesla
    if assumed:
        out.setdefault("fedmriAssumptions", {})["MagneticFieldStrength"] = f"stated by the user: {assumed}"
    return out


def write_site(site: Site, dataset: DatasetInfo, options: Options, command: str, report: Report) -> Path:
    """Write `site` to OUT/<site_id>/ (BIDS) and OUT/<site_id>.yaml; return the YAML path.

    The folder is written under a temporary name and renamed into place, so an interrupted
    import never leaves a half-written site. An existing site folder is an error, never overwritten.
    """
    root = options.out / site.site_id
    if root.exists():
        raise DatasetImportError(f"{root}: already exists; remove it or choose another --out")
    if not site.scans:
        reasons = "; ".join(f"{f}: {r}" for f, r in site.skipped[:5]) or "no files found"
        raise DatasetImportError(f"{site.site_id}: no scans to import ({reasons})")
    tmp = options.out / f".tmp-import-{site.site_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_description(tmp, dataset, site.site_id, any(p.lesion_mask for p in site.participants.values()))
    for scan in site.scans:
        _write_scan(tmp, scan, options.copy)
    for participant in site.participants.values():
        if participant.lesion_mask is not None:
            _write_mask(tmp, participant, options.copy)
    used = sorted({s.subject for s in site.scans})
    for label in used:
        contrasts = ", ".join(sorted({BIDS_SUFFIX[s.modality] for s in site.scans if s.subject == label}))
        report(f"{site.site_id}: sub-{label} ({pathology_label(site.participants[label].pathology)}): {contrasts}")
    _write_participants(tmp, [site.participants[label] for label in used])
    (tmp / "README").write_text(_readme(site, dataset, options, command))
    os.replace(tmp, root)
    yaml_path = write_site_yaml(site.site_id, options.out)
    load_site(yaml_path)  # the YAML this wrote must be one the client accepts
    report(f"{site.site_id}: {len(used)} subjects, {len(site.scans)} scans, {len(site.skipped)} skipped -> {root}")
    return yaml_path


def write_left_out(out: Path, dataset: str, left_out: list[tuple[str, str]], empty: list[Site], report: Report) -> None:
    """What belongs to no written site: files no site claims, and sites left with no scans (with
    what their scans were skipped for). Listed on the console and in OUT/<dataset>-left-out.tsv."""
    rows = list(left_out)
    for site in empty:
        rows.append((site.site_id, "no scans left, so no site was written"))
        rows.extend(site.skipped)
    if not rows:
        return
    for file, reason in rows:
        report(f"left out {file}: {reason}")
    path = out / f"{dataset}-left-out.tsv"
    path.write_text("file\treason\n" + "".join(f"{file}\t{reason}\n" for file, reason in rows))
    report(f"{len(rows)} left out, listed in {path}")


def _write_description(root: Path, dataset: DatasetInfo, site_id: str, with_masks: bool) -> None:
    description = {
        "Name": f"{dataset.name}: {site_id}",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": dataset.license,
        "GeneratedBy": [{"Name": "fedmri sites import", "Description": f"imported from {dataset.name}"}],
        "SourceDatasets": [{"URL": dataset.url}],
    }
    (root / "dataset_description.json").write_text(json.dumps(description, indent=2))
    if not with_masks:
        return
    masks = root / MASK_PIPELINE
    masks.mkdir(parents=True)
    derived = {**description, "Name": f"lesion masks of {site_id}", "DatasetType": "derivative"}
    (masks / "dataset_description.json").write_text(json.dumps(derived, indent=2))


def _place(source: Path, target: Path, copy: bool) -> None:
    if copy:
        shutil.copyfile(source, target)
    else:
        os.symlink(source.resolve(), target)


def _nifti_suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"


def _write_scan(root: Path, scan: Scan, copy: bool) -> None:
    if not _ENTITIES.match(scan.entities):
        raise DatasetImportError(f"sub-{scan.subject}: entities {scan.entities!r} are not BIDS key-value pairs")
    session = f"_ses-{scan.session}" if scan.session else ""
    folder = root / f"sub-{scan.subject}" / (f"ses-{scan.session}" if scan.session else "") / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{scan.subject}{session}{scan.entities}_{BIDS_SUFFIX[scan.modality]}"
    if (folder / f"{stem}.json").exists():
        raise DatasetImportError(f"{folder / stem}: two scans map to this name; they need distinct run entities")
    if scan.source is not None:
        _place(scan.source, folder / f"{stem}{_nifti_suffix(scan.source)}", copy)
    else:
        assert scan.volume is not None
        data, affine = scan.volume
        image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
        image.header.set_xyzt_units("mm", "sec")
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, folder / f"{stem}.nii.gz")
    (folder / f"{stem}.json").write_text(json.dumps(scan.sidecar, indent=2))


def _write_mask(root: Path, participant: Participant, copy: bool) -> None:
    assert participant.lesion_mask is not None
    folder = root / MASK_PIPELINE / f"sub-{participant.label}" / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{participant.label}_desc-lesion_mask"
    _place(participant.lesion_mask, folder / f"{stem}{_nifti_suffix(participant.lesion_mask)}", copy)
    legend = {"Labels": participant.mask_labels, "Pathology": pathology_label(participant.pathology)}
    (folder / f"{stem}.json").write_text(json.dumps(legend, indent=2))


def _write_participants(root: Path, participants: list[Participant]) -> None:
    with open(root / "participants.tsv", "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["participant_id", "pathology", "source_id"])
        for p in participants:
            writer.writerow([f"sub-{p.label}", pathology_label(p.pathology), p.source_id or "n/a"])
    columns = {
        "pathology": {"Description": "diagnosis, from the source dataset's own labels (see README)"},
        "source_id": {"Description": "the subject's id in the source dataset"},
    }
    (root / "participants.json").write_text(json.dumps(columns, indent=2))


def data_mode(site: Site, copy: bool) -> str:
    """How the site's image files came from the source: converted and written, copied, or linked."""
    converted = sum(scan.volume is not None for scan in site.scans)
    placed = len(site.scans) - converted + sum(p.lesion_mask is not None for p in site.participants.values())
    parts = []
    if converted:
        parts.append(
            f"{converted} scans converted from the source's HDF5 (reconstruction_rss) and written here as NIfTI"
        )
    if placed:
        how = "copied into this folder" if copy else "symbolic links to the source files (not copied)"
        parts.append(f"{placed} files {how}")
    return "; ".join(parts) or "none"


def _readme(site: Site, dataset: DatasetInfo, options: Options, command: str) -> str:
    mode = data_mode(site, options.copy)
    lines = [
        f"# {site.site_id}: imported from {dataset.name}",
        "",
        f"Imported with: {command}",
        f"Source: {dataset.url}",
        f"Licence: {dataset.license}",
        f"Layout read as documented in: {dataset.layout_source}",
        f"Image data from the source: {mode}.",
        "",
        "## How values were obtained",
        *[f"- {note}" for note in site.notes],
        "",
        "## Assumptions stated by the user (--assume)",
        *(_assumption_lines(site) or ["- none"]),
        "",
        "## Left out",
        *([f"- {file}: {reason}" for file, reason in site.skipped] or ["- nothing"]),
        "",
    ]
    return "\n".join(lines)


def _assumption_lines(site: Site) -> list[str]:
    counts: dict[str, int] = {}
    for scan in site.scans:
        for key, text in scan.sidecar.get("fedmriAssumptions", {}).items():
            counts[f"{key}: {text}"] = counts.get(f"{key}: {text}", 0) + 1
    lines = [f"- {what} ({n} scans)" for what, n in sorted(counts.items())]
    assumed = [p for p in site.participants.values() if p.assumed_pathology]
    if assumed:
        lines.append(
            f"- pathology: {assumed[0].assumed_pathology} ({len(assumed)} subjects the dataset gives no label)"
        )
    return lines


def write_site_yaml(site_id: str, out: Path) -> Path:
    """OUT/<site_id>.yaml for a real (imported) site: data beside it, default privacy policy to review."""
    site = SiteConfig(
        site_id=site_id,
        data=DataSpec(bids_root=f"./{site_id}", cache_dir=f"./.fedmri-cache/{site_id}"),
        privacy=PrivacyPolicy(),
    )
    raw = site_to_dict(site)
    raw.pop("synthetic", None)
    raw["home"] = str((out / ".fedmri-home" / site_id).resolve())
    head = {k: raw[k] for k in ("site_id", "data")}
    tail = {k: raw[k] for k in ("home", "device")}
    text = (
        f"# {site_id}: written by `fedmri sites import`; the data lie in ./{site_id} (see its README).\n"
        + yaml.safe_dump(head, sort_keys=False)
        + "# PRIVACY: fedmri's defaults, not this hospital's decision. The hospital's privacy officer must\n"
        + "# review every value below (budget, clipping, noise floor, evaluation) before the site trains.\n"
        + yaml.safe_dump({"privacy": raw["privacy"]}, sort_keys=False)
        + yaml.safe_dump(tail, sort_keys=False)
    )
    path = out / f"{site_id}.yaml"
    path.write_text(text)
    return path
