"""One scan as the reader sees it: a 3D magnitude volume on an axis-aligned RAS grid, and where its brain is.

Real scanners hand over more than fedmri's phantom does: oblique slice stacks, 4D files holding
one volume, signed (z-scored) intensities with a constant background, necks below the head and
skull-stripped brains without one. This module turns each into the same thing, or refuses it
with a message naming the file.
"""

from __future__ import annotations

import itertools
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

# A skull-stripped brain's top lies SCALP_MM below where the top of its head was: the scalp,
# skull and CSF shells of the phantom, so both kinds of scan share one scale.
from sites.anatomy import SCALP_MM

# Axial slices are placed on the head, not on the file: position 1 is the top of the head (the
# highest slice whose head area is at least TOP_AREA of the largest one) and position 0 lies
# BRAIN_SPAN_MM below it. 144 mm is the span of the phantom's volumes, so their positions are
# what they always were, and a neck below that span is never read.
BRAIN_SPAN_MM = 144.0
TOP_AREA = 0.1
SLAB_AREA = 0.5  # within the span, slices whose head area is at least half the largest are kept
# A scan whose top slice holds this much of its largest head area stops inside the head, so its
# top is not known. A scan that stops above the brain but below the scalp is placed from its
# top slice: the phantom's volumes end there (their top slice holds 60-90 % of the largest area),
# and so do many real ones. A lower threshold would unplace them; a stack that stops between
# the two is placed too high, a limitation docs/sites.md states.
CUT_AREA = 0.95
# A single value filling at least this fraction of a signed volume is its background
# (skull-stripped or z-scored data): it becomes 0, and the brain's 0.5th percentile becomes 0 too.
CONSTANT_BACKGROUND = 0.2
STRIPPED_BACKGROUND = 0.98  # see is_skull_stripped
# ... of a background that fills at least this much of the volume: with fewer voxels around the
# head (the phantom's low-field heads fill their field of view) "all one value" says nothing.
STRIPPED_MIN_OUTSIDE = 0.1
OBLIQUE_RADIANS = 1e-3  # a grid tilted more than this from the RAS axes is resampled


class SiteDataError(ValueError):
    """Site data that cannot be used; the message names the file and what is wrong."""


def load_volume_affine(
    path: Path, order: int = 1, constant_ok: bool = False
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """A scan as float32 magnitude on an axis-aligned RAS grid, its voxel size (mm), and its
    voxel-to-world affine [4, 4] (mm).

    A 4D file holding one volume is read as 3D. An oblique grid is resampled (spline `order`:
    1 for images, 0 for masks) onto an RAS grid with the same voxel sizes that covers it.
    Raises SiteDataError for corrupt or truncated files, several volumes in one file, complex or
    non-numeric voxels, NaN/Inf voxels and empty volumes (every voxel one value), unless
    `constant_ok`: a lesion mask without a lesion is all zeros.
    """
    try:
        image = nib.load(path)
        if not isinstance(image, nib.spatialimages.SpatialImage):
            raise SiteDataError(f"{path}: {type(image).__name__} is not an image volume")
        if len(image.shape) == 4 and image.shape[3] == 1:
            image = nib.funcs.squeeze_image(image)  # -> 3D
        if len(image.shape) != 3:
            raise SiteDataError(
                f"{path}: expected one 3D volume, got shape {image.shape}"
                + ("; split the file and keep one volume per scan" if len(image.shape) == 4 else "")
            )
        if image.get_data_dtype().kind not in "biuf":
            raise SiteDataError(f"{path}: voxels of type {image.get_data_dtype()} are not real numbers")
        image = nib.as_closest_canonical(image)
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as err:
        if isinstance(err, SiteDataError):
            raise
        raise SiteDataError(f"{path}: corrupt or truncated NIfTI file ({type(err).__name__}: {err})") from None
    bad = ~np.isfinite(data)
    if bad.any():
        raise SiteDataError(f"{path}: {int(bad.sum())} NaN or Inf voxels")
    if data.size == 0 or (data.max() == data.min() and not constant_ok):
        raise SiteDataError(f"{path}: empty volume (every voxel is {data.flat[0] if data.size else 'absent'})")
    data = to_magnitude(data)
    affine = np.asarray(image.affine, dtype=np.float64)
    if is_oblique(affine):
        data, affine = resample_to_ras(data, affine, order)
    zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(0)))
    return data, zooms, affine  # type: ignore[return-value]


def to_magnitude(data: np.ndarray) -> np.ndarray:
    """Non-negative intensities with a zero background. -> float32, like `data`

    Magnitude images (no negative voxel) are returned unchanged. A signed volume (z-scored, say)
    is shifted: its constant background, if one value fills at least CONSTANT_BACKGROUND of it,
    becomes 0 and so does the 0.5th percentile of the rest; otherwise its 0.5th percentile does.
    """
    if data.min() >= 0:
        return data
    values, counts = np.unique(data.ravel()[:: max(1, data.size // 500_000)], return_counts=True)
    if counts.max() >= CONSTANT_BACKGROUND * counts.sum():
        inside = data != values[counts.argmax()]
        floor = np.percentile(data[inside], 0.5)
        return np.where(inside, np.clip(data - floor, 0.0, None), 0.0).astype(np.float32)
    return np.clip(data - np.percentile(data, 0.5), 0.0, None).astype(np.float32)


def is_oblique(affine: np.ndarray) -> bool:
    """Does any voxel axis of `affine` tilt more than OBLIQUE_RADIANS from its world axis?"""
    return bool(np.max(nib.affines.obliquity(affine)) > OBLIQUE_RADIANS)


def resample_to_ras(data: np.ndarray, affine: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """`data` on an axis-aligned grid with the same voxel sizes that covers the oblique one.
    -> (volume, its diagonal affine)"""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))  # voxel size along each array axis, mm
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in data.shape])), dtype=np.float64)  # -> [8, 3]
    world = corners @ affine[:3, :3].T + affine[:3, 3]  # -> [8, 3] mm
    low, high = world.min(0), world.max(0)
    shape = tuple(int(n) for n in np.floor((high - low) / zooms + 1e-6) + 1)
    target = np.diag([*zooms, 1.0])
    target[:3, 3] = low
    to_source = np.linalg.inv(affine) @ target  # target voxel -> world -> source voxel
    out = ndimage.affine_transform(
        data, to_source[:3, :3], to_source[:3, 3], output_shape=shape, order=order, mode="constant", cval=0.0
    )
    return out.astype(np.float32), target


def foreground_of(data: np.ndarray) -> np.ndarray:
    """The head: voxels above 10 % of the volume's 99th percentile. -> bool, like `data`"""
    return data > 0.1 * np.percentile(data, 99)


def is_skull_stripped(data: np.ndarray, foreground: np.ndarray) -> bool:
    """Is everything around the head one value (its smallest), as masking (skull stripping) leaves it?

    Air around an unmasked head holds noise: on ../shared/real-dev at most 80 % of the voxels
    two voxels or more outside the head share one value, while skull-stripped scans have 100 %.
    """
    step = max(1, math.ceil((data.size / 250_000) ** (1 / 3)))  # every step-th voxel: at most ~250k of them
    small, head = data[::step, ::step, ::step], foreground[::step, ::step, ::step]
    outside = ~dilate_6(dilate_6(head))
    if outside.sum() < STRIPPED_MIN_OUTSIDE * outside.size:  # a head that fills its field of view
        return False
    around = small[outside]
    return bool(np.count_nonzero(around == around.min()) >= STRIPPED_BACKGROUND * around.size)


def dilate_6(mask: np.ndarray) -> np.ndarray:
    """`mask` grown by one voxel along each axis (6-neighbourhood), nothing entering from beyond the
    border: scipy's `binary_dilation(mask)`, by array shifts, about 20 times faster. -> bool, like `mask`"""
    out = mask.copy()
    for axis in range(mask.ndim):
        ahead = [slice(None)] * mask.ndim
        behind = [slice(None)] * mask.ndim
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        out[tuple(ahead)] |= mask[tuple(behind)]
        out[tuple(behind)] |= mask[tuple(ahead)]
    return out


def brain_slab(data: np.ndarray, foreground: np.ndarray, slice_mm: float) -> tuple[int, int, np.ndarray]:
    """(first, last, positions): the axial indices of the slices a site keeps, and their positions.

    Position 1 is the top of the head, the highest slice with at least TOP_AREA of the largest
    head area; a skull-stripped scan's top is its brain's, placed SCALP_MM lower. Position 0 lies
    BRAIN_SPAN_MM below the top. Kept slices lie within that span and cover at least SLAB_AREA of
    the largest head area in it. -> (int, int, [last - first + 1] float32)

    A scan whose top slice holds at least CUT_AREA of the largest head area is cut through the
    middle of the head (a partial 2D stack, say): where its top is is not known, so its positions
    are NaN (unknown) and every slice with at least SLAB_AREA of the largest area is kept.
    """
    area = foreground.sum((0, 1))  # -> [Z]
    if area[-1] >= CUT_AREA * area.max():
        kept = np.nonzero(area >= SLAB_AREA * area.max())[0]
        first, last = int(kept.min()), int(kept.max())
        return first, last, np.full(last - first + 1, np.nan, dtype=np.float32)
    top = int(np.nonzero(area >= TOP_AREA * area.max())[0].max())
    below_top = (top - np.arange(len(area))) * slice_mm + (SCALP_MM if is_skull_stripped(data, foreground) else 0.0)
    within = (below_top >= 0) & (below_top <= BRAIN_SPAN_MM + 1e-6)
    keep = np.nonzero(within & (area >= SLAB_AREA * area[within].max()))[0]
    first, last = int(keep.min()), int(keep.max())
    return first, last, (1.0 - below_top[first : last + 1] / BRAIN_SPAN_MM).astype(np.float32)
