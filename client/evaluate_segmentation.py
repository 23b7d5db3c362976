"""Downstream segmentation gain at a site (issue 15): do the model's synthetic (image, lesion mask)
pairs help the site train its own lesion segmenter?

For each focal pathology (glioma, MS) whose lesion masks the site holds, on the contrasts where
lesions are visible to a segmenter (common/segmenter.MASK_CONTRASTS):

- **real**: every slice, with its mask, of k training subjects with that pathology;
- **synthetic**: `GainConfig.synthetic` pairs. Each mask is drawn from the public prior
  (sites/lesion_prior.py), and the model generates its image for the conditions of one of the
  site's own lesion slices (contrast, field strength, TR, TE, TI, position), with the mask;
- a small segmenter (common/segmenter.py) is trained from scratch on the real slices, and again
  on the real plus the synthetic ones. Each is scored by the mean whole-lesion Dice over every
  held-out slice that shows a lesion; the figures are means over `repeats` draws of the k subjects.

Only the aggregates leave ("segment/<pathology>/<key>"), each over at least `min_subjects`
held-out subjects. The synthetic pairs come from public masks and the model: no site mask is
copied into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from common.conditions import CONDITION_VECTOR, Pathology
from common.mask_branch import NO_MASK, has_mask_branch
from common.model import LDM
from common.protocol import SEGMENT_KEYS, EvalRequest
from common.sampling import sample
from common.segmenter import MASK_CONTRASTS, Segmenter, SegmenterConfig, dice, train_segmenter
from sites.bids import SiteSlices
from sites.lesion_prior import lesion_mask, random_request

__all__ = ["SEGMENT_KEYS", "GainConfig", "downstream_dice", "segmentation_gain"]


@dataclass(frozen=True)
class GainConfig:
    """The site's own settings of the downstream test (the server cannot change them)."""

    k: int = 5  # real labelled subjects (issue 15)
    repeats: int = 3
    synthetic: int = 64  # generated pairs per pathology
    segmenter: SegmenterConfig = field(default_factory=lambda: SegmenterConfig(steps=300, width=8))


@dataclass(frozen=True)
class Labelled:
    """Slices [N, H, W] in [0, 1], their lesion masks [N, H, W] and the subject of each [N]."""

    images: np.ndarray
    masks: np.ndarray
    subjects: np.ndarray


def _shows(masks: np.ndarray) -> np.ndarray:
    """[N, H, W] masks -> [N] bool: does the slice show a lesion?"""
    return np.asarray((masks > 0).any(axis=(1, 2)))


def _lesion_dice(segmenter: Segmenter, test: Labelled) -> float:
    shows = _shows(test.masks)
    return float(np.nanmean(dice(segmenter.segment(test.images[shows]), test.masks[shows])))


def downstream_dice(
    real: Labelled, synthetic: Labelled, test: Labelled, cfg: GainConfig, seed: int = 0
) -> tuple[float, float]:
    """(mean Dice trained on k real subjects, mean Dice on those plus the synthetic pairs), over
    cfg.repeats draws of k subjects among those with a lesion slice; both score `test`."""
    rng = np.random.default_rng(seed)
    with_lesion = np.unique(real.subjects[_shows(real.masks)])
    if len(with_lesion) < cfg.k:
        raise ValueError(f"{len(with_lesion)} training subjects show a lesion; the test needs k = {cfg.k}")
    real_only, with_synthetic = [], []
    for repeat in range(cfg.repeats):
        chosen = np.isin(real.subjects, rng.choice(with_lesion, cfg.k, replace=False))
        images, masks = real.images[chosen], real.masks[chosen]
        settings = replace(cfg.segmenter, seed=cfg.segmenter.seed + repeat)
        real_only.append(_lesion_dice(Segmenter(train_segmenter(images, masks, settings)), test))
        both = train_segmenter(
            np.concatenate([images, synthetic.images]), np.concatenate([masks, synthetic.masks]), settings
        )
        with_synthetic.append(_lesion_dice(Segmenter(both), test))
    return float(np.mean(real_only)), float(np.mean(with_synthetic))


def _labelled(slices: SiteSlices, pathology: Pathology) -> Labelled:
    """Every slice, in the pathology's visible contrasts, of the subjects with that pathology whose
    masks are known (a lesion-free slice of such a subject is a negative example)."""
    ill = np.unique(slices.subject[slices.pathology == pathology.ordinal])
    contrasts = [m.ordinal for m in MASK_CONTRASTS[pathology]]
    rows = np.nonzero(
        np.isin(slices.subject, ill) & np.isin(slices.modality, contrasts) & (slices.lesion_mask[:, 0, 0] != NO_MASK)
    )[0]
    return Labelled(slices.images[rows].astype(np.float32), slices.lesion_mask[rows], slices.subject[rows])


def _synthetic(ldm: LDM, training: SiteSlices, pathology: Pathology, n: int, settings: EvalRequest) -> Labelled:
    """n pairs: public-prior masks, images generated for the conditions of the site's lesion slices."""
    rng = np.random.default_rng(settings.seed + 15)
    contrasts = [m.ordinal for m in MASK_CONTRASTS[pathology]]
    lesion_rows = np.nonzero((training.pathology == pathology.ordinal) & np.isin(training.modality, contrasts))[0]
    conditions: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    while len(masks) < n:
        row = int(rng.choice(lesion_rows))
        condition = training.conditions(np.array([row]))[0]  # -> [7], the site's own acquisition
        position = condition[CONDITION_VECTOR.index("slice_position")]
        position = float(position) if np.isfinite(position) else 0.55
        try:
            mask = lesion_mask(
                random_request(pathology, rng, position), rng, ldm.settings.image_size, ldm.settings.fov_mm
            )
        except ValueError:  # no tumour-bearing lobe at this slice position: draw another slice
            continue
        conditions.append(condition)
        masks.append(mask)
    stacked = np.stack(masks)  # -> [n, H, W]
    images = sample(
        ldm, torch.from_numpy(np.stack(conditions)), settings.steps, settings.guidance_scale, "dpm++",
        seed=settings.seed + 15, masks=torch.from_numpy(stacked),
    )[:, 0].numpy()  # fmt: skip  # -> [n, H, W]
    return Labelled(images, stacked, np.full(n, -1))


def segmentation_gain(
    ldm: LDM, training: SiteSlices, heldout: SiteSlices, settings: EvalRequest, cfg: GainConfig = GainConfig()
) -> dict[str, float]:
    """{"segment/<pathology>/<key>": value} for a model with the mask branch; {} without one."""
    if not has_mask_branch(ldm.denoiser.unet):
        return {}
    out: dict[str, float] = {}
    for pathology in MASK_CONTRASTS:
        real, test = _labelled(training, pathology), _labelled(heldout, pathology)
        test_subjects = len(np.unique(test.subjects[_shows(test.masks)]))
        real_subjects = len(np.unique(real.subjects[_shows(real.masks)]))
        if test_subjects < settings.min_subjects or real_subjects < cfg.k:
            continue
        synthetic = _synthetic(ldm, training, pathology, cfg.synthetic, settings)
        real_only, with_synthetic = downstream_dice(real, synthetic, test, cfg, settings.seed)
        figures = {
            "k": float(cfg.k), "repeats": float(cfg.repeats), "n_synthetic": float(cfg.synthetic),
            "n_test_subjects": float(test_subjects), "dice_real_only": real_only, "dice_with_synthetic": with_synthetic,
        }  # fmt: skip
        out.update({f"segment/{pathology.value}/{key}": value for key, value in figures.items()})
    return out
