"""Missing-sequence synthesis: generate a contrast a subject lacks from the scans it has (issue 16).

The model is the LDM with the source branch (common/source_branch.py). Each axial slice of the
subject's acquired scans, all on one slice grid (sites/subject_stack.py), is encoded by the VAE
into its modality's source slot; the target contrast is generated from noise, steered by those
latents and by the target's conditions (modality, field strength, TR, TE, TI, and the slice's
position). Sampling uses the posterior mean of each source, so a seed gives one volume.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from common.branches import SOURCE_MODALITIES
from common.conditions import Conditions, Modality
from common.model import LDM
from common.prompts import conditions_to_vector, describe
from common.sampling import sample
from common.source_branch import has_source_branch


@dataclass(frozen=True)
class Target:
    """The contrast to generate and how it is acquired; None = unknown (the model's 'unknown')."""

    modality: Modality
    field_strength: float | None = None  # tesla
    repetition_time: float | None = None  # s
    echo_time: float | None = None  # s
    inversion_time: float | None = None  # s

    def conditions(self, slice_position: float | None) -> Conditions:
        return Conditions(
            modality=self.modality, field_strength=self.field_strength, repetition_time=self.repetition_time,
            echo_time=self.echo_time, inversion_time=self.inversion_time, slice_position=slice_position,
        )  # fmt: skip


def check_sources(ldm: LDM, modalities: list[Modality], target: Target) -> None:
    """Refuse a model without the source branch, a repeated source contrast, and a target given as a source."""
    if not has_source_branch(ldm.denoiser.unet):
        raise ValueError(
            "this model has no source branch (common/source_branch.py), so it cannot translate: pretrain one with "
            "`fedmri pretrain --from BASE --source-branch`, federate it, and release it (docs/translate.md)"
        )
    repeated = sorted({m.value for m in modalities if modalities.count(m) > 1})
    if repeated:
        raise ValueError(f"one scan per contrast: {', '.join(repeated)} given more than once")
    if target.modality in modalities:
        raise ValueError(f"--to {target.modality.value} is one of the inputs: there is nothing to synthesize")


@torch.no_grad()
def source_latents(ldm: LDM, images: np.ndarray, modalities: list[Modality], batch_size: int = 64) -> torch.Tensor:
    """Source slices [n, S, H, W] in [0, 1] (NaN where scan n does not reach), scan n of contrast
    modalities[n] -> scaled posterior means in each contrast's slot, NaN in the others and where
    the scan does not reach. -> [S, 5, 4, h, w]"""
    device = ldm.device
    count = images.shape[1]
    size, channels = ldm.latent_size, ldm.vae.config.latent_channels
    latents = torch.full((count, len(SOURCE_MODALITIES), channels, size, size), float("nan"))
    for scan, modality in zip(images, modalities, strict=True):
        slot = SOURCE_MODALITIES.index(modality)
        pixels = torch.from_numpy(np.ascontiguousarray(scan, dtype=np.float32)).unsqueeze(1) * 2 - 1  # -> [S, 1, H, W]
        reached = torch.nonzero(~torch.isnan(pixels).flatten(1).any(1)).flatten()  # slices this scan covers
        for start in range(0, len(reached), batch_size):
            chosen = reached[start : start + batch_size]
            mean = ldm.vae.encode(pixels[chosen].to(device)).latent_dist.mean * ldm.settings.scale_factor
            latents[chosen, slot] = mean.cpu()  # -> [b, 4, h, w]
    return latents


def translate_batch(
    ldm: LDM,
    images: np.ndarray,
    modalities: list[Modality],
    conditions: torch.Tensor,
    steps: int = 25,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Target slices for source slices images [n_scans, N, H, W] in [0, 1] (scan n of contrast
    modalities[n]) and target condition vectors [N, 7]. -> [N, H, W] in [0, 1]"""
    if images.shape[-1] != ldm.settings.image_size:
        raise ValueError(f"slices are {images.shape[-1]} px; the model works at {ldm.settings.image_size} px")
    sources = source_latents(ldm, images, modalities)  # -> [N, 5, 4, h, w]
    generated = sample(
        ldm, conditions, steps=steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
        progress=progress, sources=sources,
    )  # fmt: skip
    return generated[:, 0].numpy()  # -> [N, H, W]


def translate_slices(
    ldm: LDM,
    images: np.ndarray,
    modalities: list[Modality],
    positions: np.ndarray,
    target: Target,
    steps: int = 25,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The target contrast of every slice of a subject's stack: images [n, S, H, W] in [0, 1] of
    contrasts `modalities`, slice positions [S] (NaN = unknown). -> [S, H, W] in [0, 1]"""
    check_sources(ldm, modalities, target)
    rows = [target.conditions(None if math.isnan(p) else float(p)) for p in positions]
    conditions = torch.stack([conditions_to_vector(c) for c in rows])  # -> [S, 7]
    return translate_batch(ldm, images, modalities, conditions, steps, guidance_scale, seed, batch_size, progress)


def sidecar(target: Target, inputs: list[tuple[Path, Modality]], model: Path, settings: dict) -> dict:
    """The synthetic volume's JSON: what it is, from what and how; BIDS keys where BIDS has them."""
    fields = {
        "MagneticFieldStrength": target.field_strength,
        "RepetitionTime": target.repetition_time,
        "EchoTime": target.echo_time,
        "InversionTime": target.inversion_time,
    }
    return {
        "Synthetic": True,
        "Description": (
            f"SYNTHETIC {target.modality.value}: generated by fedmri translate from the scans listed in Sources. "
            "It was not acquired; do not use it for diagnosis."
        ),
        "Modality": target.modality.value,
        "Prompt": describe(target.conditions(None)),
        **{k: v for k, v in fields.items() if v is not None},
        "Sources": [{"path": str(path), "modality": modality.value} for path, modality in inputs],
        "IntensityUnits": "normalised: 1 = the 99.5th percentile of a real scan's head (sites/bids.axial_slices)",
        "GeneratedBy": {"Name": "fedmri translate", "Model": str(model), **settings},
    }


def write_sheet(
    path: Path,
    sources: np.ndarray,
    modalities: list[Modality],
    synthetic: np.ndarray,
    target: Modality,
    real: np.ndarray | None = None,
    rows: int = 5,
) -> None:
    """PNG: `rows` slices spread over the kept slab; columns = each source, the synthetic target
    (labelled SYNTHETIC) and, when given, the real target."""
    picks = np.linspace(0.15, 0.85, rows) * (len(synthetic) - 1)
    columns = [(f"{m.value} (acquired)", s) for m, s in zip(modalities, sources, strict=True)]
    columns.append((f"{target.value} (SYNTHETIC)", synthetic))
    if real is not None:
        columns.append((f"{target.value} (real)", real))
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.9 * len(columns), 1.9 * rows), squeeze=False)
    for r, index in enumerate(np.rint(picks).astype(int)):
        for c, (title, stack) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(stack[index], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8, color="#b00000" if "SYNTHETIC" in title else "black")
            if c == 0:
                ax.set_ylabel(f"slice {index}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
