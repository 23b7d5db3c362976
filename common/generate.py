"""Generate slices for prompts or a modality x pathology table, and write NIfTI, JSON and PNG."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import torch

from common.conditions import Conditions, Modality, Pathology
from common.model import LDM
from common.prompts import conditions_to_vector, describe
from common.sampling import sample

# Lesion-mask outlines on the grid, per label (common/mask_branch.py).
MASK_COLOURS = {1: "#ffd400", 2: "#37c837", 3: "#ff3b3b"}  # core or plaque, oedema, enhancing rim


@dataclass(frozen=True)
class Request:
    """One image to generate, the prompt it came from, and the lesion mask it must follow, if any."""

    conditions: Conditions
    prompt: str
    mask: np.ndarray | None = None  # [H, W] uint8 labels (common/mask_branch.py)
    lesion: str = ""  # how the mask was asked for, e.g. "glioma, 3 cm, left frontal"


def to_volume(slices: np.ndarray, pixel_mm: float) -> nib.Nifti1Image:
    """Slices [N, H, W] as one NIfTI in RAS: x = image columns (left to right), y = rows flipped
    (row 0 is anterior), slices last; float images stay float, labels stay uint8."""
    volume = np.ascontiguousarray(slices.transpose(2, 1, 0)[:, ::-1, :])  # -> [W, H, N]
    return nib.Nifti1Image(volume, np.diag([pixel_mm, pixel_mm, 1.0, 1.0]))


def read_mask_slices(path: Path, image_size: int) -> np.ndarray:
    """Lesion masks on the model's slice grid, as to_volume writes them (samples_mask.nii.gz):
    [image_size, image_size] or [image_size, image_size, N] labels 0-3 (BraTS's 4 read as 3).
    -> [N, H, W] uint8. Anything else is refused, naming the file and what it holds."""
    try:
        image = nib.load(path)
        if not isinstance(image, nib.spatialimages.SpatialImage):
            raise ValueError(f"{type(image).__name__} is not an image volume")
        volume = np.asarray(image.dataobj)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise ValueError(f"{path}: cannot be read as NIfTI ({err})") from None
    if volume.ndim == 2:
        volume = volume[:, :, None]
    if volume.ndim != 3 or volume.shape[:2] != (image_size, image_size):
        raise ValueError(
            f"{path}: shape {volume.shape}; --mask takes masks on the model's {image_size} x {image_size} slice grid "
            "(as samples_mask.nii.gz holds them), one axial slice per image. Draw one with --lesion instead."
        )
    labels = np.rint(volume)
    if np.abs(volume - labels).max() > 1e-3 or not np.isin(labels, (0, 1, 2, 3, 4)).all():
        found = sorted(set(np.unique(volume).tolist()) - {0, 1, 2, 3, 4})[:5]
        raise ValueError(f"{path}: lesion labels must be 0-3 (or BraTS's 4); found {found}")
    labels[labels == 4] = 3
    return np.ascontiguousarray(labels.astype(np.uint8)[:, ::-1, :].transpose(2, 1, 0))  # -> [N, H, W]


def grid_requests(
    field_strength: float,
    modalities: list[Modality] | None = None,
    pathologies: list[Pathology] | None = None,
    per_cell: int = 1,
) -> list[Request]:
    """Row-major modality x pathology table at one field strength, mid-brain slices."""
    requests = []
    for modality in modalities or list(Modality):
        for pathology in pathologies or list(Pathology):
            for _ in range(per_cell):
                c = Conditions(
                    modality=modality, pathology=pathology, field_strength=field_strength, slice_position=0.55
                )
                requests.append(Request(c, describe(c)))
    return requests


def generate(
    ldm: LDM,
    requests: list[Request],
    out: Path,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 3.0,
    sampler: str = "dpm++",
    grid_shape: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Sample every request and write OUT/samples.nii.gz, OUT/samples.json and OUT/grid.png; with
    masks, also OUT/samples_mask.nii.gz, slice for slice the mask each image followed."""
    conditions = torch.stack([conditions_to_vector(r.conditions) for r in requests])  # -> [N, 7]
    masks = _masks(requests, ldm.settings.image_size)  # -> [N, H, W] or None
    follow = None if masks is None else torch.from_numpy(masks)
    sampled = sample(ldm, conditions, steps, guidance_scale, sampler, seed, progress=progress, masks=follow)
    images = sampled[:, 0].numpy()  # -> [N, H, W]
    out.mkdir(parents=True, exist_ok=True)
    pixel = ldm.settings.fov_mm / ldm.settings.image_size
    nib.save(to_volume(images.astype(np.float32), pixel), out / "samples.nii.gz")
    if masks is not None:
        nib.save(to_volume(masks, pixel), out / "samples_mask.nii.gz")
    records = [
        {
            "index": i,
            "modality": r.conditions.modality.value if r.conditions.modality else None,
            "pathology": r.conditions.pathology.value if r.conditions.pathology else None,
            "field_strength": r.conditions.field_strength,
            "prompt": r.prompt,
            "seed": seed,
            "guidance_scale": guidance_scale,
            "sampler": sampler,
            "steps": steps,
            **({"lesion": r.lesion or "given mask", "lesion_labels": sorted(set(np.unique(r.mask).tolist()) - {0})}
               if r.mask is not None else {}),
        }
        for i, r in enumerate(requests)
    ]  # fmt: skip
    (out / "samples.json").write_text(json.dumps(records, indent=2))
    save_grid(images, requests, out / "grid.png", grid_shape)
    return images


def _masks(requests: list[Request], image_size: int) -> np.ndarray | None:
    """The requests' masks [N, H, W], or None when no request has one (all or none must)."""
    given = [r.mask is not None for r in requests]
    if not any(given):
        return None
    if not all(given):
        raise ValueError(
            f"{given.count(False)} of {len(requests)} requests have no mask: give one to every request or none"
        )
    masks = np.stack([np.asarray(r.mask, dtype=np.uint8) for r in requests])
    if masks.shape[1:] != (image_size, image_size):
        raise ValueError(f"masks are {masks.shape[1:]}; the model's slices are {image_size} x {image_size}")
    return masks


def save_grid(images: np.ndarray, requests: list[Request], path: Path, shape: tuple[int, int] | None = None) -> None:
    """A PNG of the samples; with `shape` (rows, cols) it is labelled as a modality x pathology table."""
    n = len(images)
    rows, cols = shape or (int(np.ceil(n / min(n, 8))), min(n, 8))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 0.8, 1.7 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if i >= n:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=1)
        mask = requests[i].mask
        for label, colour in MASK_COLOURS.items():  # outline each lesion label the image was asked to follow
            if mask is not None and (mask == label).any():
                ax.contour(mask == label, levels=[0.5], colors=colour, linewidths=0.7)
        c = requests[i].conditions
        if shape is None:  # the prompt, and the lesion the slice was asked to follow
            ax.set_title("\n".join(t[:30] for t in (requests[i].prompt, requests[i].lesion) if t), fontsize=6)
        else:
            if i < cols and c.pathology:
                ax.set_title(c.pathology.value, fontsize=9)
            if i % cols == 0 and c.modality:
                ax.set_ylabel(c.modality.value, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
