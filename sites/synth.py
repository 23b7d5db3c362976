"""Synthesize one subject: deformed template anatomy, pathology, contrast physics, scanner effects."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from common.conditions import Modality, Pathology
from sites import physics
from sites.anatomy import Anatomy, hippocampus_weight, load_anatomy
from sites.config import SequenceParams, SyntheticSpec
from sites.pathology import (
    GLIOMA_LABELS,
    MS_LABEL,
    SubjectPathology,
    draw_pathology,
    glioma_fractions,
    glioma_mass_effect,
    ms_fraction,
)
from sites.physics import Tissue

# Field of view of every synthetic scan in scanner mm (LR, AP, SI) and its centre.
FOV_MM = (192.0, 228.0, 150.0)
FOV_CENTRE_MM = (0.0, -18.0, 9.0)
# Order of the channels sampled from the anatomy tensor.
_CHANNELS = ("gm", "wm", "csf", "fat", "bone", "ventricle_distance_mm", "csf_distance_mm")


@dataclass(frozen=True)
class SubjectDraw:
    """Who the subject is; written to participants.tsv."""

    participant_id: str
    age: float
    sex: str
    pathology: SubjectPathology


@dataclass(frozen=True)
class SubjectVolumes:
    """A subject's scans (float, arbitrary scanner units) and ground truth, on one RAS grid."""

    draw: SubjectDraw
    affine: np.ndarray  # voxel -> scanner mm, RAS
    scans: dict[Modality, np.ndarray]
    tissue: dict[str, np.ndarray]  # GM, WM, CSF fractions
    lesion_labels: np.ndarray  # uint8


@functools.lru_cache(maxsize=1)
def anatomy_tensor() -> tuple[torch.Tensor, np.ndarray]:
    """All anatomy channels as one [1, C, X, Y, Z] tensor for trilinear sampling, plus its affine.

    Built once per process (forked workers share the parent's). Channels-last: grid_sample reads
    all channels of a corner at once, 3-4 times faster on the CPU and bit for bit the same."""
    anatomy = load_anatomy()
    stacked = torch.from_numpy(np.stack([getattr(anatomy, name) for name in _CHANNELS])).unsqueeze(0)
    return stacked.contiguous(memory_format=torch.channels_last_3d), anatomy.affine


def scan_grid(spec: SyntheticSpec) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS affine (voxel -> scanner mm) of this site's scans."""
    r, t = spec.scanner.in_plane_mm, spec.scanner.slice_thickness_mm
    shape = (round(FOV_MM[0] / r), round(FOV_MM[1] / r), round(FOV_MM[2] / t))
    zooms = np.array([r, r, t])
    origin = np.array(FOV_CENTRE_MM) - zooms * (np.array(shape) - 1) / 2
    affine = np.eye(4)
    affine[:3, :3] = np.diag(zooms)
    affine[:3, 3] = origin
    return shape, affine


def draw_subject(spec: SyntheticSpec, index: int, anatomy: Anatomy) -> tuple[SubjectDraw, np.random.Generator]:
    """Demographics and pathology of subject `index`; deterministic in (spec.seed, index)."""
    rng = np.random.default_rng([spec.seed, index])
    labels = list(spec.pathology_mix)
    weights = np.array([spec.pathology_mix[p] for p in labels], dtype=np.float64)
    pathology = labels[rng.choice(len(labels), p=weights / weights.sum())]
    lo, hi = spec.age_range
    if pathology is Pathology.dementia:
        lo = max(lo, min(hi, 60.0))
    age = float(np.round(rng.uniform(lo, hi), 1))
    sex = "F" if rng.uniform() < 0.5 else "M"
    subject_pathology = draw_pathology(pathology, age, anatomy, rng)
    return SubjectDraw(f"sub-{index + 1:03d}", age, sex, subject_pathology), rng


def _random_rigid(rng: np.random.Generator) -> np.ndarray:
    """4x4 head pose and size: rotations of a few degrees, scaling +-7 %, shifts of a few mm."""
    ax, ay, az = np.deg2rad(rng.uniform(-6, 6, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx @ np.diag(rng.uniform(0.93, 1.07, 3))
    out[:3, 3] = rng.uniform(-5, 5, 3)
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], channels: int, scale: float) -> np.ndarray:
    """Smooth random field [*shape, channels]: a coarse 5x5x4 Gaussian grid, upsampled."""
    coarse = torch.from_numpy(rng.normal(0.0, scale, (1, channels, 5, 5, 4)).astype(np.float32))
    fine = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    return fine[0].permute(1, 2, 3, 0).numpy()


def _sample(volume: torch.Tensor, template_affine: np.ndarray, mni: np.ndarray) -> np.ndarray:
    """Trilinear samples [C, *points] of `volume` [1, C, X, Y, Z] at MNI mm points [*points, 3]."""
    vox = (mni - template_affine[:3, 3]) @ np.linalg.inv(template_affine[:3, :3]).T
    size = np.array(volume.shape[2:], dtype=np.float64)
    # grid_sample's last axis is (W, H, D) = (Z, Y, X) of our [X, Y, Z] volume.
    norm = (2.0 * vox / (size - 1) - 1.0)[..., ::-1].astype(np.float32)
    grid = torch.from_numpy(np.ascontiguousarray(norm)).reshape(1, 1, 1, -1, 3)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, :, 0, 0].reshape(volume.shape[1], *mni.shape[:-1]).numpy()


def synthesize_subject(spec: SyntheticSpec, index: int) -> SubjectVolumes:
    """Build every scan of subject `index` of a synthetic site. Deterministic in (seed, index)."""
    anatomy = load_anatomy()
    volume, template_affine = anatomy_tensor()
    draw, rng = draw_subject(spec, index, anatomy)
    shape, affine = scan_grid(spec)

    # Scanner-space voxel centres, with sub-samples across the slice for partial volume.
    n_sub = max(1, round(spec.scanner.slice_thickness_mm / 3.0))  # one sub-sample per 3 mm
    offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5  # in slices
    ii, jj, kk = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    idx = np.stack([ii, jj, kk], -1)[..., None, :] + np.stack([0 * offsets, 0 * offsets, offsets], -1)
    scanner_mm = idx @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    # -> [X, Y, Z, n_sub, 3]

    # Scanner -> template: inverse head pose, then a smooth random deformation (mm).
    pose = np.linalg.inv(_random_rigid(rng))
    mni = scanner_mm @ pose[:3, :3].T.astype(np.float32) + pose[:3, 3].astype(np.float32)
    mni = mni + _smooth_field(rng, shape, 3, 2.5)[..., None, :]
    to_vox = np.linalg.inv(template_affine[:3, :3]).T.astype(np.float32)
    mni_vox = (mni - template_affine[:3, 3].astype(np.float32)) @ to_vox

    glioma = draw.pathology.glioma
    lesion_fracs: dict[Tissue, np.ndarray] = {}
    labels = np.zeros(shape, dtype=np.uint8)
    if glioma is not None:
        parts = {k: v.mean(-1) for k, v in glioma_fractions(glioma, mni_vox).items()}
        mni_vox = glioma_mass_effect(glioma, mni_vox)
        mni = mni_vox @ template_affine[:3, :3].T + template_affine[:3, 3]
        lesion_fracs = {
            Tissue.NECROSIS: parts["necrotic_core"],
            Tissue.ENHANCING: parts["enhancing"],
            Tissue.EDEMA: parts["edema"],
        }
        for name, label in GLIOMA_LABELS.items():
            labels[parts[name] >= 0.5] = label
    if draw.pathology.ms_lesions:
        lesion_fracs[Tissue.MS_LESION] = ms_fraction(draw.pathology.ms_lesions, mni_vox).mean(-1)

    maps = _sample(volume, template_affine, mni).mean(-1)  # -> [C, X, Y, Z]
    ch = dict(zip(_CHANNELS, maps, strict=True))
    gm, wm, csf = ch["gm"], ch["wm"], ch["csf"]

    # Atrophy: tissue turned to CSF around the ventricles, on the pial side and in the hippocampi.
    at = draw.pathology.atrophy
    vent = np.clip((at.ventricle_expansion_mm - ch["ventricle_distance_mm"]) / 2.0 + 0.5, 0, 1)
    vent *= ch["ventricle_distance_mm"] > 0  # only around existing ventricles
    cortex = np.clip((at.cortical_thinning_mm - ch["csf_distance_mm"]) / 1.0 + 0.5, 0, 1) * (
        at.cortical_thinning_mm > 0
    )
    hippo = at.hippocampal_atrophy * hippocampus_weight(mni.mean(-2))
    lost_gm = gm * np.clip(vent + cortex + hippo, 0, 1)
    lost_wm = wm * vent
    gm, wm, csf = gm - lost_gm, wm - lost_wm, csf + lost_gm + lost_wm

    # Lesions replace the brain tissue they occupy (oedema mostly in white matter).
    brain = np.clip(gm + wm + csf, 1e-6, None)
    lesion_total = np.clip(sum(lesion_fracs.values(), np.zeros(shape)), 0, 1) * np.clip(gm + wm, 0, 1) / brain
    for tissue in list(lesion_fracs):
        lesion_fracs[tissue] = lesion_fracs[tissue] * np.clip(gm + wm, 0, 1) / brain
    keep = 1.0 - lesion_total
    gm, wm, csf = gm * keep, wm * keep, csf * keep
    if Tissue.MS_LESION in lesion_fracs:
        labels[lesion_fracs[Tissue.MS_LESION] >= 0.5] = MS_LABEL

    fractions = {
        Tissue.GM: gm,
        Tissue.WM: wm,
        Tissue.CSF: csf,
        Tissue.FAT: ch["fat"],
        Tissue.BONE: ch["bone"],
        **lesion_fracs,
    }
    scans = {m: _acquire(m, spec, fractions, affine, rng) for m in spec.modalities}
    maps = {"GM": gm.astype(np.float32), "WM": wm.astype(np.float32), "CSF": csf.astype(np.float32)}
    return SubjectVolumes(draw, affine, scans, maps, labels)


def tissue_signal(tissue: Tissue, modality: Modality, field_strength: float, seq: SequenceParams) -> float:
    """Noise-free signal of a pure tissue voxel (units of full magnetisation)."""
    pd, t1, t2 = physics.relaxation(tissue, field_strength)
    if modality is Modality.T1ce and tissue is Tissue.ENHANCING:
        t1 = physics.gadolinium_t1(t1, physics.ENHANCING_GD_MMOL, field_strength)
    if modality is Modality.FLAIR:
        ti = seq.inversion_time or physics.flair_inversion_time(field_strength, seq.repetition_time)
        return physics.inversion_recovery(pd, t1, t2, seq.repetition_time, seq.echo_time, ti)
    return physics.spin_echo(pd, t1, t2, seq.repetition_time, seq.echo_time)


def _acquire(
    modality: Modality,
    spec: SyntheticSpec,
    fractions: dict[Tissue, np.ndarray],
    affine: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """One scan: tissue mix -> signal -> bias field -> Rician noise -> arbitrary scanner units."""
    seq = spec.sequences[modality]
    b0 = spec.field_strength
    signal = cast(np.ndarray, sum(f * tissue_signal(t, modality, b0, seq) for t, f in fractions.items()))
    shape = signal.shape
    bias = np.exp(_smooth_field(rng, shape, 1, spec.scanner.bias_field / 4)[..., 0])
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    sigma = physics.TISSUES[Tissue.WM].proton_density / physics.snr(b0, voxel_mm3, spec.scanner.snr_at_1p5t_1mm3)
    real = signal * bias + rng.normal(0.0, sigma, shape)
    imag = rng.normal(0.0, sigma, shape)
    magnitude = np.sqrt(real**2 + imag**2)  # Rician (Gudbjartsson & Patz 1995)
    gain = spec.scanner.intensity_scale * rng.uniform(0.7, 1.5)
    return (magnitude * gain).astype(np.float32)
