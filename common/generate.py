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


@dataclass(frozen=True)
class Request:
    """One image to generate and the prompt it came from."""

    conditions: Conditions
    prompt: str


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
    """Sample every request and write OUT/samples.nii.gz, OUT/samples.json and OUT/grid.png."""
    conditions = torch.stack([conditions_to_vector(r.conditions) for r in requests])  # -> [N, 7]
    images = sample(ldm, conditions, steps, guidance_scale, sampler, seed, progress=progress)[
        :, 0
    ].numpy()  # -> [N, H, W]
    out.mkdir(parents=True, exist_ok=True)
    # NIfTI in RAS: x = image columns (left to right), y = rows flipped (row 0 is anterior), slices last.
    pixel = ldm.settings.fov_mm / ldm.settings.image_size
    volume = np.ascontiguousarray(images.transpose(2, 1, 0)[:, ::-1, :]).astype(np.float32)  # -> [W, H, N]
    nib.save(nib.Nifti1Image(volume, np.diag([pixel, pixel, 1.0, 1.0])), out / "samples.nii.gz")
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
        }
        for i, r in enumerate(requests)
    ]
    (out / "samples.json").write_text(json.dumps(records, indent=2))
    save_grid(images, requests, out / "grid.png", grid_shape)
    return images


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
        c = requests[i].conditions
        if shape is None:
            ax.set_title(requests[i].prompt[:28], fontsize=6)
        else:
            if i < cols and c.pathology:
                ax.set_title(c.pathology.value, fontsize=9)
            if i % cols == 0 and c.modality:
                ax.set_ylabel(c.modality.value, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
