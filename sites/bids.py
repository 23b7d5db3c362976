"""The BIDS reader clients use: index a site, check every file, and cut normalized axial slices."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.conditions import Modality, Pathology
from sites.config import SiteConfig

READER_VERSION = 2  # 2: per-slice lesion labels from lesion masks
# Focal pathologies: a slice of such a subject is labelled with it only where the subject's
# lesion mask (if the site has one) reaches the slice; elsewhere the slice is labelled healthy.
FOCAL = (Pathology.glioma, Pathology.ms)
LESION_MASK = "_desc-lesion_mask.nii"  # derivatives/<pipeline>/sub-X/anat/sub-X[_...]_desc-lesion_mask.nii[.gz]
MIN_LESION_VOXELS = 5  # mask voxels inside a slice's slab for the slice to count as showing the lesion
# BIDS suffix -> modality; a T1w carrying a `ce-<agent>` entity is T1ce.
SUFFIXES = {"T1w": Modality.T1w, "T2w": Modality.T2w, "FLAIR": Modality.FLAIR, "PDw": Modality.PDw}
REQUIRED_SIDECAR = ("MagneticFieldStrength", "RepetitionTime", "EchoTime")
_NAME = re.compile(r"^(sub-[A-Za-z0-9]+)((?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_([A-Za-z0-9]+)\.nii(\.gz)?$")


class SiteDataError(ValueError):
    """Site data that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Subject:
    participant_id: str
    pathology: Pathology
    age: float | None
    sex: str | None


@dataclass(frozen=True)
class Scan:
    """One 3D scan and what its sidecar says about its acquisition (times in seconds)."""

    path: Path
    subject: str
    modality: Modality
    field_strength: float
    repetition_time: float
    echo_time: float
    inversion_time: float | None


@dataclass
class SiteIndex:
    root: Path
    subjects: dict[str, Subject]
    scans: list[Scan]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


class _Problems:
    """Strict: raise at the first problem. Not strict: record it and let the caller skip."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skipped: list[tuple[str, str]] = []

    def report(self, path: Path | str, reason: str) -> None:
        if self.strict:
            raise SiteDataError(f"{path}: {reason}")
        self.skipped.append((str(path), reason))


def index_site(root: str | Path, strict: bool = True) -> SiteIndex:
    """Find the subjects and scans of a BIDS(-like) folder and check names, sidecars and labels."""
    root = Path(root)
    if not root.is_dir():
        raise SiteDataError(f"{root}: site data folder not found")
    if not (root / "dataset_description.json").exists():
        raise SiteDataError(f"{root / 'dataset_description.json'}: missing; is {root} a BIDS dataset?")
    problems = _Problems(strict)
    subjects = _read_participants(root / "participants.tsv", problems)
    scans = []
    for path in sorted(root.glob("sub-*/anat/*.nii*")) + sorted(root.glob("sub-*/ses-*/anat/*.nii*")):
        scan = _index_scan(path, subjects, problems)
        if scan is not None:
            scans.append(scan)
    return SiteIndex(root, subjects, scans, problems.skipped)


def _read_participants(path: Path, problems: _Problems) -> dict[str, Subject]:
    if not path.exists():
        raise SiteDataError(f"{path}: missing; it must list participant_id and pathology")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or "participant_id" not in rows[0] or "pathology" not in rows[0]:
        raise SiteDataError(f"{path}: needs the columns participant_id and pathology")
    subjects = {}
    for line, row in enumerate(rows, start=2):
        label = (row["pathology"] or "").strip()
        try:
            pathology = Pathology(label)
        except ValueError:
            valid = ", ".join(p.value for p in Pathology)
            problems.report(
                path,
                f"line {line}: unknown pathology label {label!r} for {row['participant_id']}; valid labels: {valid}",
            )
            continue
        age = _number_or_none(row.get("age"))
        subjects[row["participant_id"]] = Subject(row["participant_id"], pathology, age, row.get("sex") or None)
    return subjects


def _number_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "n/a") else None
    except ValueError:
        return None


def _index_scan(path: Path, subjects: dict[str, Subject], problems: _Problems) -> Scan | None:
    match = _NAME.match(path.name)
    if not match:
        problems.report(path, "file name does not follow BIDS: sub-<label>[_<key>-<value>...]_<suffix>.nii[.gz]")
        return None
    subject, entities, suffix = match.group(1), match.group(2), match.group(3)
    if suffix not in SUFFIXES:
        known = ", ".join([*SUFFIXES, "ce-<agent>_T1w"])
        problems.report(path, f"unknown modality suffix {suffix!r}; known suffixes: {known}")
        return None
    modality = Modality.T1ce if suffix == "T1w" and "_ce-" in entities else SUFFIXES[suffix]
    if subject not in subjects:
        problems.report(path, f"subject {subject} is missing from participants.tsv (or has an invalid row there)")
        return None
    sidecar_path = path.with_name(path.name.split(".nii")[0] + ".json")
    if not sidecar_path.exists():
        problems.report(sidecar_path, "JSON sidecar missing; it must give " + ", ".join(REQUIRED_SIDECAR))
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as err:
        problems.report(sidecar_path, f"not valid JSON: {err}")
        return None
    required = REQUIRED_SIDECAR + (("InversionTime",) if modality is Modality.FLAIR else ())
    for key in required:
        value = sidecar.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            reason = "missing" if value is None else f"not a positive number ({value!r})"
            problems.report(sidecar_path, f"sidecar field {key} is {reason} (BIDS units: tesla, seconds)")
            return None
    if sidecar["RepetitionTime"] > 100 or sidecar["EchoTime"] > 10:
        problems.report(sidecar_path, "RepetitionTime/EchoTime look like milliseconds; BIDS uses seconds")
        return None
    ti = sidecar.get("InversionTime")
    return Scan(
        path,
        subject,
        modality,
        float(sidecar["MagneticFieldStrength"]),
        float(sidecar["RepetitionTime"]),
        float(sidecar["EchoTime"]),
        float(ti) if ti else None,
    )


def load_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A scan reoriented to canonical RAS, as float32, and its voxel size (mm)."""
    data, zooms, _ = load_volume_affine(path)
    return data, zooms


def load_volume_affine(path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """load_volume, plus the canonical (RAS) voxel-to-world affine [4, 4] in mm.

    Raises SiteDataError for corrupt or truncated files, non-3D volumes, NaN/Inf voxels and
    empty volumes.
    """
    try:
        image = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise SiteDataError(f"{path}: corrupt or truncated NIfTI file ({type(err).__name__}: {err})") from None
    if data.ndim != 3:
        raise SiteDataError(f"{path}: expected a 3D volume, got {data.ndim}D with shape {data.shape}")
    if data.size == 0 or not np.any(data):
        raise SiteDataError(f"{path}: empty volume (no non-zero voxels)")
    bad = ~np.isfinite(data)
    if bad.any():
        raise SiteDataError(f"{path}: {int(bad.sum())} NaN or Inf voxels")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data, zooms, image.affine  # type: ignore[return-value]


def foreground_of(data: np.ndarray) -> np.ndarray:
    """Voxels above 10 % of the volume's 99th percentile. -> bool, like `data`"""
    return data > 0.1 * np.percentile(data, 99)


def brain_slab(foreground: np.ndarray) -> tuple[int, int]:
    """First and last axial index whose foreground covers at least half of the largest slice's."""
    area = foreground.sum((0, 1))
    keep = np.nonzero(area >= 0.5 * area.max())[0]
    return int(keep.min()), int(keep.max())


def lesion_mask_path(root: Path, subject: str) -> Path | None:
    """The subject's lesion mask under derivatives/, or None; two different ones are an error."""
    found = sorted(root.glob(f"derivatives/*/{subject}/anat/{subject}*{LESION_MASK}*"))
    if len(found) > 1:
        raise SiteDataError(f"{root}: {subject} has {len(found)} lesion masks ({', '.join(p.name for p in found)})")
    return found[0] if found else None


def lesion_in_slices(
    mask_path: Path, affine: np.ndarray, shape: tuple[int, ...], rows: np.ndarray, thickness: float
) -> np.ndarray:
    """For each axial slice index in `rows` of a canonical volume with `affine`, `shape` and slice
    `thickness` (mm): does the lesion mask reach its slab with at least MIN_LESION_VOXELS voxels?

    The mask may lie on another grid: slices are matched by their world z (mm), each mask
    slice counting towards every scan slab it overlaps. -> [len(rows)] bool
    """
    mask, mask_zooms, mask_affine = load_volume_affine(mask_path)
    counts = (mask > 0).sum((0, 1))  # -> [mask slices]
    mask_z = _world_z(mask_affine, mask.shape, np.arange(mask.shape[2]))  # -> [mask slices]
    scan_z = _world_z(affine, shape, rows)  # -> [len(rows)]
    reach = (thickness + mask_zooms[2]) / 2  # slabs overlap when their centres are closer than this
    overlap = np.abs(scan_z[:, None] - mask_z[None, :]) < reach  # -> [rows, mask slices]
    return (overlap * counts[None, :]).sum(1) >= MIN_LESION_VOXELS


def _world_z(affine: np.ndarray, shape: tuple[int, ...] | None, rows: np.ndarray) -> np.ndarray:
    """World z (mm, superior) of axial slices `rows`, at the in-plane centre when `shape` is given."""
    ci, cj = ((shape[0] - 1) / 2, (shape[1] - 1) / 2) if shape else (0.0, 0.0)
    return affine[2, 0] * ci + affine[2, 1] * cj + affine[2, 2] * rows + affine[2, 3]


def axial_slices(
    data: np.ndarray, zooms: tuple[float, float, float], image_size: int, fov_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized axial slices [S, image_size, image_size] in [0, 1] and their positions [S] in [0, 1].

    Foreground = voxels above 10 % of the 99th percentile. Slices whose foreground area is at
    least 50 % of the largest are kept (they cover the brain). Each slice is resampled to a
    square `fov_mm` field of view centred on the foreground (rows anterior to posterior,
    columns from the patient's left to right: neurological convention), divided by the
    99.5th percentile of the foreground and clipped to [0, 1].
    """
    foreground = foreground_of(data)
    z_lo, z_hi = brain_slab(foreground)
    centre = ndimage.center_of_mass(foreground)

    pixel = fov_mm / image_size
    sigma = [max(0.0, 0.5 * (pixel / zooms[0] - 1.0)), max(0.0, 0.5 * (pixel / zooms[1] - 1.0))]
    offsets = (np.arange(image_size) - (image_size - 1) / 2) * pixel  # mm
    xs = centre[0] + offsets / zooms[0]
    ys = centre[1] - offsets / zooms[1]  # first row is the most anterior
    rows, cols = np.meshgrid(ys, xs, indexing="ij")
    scale = np.percentile(data[foreground], 99.5)
    slices, positions = [], []
    for z in range(z_lo, z_hi + 1):
        plane = ndimage.gaussian_filter(data[:, :, z], sigma) if max(sigma) > 0 else data[:, :, z]
        resampled = ndimage.map_coordinates(plane, [cols, rows], order=1, mode="constant", cval=0.0)
        slices.append(np.clip(resampled / scale, 0.0, 1.0))
        positions.append((z - z_lo) / max(1, z_hi - z_lo))
    return np.stack(slices).astype(np.float16), np.asarray(positions, dtype=np.float32)


@dataclass
class SiteSlices:
    """Every usable axial slice of a site and its conditions, as flat arrays of length N."""

    images: np.ndarray  # [N, H, W] float16 in [0, 1]
    subject: np.ndarray  # [N] index into `subjects`
    scan: np.ndarray  # [N] index of the scan the slice came from
    modality: np.ndarray  # [N] Modality.ordinal
    pathology: np.ndarray  # [N] Pathology.ordinal
    field_strength: np.ndarray  # [N] tesla
    repetition_time: np.ndarray  # [N] s
    echo_time: np.ndarray  # [N] s
    inversion_time: np.ndarray  # [N] s, NaN when not an inversion-recovery scan
    slice_position: np.ndarray  # [N] 0 = lowest brain slice, 1 = top
    subjects: list[str]
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.images)

    def summary(self) -> dict:
        """Counts a person checks first: subjects, scans, slices, and what was skipped.

        `pathologies` counts the subjects with at least one slice so labelled: a glioma patient
        whose mask leaves some slices lesion-free counts under healthy too."""
        return {
            "subjects": len(self.subjects),
            "scans": len(np.unique(self.scan)),
            "slices": len(self),
            "modalities": {
                m.value: int((self.modality == m.ordinal).sum()) for m in Modality if (self.modality == m.ordinal).any()
            },
            "pathologies": {
                p.value: len(np.unique(self.subject[self.pathology == p.ordinal]))
                for p in Pathology
                if (self.pathology == p.ordinal).any()
            },
            "field_strengths": sorted({round(float(b), 3) for b in np.unique(self.field_strength)}),
            "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
        }

    def select_subjects(self, keep: list[int]) -> SiteSlices:
        """The slices of the subjects at indices `keep` (into `subjects`), re-indexed from 0."""
        order = sorted(keep)
        remap = np.full(len(self.subjects), -1)
        remap[order] = np.arange(len(order))
        rows = remap[self.subject] >= 0
        arrays = {name: getattr(self, name)[rows] for name in _ARRAYS}
        arrays["subject"] = remap[self.subject[rows]]
        return SiteSlices(**arrays, subjects=[self.subjects[i] for i in order], skipped=self.skipped)


def split_subjects(slices: SiteSlices, site_id: str, fraction: float) -> tuple[SiteSlices, SiteSlices]:
    """(training, held-out) slices, split by subject: round(fraction * N) subjects are held out.

    Which subjects are held out depends only on the site id and each subject's id (the lowest
    sha256 of "site/subject"), so the split is the same in every run and on every machine, and
    adding a subject never moves an existing one across the split.
    """
    n = len(slices.subjects)
    held = round(fraction * n)
    if fraction > 0 and n >= 2:
        held = min(max(held, 1), n - 1)
    rank = sorted(range(n), key=lambda i: hashlib.sha256(f"{site_id}/{slices.subjects[i]}".encode()).hexdigest())
    heldout = rank[:held]
    training = rank[held:]
    return slices.select_subjects(training), slices.select_subjects(heldout)


_ARRAYS = (
    "images",
    "subject",
    "scan",
    "modality",
    "pathology",
    "field_strength",
    "repetition_time",
    "echo_time",
    "inversion_time",
    "slice_position",
)


def read_site(
    root: str | Path,
    strict: bool = True,
    image_size: int = 64,
    fov_mm: float = 220.0,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SiteSlices:
    """Read, check and slice every scan of a site. Nothing inside `root` is ever written.

    With `cache_dir`, the result is stored there and reused while no file of the site changes.
    `progress(done, total)` is called after each scan.
    """
    index = index_site(root, strict)
    key = _cache_key(index, image_size, fov_mm) if cache_dir else None
    if key and cache_dir and (Path(cache_dir) / f"{key}.npz").exists():
        return _load_cache(Path(cache_dir) / f"{key}.npz")
    problems = _Problems(strict)
    problems.skipped.extend(index.skipped)
    subjects = sorted({s.subject for s in index.scans})
    columns: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
    for n, scan in enumerate(index.scans):
        try:
            data, zooms, affine = load_volume_affine(scan.path)
        except SiteDataError as err:
            problems.report(scan.path, str(err).split(": ", 1)[1])
            continue
        finally:
            if progress:
                progress(n + 1, len(index.scans))
        images, positions = axial_slices(data, zooms, image_size, fov_mm)
        count = len(images)
        subject = index.subjects[scan.subject]
        columns["images"].append(images)
        columns["slice_position"].append(positions)
        columns["pathology"].append(_slice_pathology(index.root, scan.subject, subject.pathology, data, zooms, affine))
        for name, value in (
            ("subject", subjects.index(scan.subject)),
            ("scan", n),
            ("modality", scan.modality.ordinal),
            ("field_strength", scan.field_strength),
            ("repetition_time", scan.repetition_time),
            ("echo_time", scan.echo_time),
            ("inversion_time", scan.inversion_time if scan.inversion_time else math.nan),
        ):
            columns[name].append(np.full(count, value))
    if not columns["images"]:
        details = "; ".join(f"{f}: {r}" for f, r in problems.skipped[:5])
        raise SiteDataError(f"{index.root}: no usable scans" + (f" (skipped: {details})" if details else ""))
    dtypes = {"images": np.float16, "subject": np.int32, "scan": np.int32, "modality": np.int8, "pathology": np.int8}
    arrays = {name: np.concatenate(parts).astype(dtypes.get(name, np.float32)) for name, parts in columns.items()}
    result = SiteSlices(**arrays, subjects=subjects, skipped=problems.skipped)
    if key and cache_dir:
        _save_cache(Path(cache_dir), key, result, index.root)
    return result


def _slice_pathology(
    root: Path, subject: str, pathology: Pathology, data: np.ndarray, zooms: tuple[float, ...], affine: np.ndarray
) -> np.ndarray:
    """Per kept slice: the subject's pathology, except that a focal one (glioma, MS) holds only
    where the subject's lesion mask reaches the slice; without a mask, the subject's label."""
    z_lo, z_hi = brain_slab(foreground_of(data))
    labels = np.full(z_hi - z_lo + 1, pathology.ordinal)
    mask = lesion_mask_path(root, subject) if pathology in FOCAL else None
    if mask is not None:
        shows = lesion_in_slices(mask, affine, data.shape, np.arange(z_lo, z_hi + 1), zooms[2])
        labels = np.where(shows, pathology.ordinal, Pathology.healthy.ordinal)
    return labels


def read_site_data(site: SiteConfig, progress: Callable[[int, int], None] | None = None) -> SiteSlices:
    """read_site with the settings of a site's `data:` section."""
    d = site.data
    return read_site(d.bids_root, d.strict, d.image_size, d.fov_mm, d.cache_dir, progress=progress)


def _cache_key(index: SiteIndex, image_size: int, fov_mm: float) -> str:
    """Changes whenever any file of the site changes (path, size, mtime) or preprocessing does."""
    digest = hashlib.sha256(f"v{READER_VERSION}:{image_size}:{fov_mm}:{len(index.skipped)}".encode())

    def read(path: Path) -> bool:  # the scans and sidecars, and the lesion masks that set slice labels
        return "derivatives" not in path.parts or LESION_MASK in path.name

    for path in sorted(p for p in index.root.rglob("*") if p.is_file() and read(p)):
        stat = path.stat()
        digest.update(f"{path.relative_to(index.root)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:20]


def _save_cache(cache_dir: Path, key: str, slices: SiteSlices, root: Path) -> None:
    if cache_dir.resolve().is_relative_to(root.resolve()):
        raise SiteDataError(f"cache_dir {cache_dir} lies inside the site data {root}; the reader never writes there")
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"subjects": slices.subjects, "skipped": slices.skipped})
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, meta=np.array(meta), **{name: getattr(slices, name) for name in _ARRAYS})
    os.replace(tmp, cache_dir / f"{key}.npz")


def _load_cache(path: Path) -> SiteSlices:
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        arrays = {name: archive[name] for name in _ARRAYS}
    return SiteSlices(**arrays, subjects=meta["subjects"], skipped=[tuple(s) for s in meta["skipped"]])
