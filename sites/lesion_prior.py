"""Lesion masks from nowhere private: the phantom's parametric tumours and plaques, on the model's slice grid.

A user asks for "glioma, 3 cm, left frontal" or draws random plausible masks. Every mask is
built from the public MNI152 template (sites/anatomy.py) and the phantom's own lesion model
(sites/pathology.py); no site's data is read, so a mask drawn here carries nothing private.

Geometry: a mask is the axial slice the reader would cut from a phantom scan at `slice_position`
(sites/volume.py: 1 is the top of the head, 0 lies BRAIN_SPAN_MM below), `image_size` pixels over
`fov_mm`, rows anterior to posterior and columns from the patient's left to right. The phantom's
scans end at its field of view's top (sites/synth.py), so position p lies at MNI z =
TOP_MM - (1 - p) * BRAIN_SPAN_MM. Labels follow the phantom's masks: glioma 1 necrotic core,
2 oedema, 3 enhancing rim (BraTS-like); MS 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from scipy import ndimage

from common.conditions import Pathology
from sites.anatomy import Anatomy, load_anatomy
from sites.pathology import GLIOMA_LABELS, MS_LABEL, Glioma, MSLesion, glioma_fractions, lesion_candidates, ms_fraction
from sites.synth import FOV_CENTRE_MM, FOV_MM
from sites.volume import BRAIN_SPAN_MM

TOP_MM = FOV_CENTRE_MM[2] + FOV_MM[2] / 2  # MNI z of position 1 on the phantom's scans
CENTRE_MM = (FOV_CENTRE_MM[0], FOV_CENTRE_MM[1])  # MNI (x, y) at the centre of a slice
# Glioma sizes the phantom draws: enhancing rim radius 6-14 mm, so 12-28 mm across. A request
# may ask for 10-60 mm; the oedema reaches 6-16 mm beyond the rim, as in the phantom.
GLIOMA_DIAMETER_MM = (10.0, 60.0)
RANDOM_GLIOMA_DIAMETER_MM = (12.0, 28.0)


class Side(StrEnum):
    left = "left"
    right = "right"


class Lobe(StrEnum):
    frontal = "frontal"
    parietal = "parietal"
    temporal = "temporal"
    occipital = "occipital"


# Deep white matter of each lobe, left hemisphere (MNI mm; x < 0 is the patient's left). After
# the lobes' extents in the Harvard-Oxford atlas; the nearest tumour-bearing voxel is used.
LOBE_CENTRES_MM = {
    Lobe.frontal: (-26.0, 28.0, 28.0),
    Lobe.parietal: (-28.0, -48.0, 38.0),
    Lobe.temporal: (-40.0, -20.0, -10.0),
    Lobe.occipital: (-22.0, -76.0, 8.0),
}
# Each lobe's vertical extent (MNI z, mm), after the same atlas: a slice outside it misses the lobe.
LOBE_Z_MM = {Lobe.frontal: (-25.0, 75.0), Lobe.parietal: (15.0, 75.0), Lobe.temporal: (-45.0, 15.0),
             Lobe.occipital: (-20.0, 45.0)}  # fmt: skip
MAX_OFF_CENTRE_MM = 30.0  # a requested lobe must have tumour-bearing white matter this close, in-plane


@dataclass(frozen=True)
class LesionRequest:
    """What a mask should show. Glioma: its enhancing tumour's diameter, side and lobe (random
    where None). MS: plaques around the ventricles and below the cortex of the slice."""

    pathology: Pathology
    slice_position: float = 0.55
    diameter_mm: float | None = None
    side: Side | None = None
    lobe: Lobe | None = None

    def __post_init__(self) -> None:
        if self.pathology not in (Pathology.glioma, Pathology.ms):
            raise ValueError(f"lesion masks are drawn for glioma or ms, not {self.pathology.value}")
        if not 0.0 <= self.slice_position <= 1.0:
            raise ValueError(f"slice position must lie in [0, 1], got {self.slice_position}")
        if self.pathology is Pathology.ms and (self.diameter_mm, self.side, self.lobe) != (None, None, None):
            raise ValueError("an MS mask takes no size, side or lobe: its plaques are drawn around the ventricles")
        lo, hi = GLIOMA_DIAMETER_MM
        if self.diameter_mm is not None and not lo <= self.diameter_mm <= hi:
            raise ValueError(f"glioma diameter must lie in {lo:g}-{hi:g} mm, got {self.diameter_mm:g} mm")

    def describe(self) -> str:
        """As a request is written: 'glioma, 30 mm, left frontal', 'glioma' (size and place drawn), 'ms'."""
        parts = [self.pathology.value]
        if self.diameter_mm is not None:
            parts.append(f"{self.diameter_mm:.0f} mm")
        if self.side is not None or self.lobe is not None:
            parts.append(" ".join(str(p.value) for p in (self.side, self.lobe) if p is not None))
        return ", ".join(parts)


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(mm|cm)$")


def parse_request(text: str, slice_position: float = 0.55) -> LesionRequest:
    """ "glioma, 3 cm, left frontal", "glioma 25 mm", "glioma, right temporal" or "ms" -> LesionRequest.

    Raises ValueError naming the word it could not read and what it accepts."""
    words = [w for w in re.split(r"[,\s]+", text.strip().lower()) if w]
    if not words:
        raise ValueError("empty lesion request; say e.g. 'glioma, 3 cm, left frontal' or 'ms'")
    try:
        pathology = Pathology(words[0])
    except ValueError:
        raise ValueError(
            f"lesion request {text!r}: starts with {words[0]!r}; it must start with glioma or ms"
        ) from None
    diameter = side = lobe = None
    rest = words[1:]
    while rest:
        word = rest.pop(0)
        size = _SIZE.match(word) or (_SIZE.match(f"{word} {rest[0]}") if rest else None)
        if size:
            if not _SIZE.match(word):
                rest.pop(0)
            diameter = float(size.group(1)) * (10.0 if size.group(2) == "cm" else 1.0)
        elif word in Side.__members__:
            side = Side(word)
        elif word in Lobe.__members__:
            lobe = Lobe(word)
        else:
            accepted = "a size (3 cm, 25 mm), left or right, " + ", ".join(Lobe)
            raise ValueError(f"lesion request {text!r}: cannot read {word!r}; after the pathology it takes {accepted}")
    return LesionRequest(pathology, slice_position, diameter, side, lobe)


def lesion_mask(
    request: LesionRequest, rng: np.random.Generator, image_size: int = 64, fov_mm: float = 220.0
) -> np.ndarray:
    """The mask [image_size, image_size] uint8 of `request`, drawn with `rng` where it leaves a choice.

    Raises ValueError when the requested lobe has no tumour-bearing white matter at this slice
    position, naming the positions where it has."""
    anatomy = load_anatomy()
    points = _slice_points(request.slice_position, image_size, fov_mm)  # -> [H, W, 1, 3] MNI mm
    to_vox = np.linalg.inv(anatomy.affine)
    vox = points @ to_vox[:3, :3].T + to_vox[:3, 3]  # -> [H, W, 1, 3] template voxels (1 mm)
    labels = np.zeros((image_size, image_size), dtype=np.uint8)
    if request.pathology is Pathology.glioma:
        glioma = _glioma(request, anatomy, rng)
        parts = glioma_fractions(glioma, vox)
        for name, label in GLIOMA_LABELS.items():  # -> [H, W, 1] each
            labels[parts[name][..., 0] >= 0.5] = label
    else:
        lesions = _ms_plaques(request, anatomy, rng)
        labels[ms_fraction(lesions, vox)[..., 0] >= 0.5] = MS_LABEL
    brain = _brain(anatomy, vox[..., 0, :]) >= 0.5  # lesions lie in the brain: -> [H, W]
    return np.where(brain, labels, 0).astype(np.uint8)


def random_request(pathology: Pathology, rng: np.random.Generator, slice_position: float = 0.55) -> LesionRequest:
    """A plausible request: the phantom's range of glioma sizes, any side and lobe the slice shows."""
    if pathology is Pathology.ms:
        return LesionRequest(pathology, slice_position)
    lobes = [lobe for lobe in Lobe if _lobe_reaches(lobe, slice_position)]
    if not lobes:
        raise ValueError(f"no lobe holds tumour-bearing white matter at slice position {slice_position:g}")
    diameter = float(rng.uniform(*RANDOM_GLIOMA_DIAMETER_MM))
    return LesionRequest(
        pathology, slice_position, diameter, Side(rng.choice(list(Side))), lobes[rng.integers(len(lobes))]
    )


def _slice_points(position: float, image_size: int, fov_mm: float) -> np.ndarray:
    """MNI mm of the pixel centres of the slice at `position`. -> [H, W, 1, 3]"""
    offsets = (np.arange(image_size) - (image_size - 1) / 2) * fov_mm / image_size
    y = CENTRE_MM[1] - offsets  # first row is the most anterior
    x = CENTRE_MM[0] + offsets  # first column is the patient's left
    rows, cols = np.meshgrid(y, x, indexing="ij")
    z = np.full_like(rows, TOP_MM - (1.0 - position) * BRAIN_SPAN_MM)
    return np.stack([cols, rows, z], -1)[:, :, None, :]


def _plane_z_vox(anatomy: Anatomy, position: float) -> float:
    z_mm = TOP_MM - (1.0 - position) * BRAIN_SPAN_MM
    return float((np.linalg.inv(anatomy.affine) @ [0.0, 0.0, z_mm, 1.0])[2])


def _lobe_centre_vox(anatomy: Anatomy, lobe: Lobe, side: Side) -> np.ndarray:
    x, y, z = LOBE_CENTRES_MM[lobe]
    mm = np.array([x if side is Side.left else -x, y, z, 1.0])
    return (np.linalg.inv(anatomy.affine) @ mm)[:3]


def _tumour_sites(anatomy: Anatomy, position: float, rim_mm: float) -> np.ndarray:
    """Voxels where the phantom centres tumours (sites/pathology.py) close enough to the slice that a
    tumour of enhancing radius `rim_mm` crosses it at least 0.87 times as wide. -> [N, 3] (1 mm voxels)"""
    candidates = lesion_candidates(anatomy, "glioma").astype(np.float64)
    return candidates[np.abs(candidates[:, 2] - _plane_z_vox(anatomy, position)) <= 0.5 * rim_mm]


def _lobe_reaches(lobe: Lobe, position: float) -> bool:
    """Does the slice at `position` cross tumour-bearing white matter of `lobe` (either side)?"""
    low, high = LOBE_Z_MM[lobe]
    if not low <= TOP_MM - (1.0 - position) * BRAIN_SPAN_MM <= high:
        return False
    anatomy = load_anatomy()
    sites = _tumour_sites(anatomy, position, RANDOM_GLIOMA_DIAMETER_MM[0] / 2)
    centre = _lobe_centre_vox(anatomy, lobe, Side.left)
    mirrored = _lobe_centre_vox(anatomy, lobe, Side.right)
    nearest = min(np.linalg.norm(sites[:, :2] - c[:2], axis=1).min(initial=np.inf) for c in (centre, mirrored))
    return bool(nearest <= MAX_OFF_CENTRE_MM)


def _positions(lobe: Lobe | None = None) -> str:
    """The slice positions (every 0.05) where a tumour of `lobe` (of any lobe if None) can be drawn."""
    lobes = [lobe] if lobe else list(Lobe)
    where = [f"{p:.2f}" for p in np.arange(0.0, 1.001, 0.05) if any(_lobe_reaches(x, float(p)) for x in lobes)]
    return ", ".join(where) or "none"


def _glioma(request: LesionRequest, anatomy: Anatomy, rng: np.random.Generator) -> Glioma:
    """The phantom's tumour (sites/pathology.py) centred in the requested lobe, crossing the slice."""
    diameter = request.diameter_mm or float(rng.uniform(*RANDOM_GLIOMA_DIAMETER_MM))
    rim = diameter / 2
    core = rim * float(rng.uniform(0.55, 0.75))
    edema = rim + float(rng.uniform(6.0, 16.0))
    side = request.side or Side(rng.choice(list(Side)))
    sites = _tumour_sites(anatomy, request.slice_position, rim)
    if not len(sites):
        raise ValueError(
            f"no tumour-bearing white matter at slice position {request.slice_position:g}; "
            f"there is at positions {_positions()}"
        )
    if request.lobe is None:
        x_mm = sites @ anatomy.affine[0, :3] + anatomy.affine[0, 3]
        hemisphere = sites[(x_mm < 0) == (side is Side.left)]  # MNI x < 0 is the patient's left
        if not len(hemisphere):
            raise ValueError(
                f"no tumour-bearing white matter on the {side} at slice position {request.slice_position:g}"
            )
        centre = hemisphere[rng.integers(len(hemisphere))]
    else:
        target = _lobe_centre_vox(anatomy, request.lobe, side)
        distance = np.linalg.norm(sites[:, :2] - target[:2], axis=1)
        if distance.min() > MAX_OFF_CENTRE_MM or not _lobe_reaches(request.lobe, request.slice_position):
            raise ValueError(
                f"the {side} {request.lobe} lobe has no tumour-bearing white matter at slice position "
                f"{request.slice_position:g}; it has at positions {_positions(request.lobe)}"
            )
        near = sites[distance <= distance.min() + 5.0]
        centre = near[rng.integers(len(near))]
    directions = rng.normal(size=(4, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    waves = np.concatenate([directions * rng.uniform(0.05, 0.12), rng.uniform(0, 2 * math.pi, (4, 1))], 1)
    return Glioma(centre, core, rim, edema, waves, mass_effect=0.0)


def _ms_plaques(request: LesionRequest, anatomy: Anatomy, rng: np.random.Generator) -> list[MSLesion]:
    """3-8 of the phantom's plaques (sites/pathology.py) around the ventricles, crossing the slice."""
    z = _plane_z_vox(anatomy, request.slice_position)
    plaques = []
    for region, count in (("periventricular", int(rng.integers(2, 6))), ("juxtacortical", int(rng.integers(1, 3)))):
        candidates = lesion_candidates(anatomy, region).astype(np.float64)
        candidates = candidates[np.abs(candidates[:, 2] - z) <= 2.0]
        for _ in range(count if len(candidates) else 0):
            centre = candidates[rng.integers(len(candidates))]
            long_axis = rng.normal(size=3)
            if region == "periventricular":  # Dawson's fingers: away from the ventricle wall
                long_axis = centre - anatomy.ventricle_nearest[(slice(None), *centre.astype(int))].astype(np.float64)
            long_axis /= np.linalg.norm(long_axis) + 1e-9
            other = np.cross(long_axis, rng.normal(size=3))
            other /= np.linalg.norm(other) + 1e-9
            long_r = float(rng.uniform(3.0, 6.0))
            radii = np.array([long_r, long_r * rng.uniform(0.5, 0.7), long_r * rng.uniform(0.5, 0.7)])
            plaques.append(MSLesion(centre, np.stack([long_axis, other, np.cross(long_axis, other)]), radii))
    if not plaques:
        raise ValueError(f"no white matter around the ventricles at slice position {request.slice_position:g}")
    return plaques


def _brain(anatomy: Anatomy, vox: np.ndarray) -> np.ndarray:
    """Grey + white matter fraction at template voxels [..., 3]. -> [...]"""
    coords = np.moveaxis(vox, -1, 0)
    return ndimage.map_coordinates(anatomy.gm + anatomy.wm, coords, order=1, mode="constant", cval=0.0)
