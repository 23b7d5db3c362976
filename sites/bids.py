"""The BIDS reader clients use: index a site, check every file, and cut normalized axial slices."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.conditions import CONDITION_VECTOR, Modality, Pathology
from common.mask_branch import NO_MASK
from sites.config import SiteConfig
from sites.volume import SiteDataError, brain_slab, foreground_of, load_volume_affine

READER_VERSION = 5  # 2: per-slice lesion labels from lesion masks; 3: real scanners (sites/volume.py);
# 4: stacks cut through the head have unknown positions, an unusable lesion mask drops its scans;
# 5: each slice's lesion mask on the slice's own pixel grid (SiteSlices.lesion_mask)
# Focal pathologies: a slice of such a subject is labelled with it only where the subject's
# lesion mask (if the site has one) reaches the slice; elsewhere the slice is labelled healthy.
FOCAL = (Pathology.glioma, Pathology.ms)
LESION_MASK = "_desc-lesion_mask.nii"  # derivatives/<pipeline>/sub-X/anat/sub-X[_...]_desc-lesion_mask.nii[.gz]
MIN_LESION_VOXELS = 5  # mask voxels inside a slice's slab for the slice to count as showing the lesion
# Lesion-mask labels -> the model's (common/mask_branch.py): BraTS 2023 numbers the enhancing rim
# 3 and earlier BraTS releases 4; an MS mask is 0/1.
MASK_LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 3, 4: 3}
# BIDS suffix -> modality; a T1w carrying a `ce-<agent>` entity is T1ce.
SUFFIXES = {"T1w": Modality.T1w, "T2w": Modality.T2w, "FLAIR": Modality.FLAIR, "PDw": Modality.PDw}
# Sidecar fields that become conditions. One that is missing is an *unknown* condition (the
# condition encoder's "unknown" embedding), never a reason to drop the scan; a FLAIR without
# InversionTime has its whole timing unknown, since TR and TE alone would describe another scan.
ACQUISITION_FIELDS = ("MagneticFieldStrength", "RepetitionTime", "EchoTime", "InversionTime")
OTHER = -1  # SiteSlices.pathology of a subject whose label is outside the vocabulary: "other"
_NAME = re.compile(r"^(sub-[A-Za-z0-9]+)((?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_([A-Za-z0-9]+)\.nii(\.gz)?$")


class SiteDataWarning(UserWarning):
    """Site data read with less than it could say: unknown acquisition fields, labels read as `other`."""


@dataclass(frozen=True)
class Subject:
    participant_id: str
    pathology: Pathology | None  # None: `label` is outside the vocabulary ("other")
    age: float | None
    sex: str | None
    label: str = ""  # participants.tsv's pathology label as written


@dataclass(frozen=True)
class Scan:
    """One 3D scan and what its sidecar says about its acquisition (tesla, seconds; None = unknown)."""

    path: Path
    subject: str
    modality: Modality
    field_strength: float | None
    repetition_time: float | None
    echo_time: float | None
    inversion_time: float | None


@dataclass
class SiteIndex:
    root: Path
    subjects: dict[str, Subject]
    scans: list[Scan]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    unknown: dict[str, int] = field(default_factory=dict)  # sidecar field -> scans lacking it

    @property
    def other(self) -> dict[str, str]:
        """participant -> label, for the subjects whose pathology label is outside the vocabulary."""
        return {s.participant_id: s.label for s in self.subjects.values() if s.pathology is None}


class _Problems:
    """Every file dropped, with the reason. Strict: `check` then refuses the site, naming them all."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skipped: list[tuple[str, str]] = []

    def report(self, path: Path | str, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def check(self, root: Path) -> None:
        if self.strict and self.skipped:
            listed = "\n".join(f"  {f}: {r}" for f, r in self.skipped)
            raise SiteDataError(
                f"{root}: strict mode refuses the site; {len(self.skipped)} file(s) cannot be used "
                f"(set data.strict: false to read the site without them):\n{listed}"
            )


def index_site(root: str | Path, strict: bool = True) -> SiteIndex:
    """Find the subjects and scans of a BIDS(-like) folder and check names, sidecars and labels.

    Warns (SiteDataWarning) once per site for each acquisition field some sidecars lack and for
    the pathology labels read as `other`."""
    root = Path(root)
    if not root.is_dir():
        raise SiteDataError(f"{root}: site data folder not found")
    if not (root / "dataset_description.json").exists():
        raise SiteDataError(f"{root / 'dataset_description.json'}: missing; is {root} a BIDS dataset?")
    problems = _Problems(strict)
    subjects = _read_participants(root / "participants.tsv", problems)
    scans = []
    missing = dict.fromkeys(ACQUISITION_FIELDS, 0)  # sidecar field -> scans lacking it
    for path in sorted(root.glob("sub-*/anat/*.nii*")) + sorted(root.glob("sub-*/ses-*/anat/*.nii*")):
        scan = _index_scan(path, subjects, problems, missing)
        if scan is not None:
            scans.append(scan)
    problems.check(root)
    index = SiteIndex(root, subjects, scans, problems.skipped, {k: n for k, n in missing.items() if n})
    for name, lacking in index.unknown.items():
        of = sum(s.modality is Modality.FLAIR for s in scans) if name == "InversionTime" else len(scans)
        what = "their timing (TR, TE, TI) is" if name == "InversionTime" else "it is"
        scans_of = "FLAIR scans" if name == "InversionTime" else "scans"
        warnings.warn(
            f"{root}: {lacking} of {of} {scans_of} have no {name} in their sidecars; "
            f"{what} an unknown condition for their slices",
            SiteDataWarning,
            stacklevel=2,
        )
    if index.other:
        labels = ", ".join(f"{p} ({label!r})" for p, label in sorted(index.other.items()))
        valid = ", ".join(p.value for p in Pathology)
        warnings.warn(
            f"{root / 'participants.tsv'}: pathology labels outside the vocabulary ({valid}) are read as "
            f"`other`: their slices are used with the pathology condition unknown, never trained as a label: {labels}",
            SiteDataWarning,
            stacklevel=2,
        )
    return index


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
        if not label or label == "n/a":
            problems.report(path, f"line {line}: no pathology label for {row['participant_id']}")
            continue
        pathology = next((p for p in Pathology if p.value == label), None)
        age = _number_or_none(row.get("age"))
        subjects[row["participant_id"]] = Subject(row["participant_id"], pathology, age, row.get("sex") or None, label)
    return subjects


def _number_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "n/a") else None
    except ValueError:
        return None


def _index_scan(path: Path, subjects: dict[str, Subject], problems: _Problems, missing: dict[str, int]) -> Scan | None:
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
    sidecar_file = sidecar_path(path)
    sidecar: dict = {}
    if sidecar_file.exists():
        try:
            sidecar = json.loads(sidecar_file.read_text())
        except json.JSONDecodeError as err:
            problems.report(sidecar_file, f"not valid JSON: {err}")
            return None
    values: dict[str, float | None] = {}
    for key in ACQUISITION_FIELDS:
        value = sidecar.get(key)
        if value is not None and (not isinstance(value, int | float) or not math.isfinite(value) or value <= 0):
            problems.report(sidecar_file, f"sidecar field {key} is not a positive number ({value!r}; BIDS units: tesla, seconds)")  # fmt: skip
            return None
        values[key] = float(value) if value is not None else None
    tr, te, ti = values["RepetitionTime"], values["EchoTime"], values["InversionTime"]
    # In seconds a TR stays under 100 (FLAIR: ~10), a TE under 1 and a TI under 100 (FLAIR: ~2.5);
    # in ms even a short TE (2-5 ms) is above 1. A short TR in ms (8 ms) is a plausible FLAIR TR in
    # seconds, so it cannot be told apart: TE is the field that catches such sidecars.
    if (tr is not None and tr > 100) or (te is not None and te > 1) or (ti is not None and ti > 100):
        problems.report(sidecar_file, "RepetitionTime/EchoTime/InversionTime look like milliseconds; BIDS uses seconds")
        return None
    for key, value in values.items():
        missing[key] += value is None and (key != "InversionTime" or modality is Modality.FLAIR)
    if modality is Modality.FLAIR and ti is None:
        tr = te = None  # TR and TE without TI would describe a spin echo: the timing is unknown
    return Scan(path, subject, modality, values["MagneticFieldStrength"], tr, te, ti)


def load_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A scan as float32 magnitude on an axis-aligned RAS grid, and its voxel size (mm)."""
    data, zooms, _ = load_volume_affine(path)
    return data, zooms


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
    mask = read_lesion_mask(mask_path)
    scan_z = _world_z(affine, shape, rows)  # -> [len(rows)]
    reach = (thickness + mask.thickness) / 2  # slabs overlap when their centres are closer than this
    overlap = np.abs(scan_z[:, None] - mask.z[None, :]) < reach  # -> [rows, mask slices]
    return (overlap * mask.counts[None, :]).sum(1) >= MIN_LESION_VOXELS


@dataclass(frozen=True)
class LesionMask:
    """A subject's lesion mask, read once for all its scans."""

    labels: np.ndarray  # [X, Y, Z] uint8, numbered as MASK_LABEL_MAP's values
    affine: np.ndarray  # [4, 4] voxel -> world (mm), canonical (RAS)
    counts: np.ndarray  # [Z] lesion voxels per axial slice
    z: np.ndarray  # [Z] world z of each axial slice (mm)
    thickness: float  # mm


@functools.lru_cache(maxsize=8)
def _lesion_mask(path: str, mtime_ns: int, size: int) -> LesionMask:
    """The mask at `path`, memoised by path, time and size (a changed file is read again)."""
    data, zooms, affine = load_volume_affine(Path(path), order=0, constant_ok=True)
    labels = np.rint(data)
    if np.abs(data - labels).max() > 1e-3:
        raise SiteDataError(f"{path}: lesion mask voxels are not whole-number labels (a probability map?)")
    unknown = sorted(set(np.unique(labels).astype(int).tolist()) - set(MASK_LABEL_MAP))
    if unknown:
        raise SiteDataError(
            f"{path}: lesion mask labels {unknown[:5]} are not 0 (none), 1 (glioma core or MS plaque), "
            "2 (oedema), 3 or 4 (enhancing rim)"
        )
    lookup = np.zeros(max(MASK_LABEL_MAP) + 1, dtype=np.uint8)
    lookup[list(MASK_LABEL_MAP)] = list(MASK_LABEL_MAP.values())
    labels = lookup[labels.astype(np.intp)]
    counts = (labels > 0).sum((0, 1))  # -> [mask slices]
    z = _world_z(affine, labels.shape, np.arange(labels.shape[2]))
    return LesionMask(labels, affine, counts, z, zooms[2])


def read_lesion_mask(path: Path) -> LesionMask:
    stat = path.stat()
    return _lesion_mask(str(path), stat.st_mtime_ns, stat.st_size)


def lesion_mask_slices(
    mask: LesionMask, affine: np.ndarray, grid: tuple[np.ndarray, np.ndarray], rows: np.ndarray
) -> np.ndarray:
    """The mask on the pixel grid of the scan's axial slices `rows`: each pixel takes the label of
    the mask voxel nearest its centre, through world coordinates, so the mask may lie on another
    grid than the scan; outside the mask's volume, 0. `grid` is the scan's (x, y) voxel coordinates
    of each output pixel (slice_grid). -> [len(rows), H, W] uint8
    """
    xs, ys = grid  # -> [H, W] each
    to_mask = np.linalg.inv(mask.affine) @ affine  # scan voxel -> world -> mask voxel
    out = np.zeros((len(rows), *xs.shape), dtype=np.uint8)
    for n, z in enumerate(rows):
        points = np.stack([xs, ys, np.full_like(xs, z), np.ones_like(xs)])  # -> [4, H, W]
        voxel = np.rint(np.tensordot(to_mask[:3], points, axes=1)).astype(np.intp)  # -> [3, H, W]
        inside = np.all((voxel >= 0) & (voxel < np.array(mask.labels.shape)[:, None, None]), axis=0)
        out[n][inside] = mask.labels[voxel[0][inside], voxel[1][inside], voxel[2][inside]]
    return out


def _world_z(affine: np.ndarray, shape: tuple[int, ...] | None, rows: np.ndarray) -> np.ndarray:
    """World z (mm, superior) of axial slices `rows`, at the in-plane centre when `shape` is given."""
    ci, cj = ((shape[0] - 1) / 2, (shape[1] - 1) / 2) if shape else (0.0, 0.0)
    return affine[2, 0] * ci + affine[2, 1] * cj + affine[2, 2] * rows + affine[2, 3]


def axial_slices(
    data: np.ndarray,
    zooms: tuple[float, float, float],
    image_size: int,
    fov_mm: float,
    slab: tuple[np.ndarray, tuple[int, int, np.ndarray]] | None = None,
    grid: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized axial slices [S, image_size, image_size] in [0, 1] and their positions [S] in [0, 1].

    The head is the voxels above 10 % of the 99th percentile. The slices kept, and their
    positions, are measured from the top of the head (sites/volume.brain_slab), so a neck is
    never read and position 0.5 is mid-brain with or without one. Each slice is resampled to a
    square `fov_mm` field of view centred on the kept part of the head (rows anterior to
    posterior, columns from the patient's left to right: neurological convention), divided by
    the 99.5th percentile of the head and clipped to [0, 1]. `slab` is head_and_slab(data, zooms)
    and `grid` slice_grid(...), when the caller has them already.
    """
    foreground, (z_lo, z_hi, positions) = slab or head_and_slab(data, zooms)
    sigma = anti_alias_sigma(fov_mm / image_size, zooms)
    cols, rows = grid or slice_grid(foreground, zooms, image_size, fov_mm, (z_lo, z_hi))
    scale = np.percentile(data[foreground], 99.5)
    slices = []
    for z in range(z_lo, z_hi + 1):
        plane = ndimage.gaussian_filter(data[:, :, z], sigma) if max(sigma) > 0 else data[:, :, z]
        resampled = ndimage.map_coordinates(plane, [cols, rows], order=1, mode="constant", cval=0.0)
        slices.append(np.clip(resampled / scale, 0.0, 1.0))
    return np.stack(slices).astype(np.float16), positions


def anti_alias_sigma(pixel_mm: float, zooms: tuple[float, ...]) -> list[float]:
    """In-plane Gaussian σ (voxels) before resampling to `pixel_mm` pixels: half the excess of the
    pixel over each voxel size, 0 where voxels are already coarser."""
    return [max(0.0, 0.5 * (pixel_mm / zooms[0] - 1.0)), max(0.0, 0.5 * (pixel_mm / zooms[1] - 1.0))]


def sidecar_path(scan: Path) -> Path:
    """The BIDS JSON sidecar of a NIfTI scan: sub-01_T1w.nii.gz -> sub-01_T1w.json."""
    return scan.with_name(scan.name.split(".nii")[0] + ".json")


def slice_grid(
    foreground: np.ndarray, zooms: tuple[float, float, float], image_size: int, fov_mm: float, kept: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): the voxel coordinates of each output pixel of the kept slices `kept` (first, last).
    A square `fov_mm` field centred on the kept part of the head; rows run anterior to posterior,
    columns from the patient's left to right. -> [H, W] float64 each"""
    z_lo, z_hi = kept
    head = foreground[:, :, z_lo : z_hi + 1]
    voxels = head.sum()  # the centre of mass of the kept head, from its projections on x and y:
    centre = [
        (head.sum(axes) * np.arange(head.shape[axis])).sum() / voxels for axis, axes in ((0, (1, 2)), (1, (0, 2)))
    ]
    pixel = fov_mm / image_size
    offsets = (np.arange(image_size) - (image_size - 1) / 2) * pixel  # mm
    xs = centre[0] + offsets / zooms[0]
    ys = centre[1] - offsets / zooms[1]  # first row is the most anterior
    rows, cols = np.meshgrid(ys, xs, indexing="ij")
    return cols, rows


def head_and_slab(
    data: np.ndarray, zooms: tuple[float, float, float]
) -> tuple[np.ndarray, tuple[int, int, np.ndarray]]:
    """The head mask and the brain slab (sites/volume.py) of a volume, computed once per scan."""
    foreground = foreground_of(data)
    return foreground, brain_slab(data, foreground, zooms[2])


@dataclass
class SiteSlices:
    """Every usable axial slice of a site and its conditions, as flat arrays of length N."""

    images: np.ndarray  # [N, H, W] float16 in [0, 1]
    lesion_mask: np.ndarray  # [N, H, W] uint8 labels on the slice's grid (common/mask_branch.py); NO_MASK = unknown
    subject: np.ndarray  # [N] index into `subjects`
    scan: np.ndarray  # [N] index of the scan the slice came from
    modality: np.ndarray  # [N] Modality.ordinal
    pathology: np.ndarray  # [N] Pathology.ordinal, or OTHER (a label outside the vocabulary)
    field_strength: np.ndarray  # [N] tesla; NaN = unknown
    repetition_time: np.ndarray  # [N] s; NaN = unknown
    echo_time: np.ndarray  # [N] s; NaN = unknown
    inversion_time: np.ndarray  # [N] s, NaN when not an inversion-recovery scan or unknown
    slice_position: np.ndarray  # [N] 1 = top of the head, 0 = 144 mm below (sites/volume.py); NaN = unknown
    subjects: list[str]
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.images)

    def conditions(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Condition vectors of `rows`, laid out as CONDITION_VECTOR, NaN = unknown. -> [n, 7] float32

        A pathology outside the vocabulary (OTHER) is unknown: it is never trained as a label."""
        columns = [getattr(self, name)[rows].astype(np.float32) for name in CONDITION_VECTOR]
        table = np.stack(columns, 1)  # -> [n, 7]
        pathology = CONDITION_VECTOR.index("pathology")
        table[table[:, pathology] == OTHER, pathology] = np.nan
        return table

    def summary(self) -> dict:
        """Counts a person checks first: subjects, scans, slices, and what was skipped or unknown.

        `pathologies` counts the subjects with at least one slice so labelled: a glioma patient
        whose mask leaves some slices lesion-free counts under healthy too; `other` counts the
        subjects whose label is outside the vocabulary. `unknown` counts the slices whose
        condition is unknown, per attribute."""
        labels = [(p.value, p.ordinal) for p in Pathology] + [("other", OTHER)]
        known_field = self.field_strength[np.isfinite(self.field_strength)]
        unknown = {
            "field_strength": int(np.isnan(self.field_strength).sum()),
            "timing": int((np.isnan(self.repetition_time) | np.isnan(self.echo_time)).sum()),
            "slice_position": int(np.isnan(self.slice_position).sum()),
        }
        return {
            "subjects": len(self.subjects),
            "scans": len(np.unique(self.scan)),
            "slices": len(self),
            "modalities": {
                m.value: int((self.modality == m.ordinal).sum()) for m in Modality if (self.modality == m.ordinal).any()
            },
            "pathologies": {
                label: len(np.unique(self.subject[self.pathology == ordinal]))
                for label, ordinal in labels
                if (self.pathology == ordinal).any()
            },
            "field_strengths": sorted({round(float(b), 3) for b in np.unique(known_field)}),
            "unknown": {name: n for name, n in unknown.items() if n},
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
    "lesion_mask",
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
    index = index_site(root, strict=False)  # strict mode refuses below, once every file has been looked at
    key = _cache_key(index, image_size, fov_mm) if cache_dir else None
    problems = _Problems(strict)
    if key and cache_dir and (Path(cache_dir) / f"{key}.npz").exists():
        cached = _load_cache(Path(cache_dir) / f"{key}.npz")
        problems.skipped.extend(cached.skipped)  # a lenient read cached them; strict still refuses
        problems.check(index.root)
        return cached
    problems.skipped.extend(index.skipped)
    subjects = sorted({s.subject for s in index.scans})  # re-indexed below to those with a kept scan
    columns: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
    unplaced: list[str] = []  # scans whose slice positions are unknown
    for n, scan in enumerate(index.scans):
        try:
            data, zooms, affine = load_volume_affine(scan.path)
        except SiteDataError as err:
            problems.report(scan.path, str(err).split(": ", 1)[1])
            continue
        finally:
            if progress:
                progress(n + 1, len(index.scans))
        slab = head_and_slab(data, zooms)
        kept = slab[1][:2]  # the first and last kept slice
        subject = index.subjects[scan.subject]
        grid = slice_grid(slab[0], zooms, image_size, fov_mm, kept)
        try:  # a corrupt lesion mask, or two: the scan's per-slice labels are unknown, so it is dropped
            labels, masks = _slice_lesions(index.root, scan.subject, subject.pathology, kept, zooms, affine, data.shape, grid)  # fmt: skip
        except SiteDataError as err:
            problems.report(scan.path, f"its lesion mask cannot be used: {err}")
            continue
        images, positions = axial_slices(data, zooms, image_size, fov_mm, slab, grid)
        if np.isnan(positions).any():
            unplaced.append(scan.path.name)
        count = len(images)
        columns["images"].append(images)
        columns["slice_position"].append(positions)
        columns["pathology"].append(labels)
        columns["lesion_mask"].append(masks)
        for name, value in (
            ("subject", subjects.index(scan.subject)),
            ("scan", n),
            ("modality", scan.modality.ordinal),
            ("field_strength", _or_nan(scan.field_strength)),
            ("repetition_time", _or_nan(scan.repetition_time)),
            ("echo_time", _or_nan(scan.echo_time)),
            ("inversion_time", _or_nan(scan.inversion_time)),
        ):
            columns[name].append(np.full(count, value))
    problems.check(index.root)
    if unplaced:
        warnings.warn(
            f"{index.root}: {len(unplaced)} scans stop below the top of the head, so their slice positions are "
            f"unknown (sites/volume.py brain_slab): {', '.join(unplaced[:5])}" + (" ..." if len(unplaced) > 5 else ""),
            SiteDataWarning,
            stacklevel=2,
        )
    if not columns["images"]:
        details = "; ".join(f"{f}: {r}" for f, r in problems.skipped[:5])
        raise SiteDataError(f"{index.root}: no usable scans" + (f" (skipped: {details})" if details else ""))
    dtypes = {
        "images": np.float16,
        "lesion_mask": np.uint8,
        "subject": np.int32,
        "scan": np.int32,
        "modality": np.int8,
        "pathology": np.int8,
    }
    arrays = {name: np.concatenate(parts).astype(dtypes.get(name, np.float32)) for name, parts in columns.items()}
    present = np.unique(arrays["subject"])  # a subject whose every scan was dropped is not a subject here
    remap = np.full(len(subjects), -1, dtype=np.int32)
    remap[present] = np.arange(len(present))
    arrays["subject"] = remap[arrays["subject"]]
    result = SiteSlices(**arrays, subjects=[subjects[i] for i in present], skipped=problems.skipped)
    if key and cache_dir:
        _save_cache(Path(cache_dir), key, result, index.root)
    return result


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _slice_lesions(
    root: Path,
    subject: str,
    pathology: Pathology | None,
    kept: tuple[int, int],
    zooms: tuple[float, ...],
    affine: np.ndarray,
    shape: tuple[int, ...],
    grid: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Per kept slice, (pathology, lesion mask [H, W]).

    The pathology is the subject's (OTHER for a label outside the vocabulary), except that a focal
    one (glioma, MS) holds only where the subject's lesion mask reaches the slice; without a
    mask, the subject's label. The mask is the lesion mask on the slice's pixel grid; a subject
    without a focal pathology has none (all 0); a focal one without a mask file, or an unknown
    label, has NO_MASK. -> ([S] int, [S, H, W] uint8)
    """
    z_lo, z_hi = kept
    rows = np.arange(z_lo, z_hi + 1)
    labels = np.full(len(rows), OTHER if pathology is None else pathology.ordinal)
    known = pathology is not None and pathology not in FOCAL
    masks = np.full((len(rows), *grid[0].shape), 0 if known else NO_MASK, dtype=np.uint8)
    path = lesion_mask_path(root, subject) if pathology in FOCAL else None
    if pathology is not None and path is not None:
        shows = lesion_in_slices(path, affine, shape, rows, zooms[2])
        labels = np.where(shows, pathology.ordinal, Pathology.healthy.ordinal)
        masks = lesion_mask_slices(read_lesion_mask(path), affine, grid, rows)
    return labels, masks


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
