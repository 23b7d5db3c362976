"""A folder of labelled real NIfTI scans, read to axial slices for checking the evaluator on real data.

Labels come from the file name: `<anything>_<modality>.nii.gz` with <modality> one of fedmri's
(T1w, T1ce, T2w, FLAIR, PDw). Other files (lesion masks, sidecars) are listed as skipped, never
guessed. Slices are made exactly as a site's are (sites/bids.axial_slices), so the check sees
what the evaluator would see from a hospital running the same scanner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.conditions import Modality
from sites.bids import SiteDataError, axial_slices, load_volume

SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class RealScans:
    images: np.ndarray  # [N, H, W] float16 in [0, 1]
    modality: np.ndarray  # [N] Modality ordinal, from the file name
    scan: np.ndarray  # [N] index into `files`
    files: list[str]  # file names that gave slices
    skipped: dict[str, str]  # file name -> why it gave none


def modality_of(name: str) -> Modality | None:
    """The modality in a file name's last `_` field, or None (e.g. `_lesionmask`)."""
    stem = next((name[: -len(s)] for s in SUFFIXES if name.endswith(s)), None)
    if stem is None:
        return None
    label = stem.rsplit("_", 1)[-1]
    return next((m for m in Modality if m.value == label), None)


def read_real_scans(folder: Path, image_size: int = 64, fov_mm: float = 220.0) -> RealScans:
    """Every labelled NIfTI file directly in `folder` as slices; an error if none is labelled."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    images, modality, scan, skipped = [], [], [], {}
    files: list[str] = []
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(SUFFIXES):
            continue
        label = modality_of(path.name)
        if label is None:
            skipped[path.name] = f"no modality ({', '.join(m.value for m in Modality)}) as its last '_' field"
            continue
        try:
            data, zooms = load_volume(path)
        except SiteDataError as err:
            skipped[path.name] = str(err)
            continue
        slices, _ = axial_slices(data, zooms, image_size, fov_mm)  # -> [S, H, W]
        images.append(slices)
        modality.append(np.full(len(slices), label.ordinal))
        scan.append(np.full(len(slices), len(files)))
        files.append(path.name)
    if not files:
        raise ValueError(
            f"{folder}: no labelled NIfTI file (name it <anything>_<modality>.nii.gz); skipped: "
            + ("; ".join(f"{name} ({why})" for name, why in skipped.items()) or "nothing")
        )
    return RealScans(np.concatenate(images), np.concatenate(modality), np.concatenate(scan), files, skipped)
