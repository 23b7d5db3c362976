"""A PNG contact sheet of a site: a few subjects x contrasts, with lesion outlines, for a person to look at."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np

from common.conditions import Modality, Pathology
from sites.bids import index_site, load_volume


def _pick_subjects(index, n: int) -> list[str]:
    """Up to n subjects, one of each pathology first."""
    chosen: list[str] = []
    with_scans = {s.subject for s in index.scans}
    for subject in sorted(
        index.subjects.values(),
        key=lambda s: (s.pathology.ordinal if s.pathology else len(Pathology), s.participant_id),
    ):
        if subject.participant_id in with_scans and subject.pathology not in [
            index.subjects[c].pathology for c in chosen
        ]:
            chosen.append(subject.participant_id)
    extra = [s for s in sorted(with_scans) if s not in chosen]
    return (chosen + extra)[:n]


def render_contact_sheet(root: Path, out_png: Path, n_subjects: int = 4, title: str = "") -> Path:
    """Draw n subjects (rows) x modalities (columns) through the lesion, or mid-brain, and save."""
    index = index_site(root, strict=False)
    subjects = _pick_subjects(index, n_subjects)
    modalities = [m for m in Modality if any(s.modality is m for s in index.scans)]
    fig, axes = plt.subplots(
        len(subjects), len(modalities), figsize=(2.2 * len(modalities), 2.4 * len(subjects)), squeeze=False
    )
    for row, sub in enumerate(subjects):
        mask = _lesion_mask(root, sub)
        scans = {s.modality: s for s in index.scans if s.subject == sub}
        for col, modality in enumerate(modalities):
            ax = axes[row, col]
            ax.axis("off")
            if modality not in scans:
                ax.text(0.5, 0.5, "not acquired", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                continue
            data, _ = load_volume(scans[modality].path)
            z = int(np.argmax(mask.sum((0, 1)))) if mask is not None and mask.any() else data.shape[2] // 2 + 2
            z = min(z, data.shape[2] - 1)
            plane = data[:, :, z].T[::-1]  # rows anterior to posterior
            ax.imshow(plane, cmap="gray", vmin=0, vmax=np.percentile(data, 99.5))
            if mask is not None and mask.shape == data.shape and mask[:, :, z].any():
                ax.contour(mask[:, :, z].T[::-1] > 0, levels=[0.5], colors="red", linewidths=0.6)
            if row == 0:
                ax.set_title(modality.value, fontsize=9)
        subject = index.subjects[sub]
        age = f", {subject.age:.0f} y" if subject.age is not None else ""
        axes[row, 0].text(
            -0.05,
            0.5,
            f"{sub}\n{subject.label}{age}",
            ha="right",
            va="center",
            fontsize=8,
            transform=axes[row, 0].transAxes,
        )
    fig.suptitle(title or f"{root.name}: {len(index.subjects)} subjects", fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def _lesion_mask(root: Path, sub: str) -> np.ndarray | None:
    path = root / "derivatives" / "groundtruth" / sub / "anat" / f"{sub}_desc-lesion_mask.nii.gz"
    if not path.exists():
        return None
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)
