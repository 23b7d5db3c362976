"""Reference anatomy from the MNI152 2009a template shipped inside nilearn's wheel."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from scipy import ndimage

TEMPLATE_NAMES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Shells around the brain, in mm from the brain surface: CSF, then skull, then scalp.
SUBARACHNOID_MM = 2.5
SKULL_MM = 8.0
SCALP_MM = 13.0

# Hippocampi as ellipsoids in MNI mm (centre and semi-axes), after the Harvard-Oxford atlas.
HIPPOCAMPI = (((-27.0, -22.0, -14.0), (7.0, 17.0, 7.0)), ((27.0, -22.0, -14.0), (7.0, 17.0, 7.0)))


@dataclass(frozen=True, eq=False)  # hashed by identity: it is a per-process singleton
class Anatomy:
    """Tissue fractions and distance maps on the 1 mm MNI grid (all float32, same shape)."""

    affine: np.ndarray  # voxel -> MNI mm
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    fat: np.ndarray
    bone: np.ndarray
    depth_mm: np.ndarray  # distance inside the brain from its outer surface (0 outside)
    ventricle_distance_mm: np.ndarray  # distance to the lateral ventricles
    ventricle_nearest: np.ndarray  # [3, *shape] voxel index of the nearest ventricle voxel
    csf_distance_mm: np.ndarray  # distance to the nearest CSF-dominated voxel (pial side)


def template_dir() -> Path:
    """The folder inside nilearn's installed wheel that holds the MNI152 2009a maps."""
    import nilearn.datasets

    folder = Path(nilearn.datasets.__file__).parent / "data"
    missing = [n for n in TEMPLATE_NAMES.values() if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"nilearn's wheel at {folder} lacks the MNI152 template files {missing}; "
            "reinstall nilearn (the files ship inside its wheel, nothing is downloaded)"
        )
    return folder


@functools.lru_cache(maxsize=1)
def load_anatomy() -> Anatomy:
    """Load the template and derive CSF, skull, scalp, ventricles and distance maps (~10 s)."""
    folder = template_dir()
    images = {k: cast(nib.Nifti1Image, nib.load(folder / n)) for k, n in TEMPLATE_NAMES.items()}
    affine = images["t1"].affine
    t1 = np.asarray(images["t1"].dataobj, dtype=np.float32)
    gm = np.asarray(images["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(images["wm"].dataobj, dtype=np.float32) / 255.0

    # The template is skull-stripped: its non-zero support, holes filled, is the brain.
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 5.0, iterations=2))
    inside_csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    outside_mm = ndimage.distance_transform_edt(~brain).astype(np.float32)
    depth_mm = ndimage.distance_transform_edt(brain).astype(np.float32)

    shell_csf = (~brain) & (outside_mm <= SUBARACHNOID_MM)
    bone_shell = (outside_mm > SUBARACHNOID_MM) & (outside_mm <= SKULL_MM)
    scalp_shell = (outside_mm > SKULL_MM) & (outside_mm <= SCALP_MM)
    csf = (inside_csf + shell_csf).astype(np.float32)
    # The skull's middle third is diploe (marrow, fat-like); the rest is cortical bone.
    diploe = bone_shell & (np.abs(outside_mm - (SUBARACHNOID_MM + SKULL_MM) / 2) < 1.0)
    bone = (bone_shell & ~diploe).astype(np.float32)
    fat = (scalp_shell | diploe).astype(np.float32)

    # Lateral ventricles: CSF deep inside the brain, largest connected components.
    deep_csf = (inside_csf > 0.5) & (depth_mm > 12.0)
    labels, n = ndimage.label(deep_csf)
    sizes = ndimage.sum(deep_csf, labels, index=np.arange(1, n + 1))
    keep = np.arange(1, n + 1)[sizes >= 0.2 * sizes.max()] if n else []
    ventricles = np.isin(labels, keep)
    vent_dist, vent_nearest = ndimage.distance_transform_edt(~ventricles, return_indices=True)
    csf_dist = ndimage.distance_transform_edt(~((csf > 0.5) | (~brain & ~shell_csf)))

    return Anatomy(
        affine=affine,
        gm=gm,
        wm=wm,
        csf=csf,
        fat=fat,
        bone=bone,
        depth_mm=depth_mm,
        ventricle_distance_mm=vent_dist.astype(np.float32),
        ventricle_nearest=vent_nearest.astype(np.int16),
        csf_distance_mm=csf_dist.astype(np.float32),
    )


def hippocampus_weight(mni_xyz: np.ndarray) -> np.ndarray:
    """Smooth 0-1 membership of points [..., 3] (MNI mm) in either hippocampus ellipsoid."""
    weight = np.zeros(mni_xyz.shape[:-1], dtype=np.float32)
    for centre, radii in HIPPOCAMPI:
        r2 = (((mni_xyz - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1)
        weight = np.maximum(weight, np.exp(-(r2**2)).astype(np.float32))
    return weight
