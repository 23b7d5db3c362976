"""fedmri's lesion segmenter: a small 2D UNet that measures whether a generated slice shows its mask.

Issue 15's mask adherence is the Dice between the mask a slice was asked to follow and the
lesion segmented in the slice. The segmenter that reads the lesion is trained, like the
evaluator, on the public **reference** sites only (`sites/hospitals/reference/`: glioma and MS
subjects with their lesion masks, never seen by the base model or any hospital), and shipped
with its provenance (`fedmri train-segmenter`).

Labels are the mask branch's (common/mask_branch.py): 0 none, 1 glioma core or MS plaque,
2 oedema, 3 enhancing rim. Dice is reported on the whole lesion (every label > 0): BraTS's
"whole tumour" for glioma, the plaques for MS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.conditions import Modality, Pathology
from common.fit import fit
from common.mask_branch import MASK_LABELS
from common.weights import load_network, save_network, shipped_dir

NAME = "fedmri-seg-v1"
SEGMENTER_DIR = Path(__file__).parent / "weights" / NAME
WEIGHTS = "segmenter.safetensors"
CLASSES = 1 + len(MASK_LABELS)  # background, then each lesion label
REBUILD = "`fedmri train-segmenter --out DIR`"
# The contrasts on which the shipped segmenter finds each lesion in real held-out reference slices
# (whole-lesion Dice >= 0.5, its provenance.json); on the others (T1w; T1ce; MS on T2w) it cannot
# tell a followed mask from an ignored one. Mask adherence and the downstream gain use these.
MASK_CONTRASTS = {Pathology.glioma: (Modality.T2w, Modality.FLAIR, Modality.PDw), Pathology.ms: (Modality.FLAIR,)}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
    )  # fmt: skip


class SegmenterNet(nn.Module):
    """[B, 1, 64, 64] in [0, 1] -> logits [B, 4, 64, 64]: a 3-level UNet (Ronneberger et al. 2015)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.down = nn.ModuleList([_block(1, w), _block(w, 2 * w), _block(2 * w, 4 * w)])
        self.up = nn.ModuleList([_block(4 * w + 2 * w, 2 * w), _block(2 * w + w, w)])
        self.out = nn.Conv2d(w, CLASSES, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2.0 - 1.0
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))  # -> [B, w·2^i, 64/2^i, 64/2^i]
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.out(x)  # -> [B, 4, 64, 64]


@dataclass(frozen=True)
class SegmenterConfig:
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 3e-3
    width: int = 16
    lesion_share: float = 0.5  # of each batch, slices that show a lesion (they are a minority)
    lesion_weight: float = 3.0  # cross-entropy weight of each lesion label against the background
    seed: int = 0


def _augment(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same left-right flip and ±4 px shift for a slice and its mask, and a random gamma on the slice."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
    dy, dx = (int(v) for v in torch.randint(-4, 5, (2,), generator=generator))
    images, masks = torch.roll(images, (dy, dx), (-2, -1)), torch.roll(masks, (dy, dx), (-2, -1))
    gamma = torch.exp(torch.empty(len(images), 1, 1, 1).uniform_(-0.3, 0.3, generator=generator))
    return images.clamp(0, 1) ** gamma, masks


def train_segmenter(
    images: np.ndarray,
    masks: np.ndarray,
    cfg: SegmenterConfig,
    progress: Callable[[int, int, float], None] | None = None,
) -> SegmenterNet:
    """Class-weighted cross-entropy plus the soft Dice of the whole lesion (Milletari et al. 2016,
    eq. 1) of each slice that shows one, averaged over those slices, so that an MS plaque of three
    pixels counts as much as a tumour of eighty; AdamW with a one-cycle schedule, on images
    [N, H, W] in [0, 1] and their masks [N, H, W]."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    net = SegmenterNet(cfg.width).train()
    x_all = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # -> [N, 1, 64, 64]
    y_all = torch.from_numpy(masks.astype(np.int64))  # -> [N, 64, 64]
    shows = torch.from_numpy((masks > 0).reshape(len(masks), -1).any(1))
    lesion_rows, other_rows = shows.nonzero().flatten(), (~shows).nonzero().flatten()
    if not len(lesion_rows):
        raise ValueError("no slice shows a lesion: nothing to learn a segmenter from")
    n_lesion = round(cfg.batch_size * cfg.lesion_share)
    class_weights = torch.tensor([1.0] + [cfg.lesion_weight] * len(MASK_LABELS))

    def loss_at() -> torch.Tensor:
        rows = torch.cat([
            lesion_rows[torch.randint(len(lesion_rows), (n_lesion,), generator=generator)],
            other_rows[torch.randint(len(other_rows), (cfg.batch_size - n_lesion,), generator=generator)],
        ])  # fmt: skip
        x, y = _augment(x_all[rows], y_all[rows], generator)  # -> [B, 1, 64, 64], [B, 64, 64]
        logits = net(x)  # -> [B, 4, 64, 64]
        lesion = 1.0 - logits.softmax(1)[:, 0]  # -> [B, 64, 64]: probability of any lesion label
        truth = (y > 0).float()
        overlap, sizes = (lesion * truth).sum((1, 2)), lesion.sum((1, 2)) + truth.sum((1, 2))  # -> [B] each
        soft_dice = ((2 * overlap + 1.0) / (sizes + 1.0))[:n_lesion].mean()  # the rows that show a lesion
        return nn.functional.cross_entropy(logits, y, weight=class_weights) + (1.0 - soft_dice)

    fit(net, cfg.steps, cfg.learning_rate, loss_at, progress)
    return net


class Segmenter:
    """A loaded segmenter: slices [N, H, W] in [0, 1] in, label masks [N, H, W] out."""

    def __init__(self, net: SegmenterNet, provenance: dict | None = None) -> None:
        self.net = net.eval()
        self.provenance = provenance or {}

    @torch.no_grad()
    def segment(self, images: np.ndarray, batch: int = 128) -> np.ndarray:
        """-> [N, H, W] uint8 labels (0 none, MASK_LABELS)"""
        out = [
            self.net(torch.from_numpy(np.asarray(images[s : s + batch], dtype=np.float32)).unsqueeze(1)).argmax(1)
            for s in range(0, len(images), batch)
        ]
        return torch.cat(out).numpy().astype(np.uint8) if out else np.zeros((0, *images.shape[1:]), np.uint8)


def dice(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Whole-lesion Dice 2|P ∩ T| / (|P| + |T|) of each pair of masks [N, H, W]; NaN where both are
    empty (nothing to find, nothing found: no evidence either way). -> [N] float64"""
    p, t = predicted.reshape(len(predicted), -1) > 0, truth.reshape(len(truth), -1) > 0
    both = (p & t).sum(1).astype(np.float64)
    sizes = (p.sum(1) + t.sum(1)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 0, 2 * both / sizes, np.nan)


def mask_adherence(segmenter: Segmenter, images: np.ndarray, masks: np.ndarray) -> float:
    """Mean whole-lesion Dice between the masks [N, H, W] slices were asked to follow and the lesion
    the segmenter finds in the slices [N, H, W], over the slices whose mask shows a lesion."""
    asked = (masks.reshape(len(masks), -1) > 0).any(1)
    if not asked.any():
        raise ValueError("no mask shows a lesion: mask adherence is undefined")
    return float(np.mean(dice(segmenter.segment(images[asked]), masks[asked])))


def save_segmenter(net: SegmenterNet, cfg: SegmenterConfig, out: Path, provenance: dict) -> Path:
    """Write OUT/segmenter.safetensors and OUT/provenance.json (config, data, validation Dice, sha256)."""
    labels = {"0": "none", "1": "glioma core or MS plaque", "2": "oedema", "3": "enhancing rim"}
    return save_network(out, WEIGHTS, net.state_dict(), {**provenance, "config": asdict(cfg), "labels": labels})


def load_segmenter(directory: Path | None = None) -> Segmenter:
    """The segmenter in `directory` (default: the shipped one), after checking its sha256 against provenance."""
    state, provenance = load_network(directory or shipped_dir(SEGMENTER_DIR, REBUILD), WEIGHTS, REBUILD)
    net = SegmenterNet(SegmenterConfig(**provenance["config"]).width)
    net.load_state_dict(state)
    return Segmenter(net, provenance)
