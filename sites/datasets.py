"""Torch datasets over a site's slices: one item per subject (the privacy unit), or per slice."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from common.branches import SOURCE_MODALITIES
from sites.bids import SiteSlices

Item = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

PAIR_TOLERANCE_MM = 3.0  # a source slice lies at most this far from its target slice
POSITION_SPAN_MM = 144.0  # slice_position 1 -> 0 spans this (sites/volume.py)


def source_rows(slices: SiteSlices) -> np.ndarray:
    """For each slice, the row of each modality's slice of the same subject at the same position
    (within PAIR_TOLERANCE_MM), or -1. The slice's own modality is never a source, and neither is
    a slice of another subject: pairs never cross subjects. With several scans of one modality, a
    subject's first such scan is the source. -> [N, 5] int64"""
    rows = np.full((len(slices), len(SOURCE_MODALITIES)), -1, dtype=np.int64)
    tolerance = PAIR_TOLERANCE_MM / POSITION_SPAN_MM
    for s in range(len(slices.subjects)):
        own = np.nonzero(slices.subject == s)[0]
        scans = {int(scan): own[slices.scan[own] == scan] for scan in np.unique(slices.scan[own])}
        first: dict[int, np.ndarray] = {}  # modality -> the rows of its subject's first scan of it
        for scan_rows in scans.values():
            first.setdefault(int(slices.modality[scan_rows[0]]), scan_rows)
        for target in scans.values():
            here = slices.slice_position[target]  # -> [t]
            for modality, source in first.items():
                if modality == slices.modality[target[0]]:
                    continue
                there = slices.slice_position[source]  # -> [s]
                distance = np.abs(here[:, None] - there[None, :])  # -> [t, s]; NaN where unknown
                distance = np.where(np.isnan(distance), np.inf, distance)
                nearest = distance.argmin(1)  # -> [t]
                close = distance[np.arange(len(target)), nearest] <= tolerance
                rows[target[close], modality] = source[nearest[close]]
    return rows


def _image(slices: SiteSlices, i: int) -> torch.Tensor:
    return torch.from_numpy(slices.images[i].astype(np.float32)).unsqueeze(0) * 2.0 - 1.0  # -> [1, H, W]


def _item(slices: SiteSlices, i: int, sources: np.ndarray) -> Item:
    """(image [1, H, W] in [-1, 1], conditions [7] laid out as CONDITION_VECTOR, lesion mask [H, W]
    uint8, source slices [5, 1, H, W] in [-1, 1] or NaN where none (common/source_branch.py))."""
    image = _image(slices, i)
    conditions = torch.from_numpy(slices.conditions(np.array([i]))[0])  # -> [7]
    mask = torch.from_numpy(slices.lesion_mask[i])  # -> [H, W], NO_MASK where unknown
    given = [_image(slices, int(r)) if r >= 0 else torch.full_like(image, float("nan")) for r in sources[i]]
    return image, conditions, mask, torch.stack(given)  # ..., [5, 1, H, W]


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
        self.sources = source_rows(slices)
        # For each subject, for each of its scans, the slice indices of that scan.
        self.by_subject: list[list[np.ndarray]] = []
        for s in range(len(slices.subjects)):
            rows = np.nonzero(slices.subject == s)[0]
            self.by_subject.append([rows[slices.scan[rows] == scan] for scan in np.unique(slices.scan[rows])])

    def __len__(self) -> int:
        return len(self.by_subject)

    def __getitem__(self, subject: int) -> Item:
        """-> images [K, 1, H, W] in [-1, 1], conditions [K, 7], lesion masks [K, H, W], sources [K, 5, 1, H, W]"""
        scans = self.by_subject[subject]
        if not scans:
            raise IndexError(f"subject {self.slices.subjects[subject]} has no usable slices")
        items = []
        for _ in range(self.k):
            rows = scans[int(torch.randint(len(scans), (1,), generator=self.generator))]
            row = int(rows[int(torch.randint(len(rows), (1,), generator=self.generator))])
            items.append(_item(self.slices, row, self.sources))
        images, conditions, masks, sources = zip(*items, strict=True)
        return torch.stack(images), torch.stack(conditions), torch.stack(masks), torch.stack(sources)


class SliceDataset(Dataset):
    """Every slice once, in order: for evaluation."""

    def __init__(self, slices: SiteSlices) -> None:
        self.slices = slices
        self.sources = source_rows(slices)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> Item:
        return _item(self.slices, i, self.sources)
