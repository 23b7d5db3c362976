"""Missing-sequence synthesis evaluated at a site, on its held-out subjects (issue 16).

For each contrast T that the held-out subjects have, and each source set drawn from their other
contrasts (every single one, and T1w + T2w for FLAIR), the site translates up to
`samples_per_condition` held-out T slices that have every source at the same position
(sites/datasets.source_rows), spread over as many subjects as possible and at most
ceil(n / subjects) from any one, each with the real slice's own conditions, and compares the
result with the real slice (common/metrics.py, whole slice, data range 1):

- psnr, ssim: synthetic against real;
- psnr_copy, ssim_copy: the copy baseline, a source slice mapped onto the real slice's
  histogram, from whichever source of the set scores the higher mean SSIM;
- n_slices, n_subjects: what the figures rest on.

Only these aggregates leave, each over at least `min_subjects` held-out subjects, and only if
the site's policy opts in (privacy.evaluate_translation): here the server's model reads held-out
pixels, a richer channel than the rest of the evaluation.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch

from common.conditions import Modality
from common.metrics import match_intensities, psnr, ssim
from common.model import LDM
from common.protocol import TRANSLATE_KEYS, EvalRequest
from common.translate import translate_batch
from sites.bids import SiteSlices
from sites.datasets import source_rows

__all__ = ["TRANSLATE_KEYS", "source_sets", "translation_metrics"]


def source_sets(present: set[Modality], target: Modality) -> list[tuple[Modality, ...]]:
    """Every single other contrast, and T1w + T2w for FLAIR (issue 16's acceptance pair)."""
    sets: list[tuple[Modality, ...]] = [(m,) for m in Modality if m in present and m is not target]
    if target is Modality.FLAIR and {Modality.T1w, Modality.T2w} <= present:
        sets.append((Modality.T1w, Modality.T2w))
    return sets


def _spread(rows: np.ndarray, subjects: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n of `rows`, taken from each subject in turn (each subject's in random order) and at
    most ceil(n / subjects) from any one, so that no subject dominates a figure."""
    queues = [rng.permutation(rows[subjects == s]) for s in rng.permutation(np.unique(subjects))]
    if not queues:
        return np.zeros(0, dtype=np.int64)
    cap = -(-n // len(queues))
    order = [q[i] for i in range(cap) for q in queues if i < len(q)]
    return np.array(order[:n], dtype=np.int64)


def translation_metrics(
    ldm: LDM, heldout: SiteSlices, settings: EvalRequest, skip: Collection[tuple[str, str]] = ()
) -> dict[str, float]:
    """{"translate/<source+source>/<target>/<key>": value} over the held-out subjects, for every
    (sources, target) pair they allow except those named in `skip` ("T1w+T2w", "FLAIR")."""
    rows = source_rows(heldout)  # -> [N, 5]
    rng = np.random.default_rng(settings.seed + 16)
    present = {list(Modality)[m] for m in np.unique(heldout.modality)}
    out: dict[str, float] = {}
    for target in Modality:
        if target not in present:
            continue
        for sources in source_sets(present, target):
            if ("+".join(m.value for m in sources), target.value) in skip:
                continue
            slots = [s.ordinal for s in sources]
            candidates = np.nonzero((heldout.modality == target.ordinal) & (rows[:, slots] >= 0).all(1))[0]
            chosen = _spread(candidates, heldout.subject[candidates], settings.samples_per_condition, rng)
            subjects = len(np.unique(heldout.subject[chosen]))
            if subjects < settings.min_subjects:
                continue
            real = heldout.images[chosen].astype(np.float32)  # -> [n, H, W]
            given = np.stack(
                [heldout.images[rows[chosen, slot]].astype(np.float32) for slot in slots]
            )  # -> [s, n, H, W]
            conditions = torch.from_numpy(heldout.conditions(chosen))  # the real slices' own, -> [n, 7]
            synthetic = translate_batch(
                ldm, given, list(sources), conditions, settings.steps, settings.guidance_scale,
                seed=settings.seed + 100 * target.ordinal + sum(10**i * s for i, s in enumerate(slots)),
            )  # fmt: skip
            copies = [match_intensities(images, real) for images in given]
            copy = max(copies, key=lambda c: float(ssim(c, real).mean()))
            figures = {
                "n_slices": float(len(chosen)),
                "n_subjects": float(subjects),
                "psnr": float(psnr(synthetic, real).mean()),
                "ssim": float(ssim(synthetic, real).mean()),
                "psnr_copy": float(psnr(copy, real).mean()),
                "ssim_copy": float(ssim(copy, real).mean()),
            }
            name = "+".join(m.value for m in sources)
            out.update({f"translate/{name}/{target.value}/{k}": v for k, v in figures.items()})
    return out
