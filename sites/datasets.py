"""Torch datasets over a site's slices: one item per subject (the privacy unit), or per slice."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from sites.bids import SiteSlices

Item = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _item(slices: SiteSlices, i: int) -> Item:
    """(image [1, H, W] in [-1, 1], conditions [7] laid out as CONDITION_VECTOR, lesion mask [H, W] uint8)."""
    image = torch.from_numpy(slices.images[i].astype(np.float32)).unsqueeze(0) * 2.0 - 1.0
    conditions = torch.from_numpy(slices.conditions(np.array([i]))[0])  # -> [7]
    mask = torch.from_numpy(slices.lesion_mask[i])  # -> [H, W], NO_MASK where unknown
    return image, conditions, mask


class SubjectDataset(Dataset):
    """Item i is subject i: `slices_per_subject` (K) slices of that subject, each a random slice of a
    random one of its scans (any contrast), drawn with replacement.

    Because one item is one subject, Poisson sampling of items is Poisson sampling of subjects,
    and clipping the gradient of the item's mean loss bounds each subject's contribution however
    many of its slices the item holds (client/trainer.py).
    """

    def __init__(self, slices: SiteSlices, seed: int = 0, slices_per_subject: int = 1) -> None:
        if slices_per_subject < 1:
            raise ValueError(f"slices_per_subject must be >= 1, got {slices_per_subject}")
        self.slices = slices
        self.k = slices_per_subject
        self.generator = torch.Generator().manual_seed(seed)
        # For each subject, for each of its scans, the slice indices of that scan.
        self.by_subject: list[list[np.ndarray]] = []
        for s in range(len(slices.subjects)):
            rows = np.nonzero(slices.subject == s)[0]
            self.by_subject.append([rows[slices.scan[rows] == scan] for scan in np.unique(slices.scan[rows])])

    def __len__(self) -> int:
        return len(self.by_subject)

    def __getitem__(self, subject: int) -> Item:
        """-> images [K, 1, H, W] in [-1, 1], conditions [K, 7], lesion masks [K, H, W]"""
        scans = self.by_subject[subject]
        if not scans:
            raise IndexError(f"subject {self.slices.subjects[subject]} has no usable slices")
        items = []
        for _ in range(self.k):
            rows = scans[int(torch.randint(len(scans), (1,), generator=self.generator))]
            items.append(_item(self.slices, int(rows[int(torch.randint(len(rows), (1,), generator=self.generator))])))
        images, conditions, masks = zip(*items, strict=True)
        return torch.stack(images), torch.stack(conditions), torch.stack(masks)


class SliceDataset(Dataset):
    """Every slice once, in order: for evaluation."""

    def __init__(self, slices: SiteSlices) -> None:
        self.slices = slices

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> Item:
        return _item(self.slices, i)
