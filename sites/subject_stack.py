"""One subject's scans on one slice grid, and slices put back into a scan's own voxel grid.

`fedmri translate` (issue 16) reads a subject's acquired scans, generates another contrast slice
by slice, and writes it where the first scan lies. The first scan (the reference) is sliced
exactly as the reader slices a site's scans (sites/bids.axial_slices): its kept axial slices on
a square field of view centred on its head. Every other scan is resampled onto the same pixels
through world coordinates (its affine), so scans of other resolutions, orientations or obliquity
line up with the reference. A generated stack goes back through the same geometry, inverted:
each voxel of the reference file's own grid (its shape and affine, oblique or not) reads the
stack where its world position falls, and voxels outside the kept slab or the field are 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.conditions import Modality
from sites.bids import SUFFIXES, anti_alias_sigma, axial_slices, head_and_slab, slice_grid
from sites.volume import SiteDataError, foreground_of, load_volume_affine

_SUFFIX = re.compile(r"_([A-Za-z0-9]+)\.nii(\.gz)?$")


@dataclass(frozen=True)
class SourceScan:
    path: Path
    modality: Modality


def parse_source(text: str) -> SourceScan:
    """'MODALITY=path', or a path whose BIDS suffix names the contrast (sub-01_T1w.nii.gz; a
    `_ce-<agent>` entity makes a T1w a T1ce). Raises ValueError saying how to name it otherwise."""
    if "=" in text and text.split("=", 1)[0] in Modality.__members__:
        name, given = text.split("=", 1)
        return SourceScan(Path(given), Modality(name))
    path = Path(text)
    match = _SUFFIX.search(path.name)
    if not match or match.group(1) not in SUFFIXES:
        known = ", ".join(m.value for m in Modality)
        raise ValueError(
            f"{path}: the file name does not say its contrast (a BIDS suffix such as _T1w.nii.gz); "
            f"write it as MODALITY=PATH with MODALITY one of {known}"
        )
    modality = SUFFIXES[match.group(1)]
    if modality is Modality.T1w and "_ce-" in path.name:
        modality = Modality.T1ce
    return SourceScan(path, modality)


@dataclass(frozen=True)
class SliceStack:
    """The reference scan's kept axial slices and every scan resampled onto them."""

    images: np.ndarray  # [n_scans, S, H, W] in [0, 1], scans in the order given; NaN where a scan does not reach
    positions: np.ndarray  # [S] 1 = top of the head (sites/volume.py); NaN = unknown
    kept: tuple[int, int]  # first and last kept slice of the reference's RAS grid
    grid: tuple[np.ndarray, np.ndarray]  # voxel x and y of each pixel on that grid, [H, W] each
    affine: np.ndarray  # [4, 4] voxel -> world of the reference's RAS grid
    scans: tuple[SourceScan, ...]


def _resampled(
    path: Path, stack_affine: np.ndarray, grid: tuple[np.ndarray, np.ndarray], rows: np.ndarray, pixel_mm: float
) -> np.ndarray:
    """Scan `path` sampled at the pixels of slices `rows` of another grid, normalised as the reader
    normalises (the head's 99.5th percentile = 1, clipped to [0, 1]). -> [S, H, W] float32"""
    data, zooms, affine = load_volume_affine(path)
    sigma = [*anti_alias_sigma(pixel_mm, zooms), 0.0]
    smooth = ndimage.gaussian_filter(data, sigma) if max(sigma) > 0 else data  # in-plane anti-aliasing, as the reader
    to_voxel = np.linalg.inv(affine) @ stack_affine  # reference voxel -> this scan's voxel
    cols, lines = grid
    out = np.empty((len(rows), *cols.shape), dtype=np.float32)
    for n, z in enumerate(rows):
        points = np.stack([cols, lines, np.full_like(cols, z), np.ones_like(cols)]).reshape(4, -1)  # -> [4, H·W]
        voxel = (to_voxel @ points)[:3]
        covered = ((voxel[2] >= -0.5) & (voxel[2] <= data.shape[2] - 0.5)).mean()
        if covered < 0.5:
            out[n] = np.nan
            continue
        out[n] = ndimage.map_coordinates(smooth, voxel, order=1, mode="constant", cval=0.0).reshape(cols.shape)
    scale = np.percentile(data[foreground_of(data)], 99.5)
    return np.clip(out / scale, 0.0, 1.0)  # NaN stays NaN


def stack_scans(scans: list[SourceScan], image_size: int, fov_mm: float) -> SliceStack:
    """Slice scans[0] as the reader does and resample the others onto its slices. Raises
    SiteDataError naming a file that cannot be read or that does not overlap the reference."""
    if not scans:
        raise ValueError("no scan given")
    reference = scans[0]
    data, zooms, affine = load_volume_affine(reference.path)
    slab = head_and_slab(data, zooms)
    kept = (int(slab[1][0]), int(slab[1][1]))
    grid = slice_grid(slab[0], zooms, image_size, fov_mm, kept)
    first, positions = axial_slices(data, zooms, image_size, fov_mm, slab, grid)
    rows = np.arange(kept[0], kept[1] + 1)
    images = [first.astype(np.float32)]
    for scan in scans[1:]:
        resampled = _resampled(scan.path, affine, grid, rows, fov_mm / image_size)
        if not np.nanmax(resampled, initial=0.0) > 0:
            raise SiteDataError(
                f"{scan.path}: does not overlap {reference.path} in world coordinates (check both affines)"
            )
        images.append(resampled)
    return SliceStack(np.stack(images), positions, kept, grid, affine, tuple(scans))


def resample_onto(path: Path, stack: SliceStack) -> np.ndarray:
    """Another scan (a real target, say) on the stack's slices. -> [S, H, W] in [0, 1]"""
    rows = np.arange(stack.kept[0], stack.kept[1] + 1)
    pixel = (stack.grid[0][0, 1] - stack.grid[0][0, 0]) * float(np.linalg.norm(stack.affine[:3, 0]))
    return _resampled(path, stack.affine, stack.grid, rows, abs(pixel))


def to_scan_grid(slices: np.ndarray, stack: SliceStack) -> nib.Nifti1Image:
    """Slices [S, H, W] on the stack's grid -> a float32 NIfTI with the reference file's own shape
    and affine: each voxel reads the slices where its world position falls (linear between
    slices and pixels; 0 outside the kept slab and the field of view)."""
    original = nib.load(stack.scans[0].path)
    assert isinstance(original, nib.spatialimages.SpatialImage)  # load_volume_affine read it as one
    shape = original.shape[:3]
    cols, lines = stack.grid
    # Pixel (row r, column c) of the grid is voxel (x0 + c·dx, y0 + r·dy) of the RAS grid.
    x0, dx = cols[0, 0], cols[0, 1] - cols[0, 0]
    y0, dy = lines[0, 0], lines[1, 0] - lines[0, 0]
    to_ras = np.linalg.inv(stack.affine) @ original.affine  # file voxel -> RAS-grid voxel
    volume = np.zeros(shape, dtype=np.float32)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for k in range(shape[2]):
        points = np.stack([i, j, np.full_like(i, k), np.ones_like(i)]).reshape(4, -1).astype(np.float64)
        x, y, z = (to_ras @ points)[:3]
        coordinates = [z - stack.kept[0], (y - y0) / dy, (x - x0) / dx]  # slice, row, column
        volume[:, :, k] = ndimage.map_coordinates(slices, coordinates, order=1, mode="constant", cval=0.0).reshape(
            shape[:2]
        )
    image = nib.Nifti1Image(volume, original.affine)
    image.set_qform(original.affine, code=1)
    image.set_sform(original.affine, code=1)
    return image
