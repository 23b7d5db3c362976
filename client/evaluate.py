"""Evaluation at a site, on its held-out subjects: only aggregates leave, the closest-pairs PNG stays.

For every (modality, pathology) the site holds, with at least `min_subjects` held-out subjects,
the site generates samples from the prompts of its own held-out slices (their full condition
vectors: field strength, TR, TE, TI, slice position) and compares them with those slices:

- fd, fd_real: Fréchet distance in the evaluator's feature space, generated vs held-out, and
  the floor for the same sample count, training slices vs held-out;
- ms_ssim, ms_ssim_real: mean pairwise MS-SSIM of generated pairs and of held-out pairs;
- adherence_<head>, adherence_real_<head>: how often the evaluator's classifiers return the
  requested modality / pathology / field strength, on generated and on held-out real slices;
- memorized: the fraction of generated samples nearer a training slice than τ (common.metrics).

Then, once per site, downstream utility: a few-shot contrast classifier with k real training
slices per modality, with and without the generated ones, scored on every held-out slice; and,
for a model with the mask branch, the downstream segmentation gain (client/evaluate_segmentation.py);
for a model with the source branch, missing-sequence synthesis (client/evaluate_translation.py).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from client.evaluate_segmentation import SEGMENT_KEYS, segmentation_gain
from client.evaluate_translation import TRANSLATE_KEYS, translation_metrics
from common.conditions import Modality, Pathology
from common.evaluator import HEADS, Evaluator, field_class
from common.metrics import (
    adherence,
    downstream_utility,
    frechet_distance,
    memorization_audit,
    pairwise_ms_ssim,
    save_closest_pairs,
)
from common.model import LDM
from common.protocol import EvalRequest, Status
from common.sampling import sample
from common.source_branch import has_source_branch
from sites.bids import OTHER, SiteSlices

# The only per-condition figures that leave a site; each is an aggregate over >= min_subjects people.
CONDITION_KEYS = (
    "n_generated", "n_heldout_slices", "n_heldout_subjects", "fd", "fd_real", "ms_ssim", "ms_ssim_real",
    *(f"adherence_{h}" for h in HEADS), *(f"adherence_real_{h}" for h in HEADS), "memorized",
)  # fmt: skip
MODALITY_NAMES = {m.value for m in Modality}
FOCAL_NAMES = {Pathology.glioma.value, Pathology.ms.value}
UTILITY_KEYS = ("utility_k", "utility_synthetic_per_class", "utility_real_only", "utility_with_synthetic")


def conditions_of(slices: SiteSlices, rows: np.ndarray) -> torch.Tensor:
    """The condition vectors [n, 7] (CONDITION_VECTOR layout) of the given slices."""
    return torch.from_numpy(slices.conditions(rows))


def _labels(slices: SiteSlices, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "modality": slices.modality[rows],
        "pathology": slices.pathology[rows],
        "field": field_class(slices.field_strength[rows]),
    }


def evaluate_site(
    ldm: LDM,
    evaluator: Evaluator,
    training: SiteSlices,
    heldout: SiteSlices,
    settings: EvalRequest,
    private_dir: Path,
    translation: bool = False,
) -> dict[str, float]:
    """Every figure as a flat {"<modality>/<pathology>/<key>": value, "utility_*": value} mapping;
    with `translation` (the site's privacy.evaluate_translation), a model with the source branch
    is also scored on translation ("translate/..." keys)."""
    if len(heldout) == 0:
        raise ValueError("this site has no held-out subjects (data.holdout_fraction is 0): nothing to evaluate on")
    rng = np.random.default_rng(settings.seed)
    private_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, float] = {}
    generated_by_modality: dict[int, list[np.ndarray]] = {}
    for modality in Modality:
        for pathology in Pathology:
            # Slices whose field strength is unknown have no field label to check adherence against.
            held_rows = np.nonzero(
                (heldout.modality == modality.ordinal)
                & (heldout.pathology == pathology.ordinal)
                & np.isfinite(heldout.field_strength)
            )[0]
            train_rows = np.nonzero(
                (training.modality == modality.ordinal) & (training.pathology == pathology.ordinal)
            )[0]
            subjects = len(np.unique(heldout.subject[held_rows]))
            if subjects < settings.min_subjects or len(train_rows) < 2:
                continue
            n = settings.samples_per_condition
            prompts = rng.choice(held_rows, n, replace=True)  # the held-out slices' own conditions
            images = sample(
                ldm, conditions_of(heldout, prompts), settings.steps, settings.guidance_scale, "dpm++",
                seed=settings.seed + 1000 * modality.ordinal + pathology.ordinal,
            )[:, 0].numpy()  # fmt: skip  # -> [n, 64, 64]
            generated_by_modality.setdefault(modality.ordinal, []).append(images)
            real = heldout.images[held_rows].astype(np.float32)
            train = training.images[train_rows].astype(np.float32)
            train_sample = train[rng.choice(len(train), min(n, len(train)), replace=False)]
            real_sample = real[rng.choice(len(real), min(n, len(real)), replace=False)]
            features, predicted = evaluator.run(images)
            real_features, predicted_real = evaluator.run(real)
            requested, requested_real = _labels(heldout, prompts), _labels(heldout, held_rows)
            audit = memorization_audit(images, train, real)
            save_closest_pairs(images, train, audit, private_dir / f"closest_{modality.value}_{pathology.value}.png")
            row = {
                "n_generated": float(n),
                "n_heldout_slices": float(len(held_rows)),
                "n_heldout_subjects": float(subjects),
                "fd": frechet_distance(features, real_features),
                "fd_real": frechet_distance(evaluator.features(train_sample), real_features),
                "ms_ssim": pairwise_ms_ssim(images),
                "ms_ssim_real": pairwise_ms_ssim(real_sample),
                **{f"adherence_{h}": adherence(predicted[h], requested[h]) for h in HEADS},
                **{f"adherence_real_{h}": adherence(predicted_real[h], requested_real[h]) for h in HEADS},
                "memorized": audit.flagged_fraction,
            }
            out.update({f"{modality.value}/{pathology.value}/{k}": v for k, v in row.items()})
    if not out:
        raise ValueError(
            f"no (modality, pathology) has {settings.min_subjects}+ held-out subjects here; "
            "raise data.holdout_fraction or lower privacy.min_eval_subjects"
        )
    out.update(_utility(training, heldout, generated_by_modality, settings))
    out.update(segmentation_gain(ldm, training, heldout, settings))  # a model with the mask branch only
    if translation and has_source_branch(ldm.denoiser.unet):  # client/evaluate_translation.py
        out.update(translation_metrics(ldm, heldout, settings))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _utility(
    training: SiteSlices, heldout: SiteSlices, generated: dict[int, list[np.ndarray]], settings: EvalRequest
) -> dict[str, float]:
    """Few-shot contrast classification (held-out accuracy), k real per modality, ± the generated slices."""
    modalities = sorted(generated)
    if len(modalities) < 2:
        return {}
    keep = np.isin(training.modality, modalities)
    test = np.isin(heldout.modality, modalities)
    synthetic_x = np.concatenate([np.concatenate(generated[m]) for m in modalities])
    synthetic_y = np.concatenate([np.full(sum(len(g) for g in generated[m]), m) for m in modalities])
    utility = downstream_utility(
        training.images[keep].astype(np.float32), training.modality[keep], synthetic_x, synthetic_y,
        heldout.images[test].astype(np.float32), heldout.modality[test], classes=len(Modality),
        k=settings.few_shot_k, repeats=settings.few_shot_repeats, seed=settings.seed,
    )  # fmt: skip
    return {
        "utility_k": float(utility.k),
        "utility_synthetic_per_class": float(utility.synthetic_per_class),
        "utility_real_only": utility.real_only,
        "utility_with_synthetic": utility.with_synthetic,
    }


def held_flags(training: SiteSlices) -> dict[str, float]:
    """ "held/<modality>/<pathology>/<field class>" = 1 for each combination in the training data.

    The model card already lists what each site holds; the server uses this to mark unseen ones.
    """
    known = (training.pathology != OTHER) & np.isfinite(training.field_strength)
    labels = training.modality[known], training.pathology[known], field_class(training.field_strength[known])
    combos = set(zip(*labels, strict=True))
    return {f"held/{list(Modality)[m].value}/{list(Pathology)[p].value}/{f}": 1.0 for m, p, f in combos}


def check_keys(metrics: dict[str, float]) -> None:
    """Refuse to send anything that is not a whitelisted aggregate."""
    for key in metrics:
        parts = key.split("/")
        ok = (
            key in UTILITY_KEYS
            or (len(parts) == 3 and parts[2] in CONDITION_KEYS)
            or (len(parts) == 4 and parts[0] == "held")
            or (len(parts) == 4 and parts[0] == "translate" and parts[3] in TRANSLATE_KEYS
                and parts[2] in MODALITY_NAMES and set(parts[1].split("+")) <= MODALITY_NAMES)
            or (len(parts) == 3 and parts[0] == "segment" and parts[1] in FOCAL_NAMES and parts[2] in SEGMENT_KEYS)
        )  # fmt: skip
        if not ok:
            raise ValueError(f"evaluation metric {key!r} is not on the whitelist")


def run_site_evaluation(
    yaml_path: str,
    settings: EvalRequest,
    vae: dict[str, torch.Tensor],
    denoiser: dict[str, torch.Tensor],
    run_id: int = 0,
    device: str = "",
) -> tuple[str, dict[str, float], Path]:
    """Rebuild the sent release (`settings.model_configs` and the tensors), evaluate it, and return (site id, aggregates, folder of the private PNGs).

    The site's policy decides whether it answers at all and the minimum held-out cohort behind any
    figure (the server's `min_subjects` can only raise it). The answer is recorded in the site's
    ledger as not covered by DP, with its cohort size, before it leaves.
    """
    from client.ledger import Ledger, LedgerEntry, now
    from client.round import ledger_terms, open_ledger, site_data, site_device
    from common.evaluator import load_evaluator
    from common.model import ldm_from_parts
    from common.signed_entries import tensor_digest

    site, training, heldout = site_data(yaml_path)
    policy = site.privacy
    if not policy.evaluate:
        raise PermissionError(f"site {site.site_id}: its privacy policy (privacy.evaluate: false) declines evaluation")
    settings = dataclasses.replace(settings, min_subjects=max(settings.min_subjects, policy.min_eval_subjects))
    cohort = len(heldout.subjects)
    if cohort < settings.min_subjects:
        raise PermissionError(
            f"site {site.site_id}: {cohort} held-out subjects < the minimum cohort {settings.min_subjects} "
            "(privacy.min_eval_subjects); nothing is evaluated"
        )
    ldm = ldm_from_parts(dict(settings.model_configs), vae, denoiser).to(
        site_device(site, yaml_path, device)
    )  # the evaluator: CPU
    private_dir = Path(yaml_path).resolve().parent / ".fedmri-eval" / site.site_id
    metrics = evaluate_site(
        ldm, load_evaluator(), training, heldout, settings, private_dir, policy.evaluate_translation
    )
    metrics.update(held_flags(training))
    check_keys(metrics)
    path, _ = ledger_terms(site, len(training.subjects))
    with Ledger.locked(path, policy.round_wait_s):
        ledger = open_ledger(site, len(training.subjects))
        note = (
            f"evaluation answered, NOT covered by DP: {len(metrics)} aggregates over {cohort} held-out subjects "
            f"(at least {settings.min_subjects} per figure) and the training slices' FD floor and memorization audit"
        )
        entry = LedgerEntry(
            run_id, 0, Status.EVALUATED, None, ledger.epsilon, ledger.epsilon_rdp, [note], now(), cohort
        )
        ledger.append(dataclasses.replace(entry, global_digest=tensor_digest(denoiser)))  # what was evaluated
    return site.site_id, metrics, private_dir
