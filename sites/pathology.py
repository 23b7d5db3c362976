"""Lesions and atrophy drawn per subject, evaluated at template (MNI voxel) coordinates."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from common.conditions import Pathology
from sites.anatomy import Anatomy

# Label values of the lesion mask written to derivatives/.
GLIOMA_LABELS = {"necrotic_core": 1, "edema": 2, "enhancing": 3}
MS_LABEL = 1


@dataclass(frozen=True)
class Atrophy:
    """Atrophy in mm of tissue turned to CSF (ventricles, cortex) and hippocampal GM lost (0-1)."""

    ventricle_expansion_mm: float
    cortical_thinning_mm: float
    hippocampal_atrophy: float


@dataclass(frozen=True)
class Glioma:
    centre_vox: np.ndarray  # template voxel coordinates
    core_mm: float
    rim_mm: float  # outer radius of the enhancing rim
    edema_mm: float  # outer radius of the oedema
    shape_waves: np.ndarray  # [K, 4]: direction (3) and phase of radius-modulating waves
    mass_effect: float  # 0-1, how strongly nearby tissue is pushed away


@dataclass(frozen=True)
class MSLesion:
    centre_vox: np.ndarray
    axes: np.ndarray  # [3, 3] orthonormal rows: long axis first
    radii_mm: np.ndarray  # [3]


@dataclass(frozen=True)
class SubjectPathology:
    pathology: Pathology
    atrophy: Atrophy
    glioma: Glioma | None = None
    ms_lesions: list[MSLesion] = field(default_factory=list)


def draw_pathology(pathology: Pathology, age: float, anatomy: Anatomy, rng: np.random.Generator) -> SubjectPathology:
    """Draw atrophy (age-related, plus disease) and lesions for one subject."""
    years = max(0.0, age - 30.0)
    atrophy = Atrophy(
        ventricle_expansion_mm=0.04 * years * rng.uniform(0.6, 1.4),
        cortical_thinning_mm=0.012 * years * rng.uniform(0.6, 1.4),
        hippocampal_atrophy=0.004 * years * rng.uniform(0.5, 1.5),
    )
    if pathology is Pathology.dementia:
        atrophy = Atrophy(
            ventricle_expansion_mm=atrophy.ventricle_expansion_mm + rng.uniform(1.5, 3.5),
            cortical_thinning_mm=atrophy.cortical_thinning_mm + rng.uniform(0.6, 1.2),
            hippocampal_atrophy=min(0.9, atrophy.hippocampal_atrophy + rng.uniform(0.35, 0.6)),
        )
    glioma = _draw_glioma(anatomy, rng) if pathology is Pathology.glioma else None
    lesions = _draw_ms(anatomy, rng) if pathology is Pathology.ms else []
    return SubjectPathology(pathology, atrophy, glioma, lesions)


@functools.lru_cache(maxsize=4)
def lesion_candidates(anatomy: Anatomy, region: str) -> np.ndarray:
    """Template voxels [N, 3] where lesions of kind `region` may be centred."""
    a = anatomy
    if region == "glioma":  # supratentorial hemispheric white matter, away from the surface
        template_z = np.arange(a.wm.shape[2])[None, None, :]
        mask = (a.wm > 0.9) & (a.depth_mm > 18) & (template_z > 75)
    elif region == "periventricular":
        mask = (a.wm > 0.7) & (a.ventricle_distance_mm > 1.5) & (a.ventricle_distance_mm < 9)
    else:  # juxtacortical
        mask = (a.wm > 0.5) & (a.csf_distance_mm > 2) & (a.csf_distance_mm < 5) & (a.depth_mm > 4)
    return np.argwhere(mask)


def _pick_voxel(anatomy: Anatomy, region: str, rng: np.random.Generator) -> np.ndarray:
    candidates = lesion_candidates(anatomy, region)
    return candidates[rng.integers(len(candidates))].astype(np.float64)


def _box(vox: np.ndarray, centre: np.ndarray, radius: float) -> tuple[slice, slice, slice]:
    """Index box over the first three axes of `vox` [X, Y, Z, ..., 3] holding every point
    within `radius` (template voxels) of `centre`; found on a stride-4 in-plane grid."""
    step, margin = 4, radius + 4 * 6.0  # scanner voxels are at most ~6 template voxels apart
    coarse = vox[::step, ::step].reshape(*vox[::step, ::step].shape[:3], -1, 3)[..., 0, :]
    hit = np.nonzero((np.abs(coarse - centre) < margin).all(-1))
    if len(hit[0]) == 0:
        return (slice(0, 0),) * 3
    lo = [max(0, int(h.min()) * s - s) for h, s in zip(hit, (step, step, 1), strict=True)]
    hi = [int(h.max()) * s + s + 1 for h, s in zip(hit, (step, step, 1), strict=True)]
    return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])


def _draw_glioma(anatomy: Anatomy, rng: np.random.Generator) -> Glioma:
    centre = _pick_voxel(anatomy, "glioma", rng)
    core = rng.uniform(4.0, 10.0)
    rim = core + rng.uniform(2.0, 4.0)
    edema = rim + rng.uniform(6.0, 16.0)
    directions = rng.normal(size=(4, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    waves = np.concatenate([directions * rng.uniform(0.05, 0.12), rng.uniform(0, 2 * np.pi, (4, 1))], 1)
    return Glioma(centre, core, rim, edema, waves, mass_effect=rng.uniform(0.15, 0.35))


def _draw_ms(anatomy: Anatomy, rng: np.random.Generator) -> list[MSLesion]:
    n = int(rng.integers(6, 20))
    lesions = []
    for _ in range(n):
        if rng.uniform() < 0.7:  # Dawson's fingers: long axis perpendicular to the ventricle wall
            centre = _pick_voxel(anatomy, "periventricular", rng)
            nearest = anatomy.ventricle_nearest[(slice(None), *centre.astype(int))].astype(np.float64)
            long_axis = centre - nearest
        else:
            centre = _pick_voxel(anatomy, "juxtacortical", rng)
            long_axis = rng.normal(size=3)
        long_axis /= np.linalg.norm(long_axis) + 1e-9
        other = np.cross(long_axis, rng.normal(size=3))
        other /= np.linalg.norm(other) + 1e-9
        axes = np.stack([long_axis, other, np.cross(long_axis, other)])
        long_r = rng.uniform(2.5, 6.0)
        radii = np.array([long_r, long_r * rng.uniform(0.4, 0.7), long_r * rng.uniform(0.4, 0.7)])
        lesions.append(MSLesion(centre, axes, radii))
    return lesions


def glioma_mass_effect(glioma: Glioma, vox: np.ndarray) -> np.ndarray:
    """Template coordinates [..., 3] pulled toward the tumour centre: tissue looks pushed away."""
    offset = vox - glioma.centre_vox
    r2 = (offset**2).sum(-1, keepdims=True)
    pull = glioma.mass_effect * np.exp(-r2 / (2 * glioma.rim_mm**2))
    return glioma.centre_vox + offset * (1.0 - pull)


def glioma_fractions(glioma: Glioma, vox: np.ndarray) -> dict[str, np.ndarray]:
    """Soft fractions of necrotic core, enhancing rim and oedema at template voxels [..., 3]."""
    near = _box(vox, glioma.centre_vox, 1.2 * glioma.edema_mm)
    offset = vox[near] - glioma.centre_vox  # 1 mm template voxels, so voxels = mm
    r = np.sqrt((offset**2).sum(-1)) + 1e-6
    unit = offset / r[..., None]
    waves = glioma.shape_waves
    wobble = 1.0 + np.sin(unit @ waves[:, :3].T * 40.0 + waves[:, 3]).sum(-1) * 0.08
    rs = r / wobble

    def inside(radius: float) -> np.ndarray:
        out = np.zeros(vox.shape[:-1], dtype=np.float32)
        out[near] = 1.0 / (1.0 + np.exp(np.clip((rs - radius) / 0.6, -50, 50)))
        return out

    core = inside(glioma.core_mm)
    rim = inside(glioma.rim_mm)
    edema = inside(glioma.edema_mm)
    return {"necrotic_core": core, "enhancing": rim - core, "edema": edema - rim}


def ms_fraction(lesions: list[MSLesion], vox: np.ndarray) -> np.ndarray:
    """Soft fraction of MS lesion tissue at template voxels [..., 3] (union of ellipsoids)."""
    total = np.zeros(vox.shape[:-1], dtype=np.float32)
    for lesion in lesions:
        near = _box(vox, lesion.centre_vox, 1.5 * lesion.radii_mm.max())
        local = (vox[near] - lesion.centre_vox) @ lesion.axes.T / lesion.radii_mm
        rho = np.sqrt((local**2).sum(-1))
        total[near] = np.maximum(total[near], 1.0 / (1.0 + np.exp(np.clip((rho - 1.0) / 0.15, -50, 50))))
    return total
