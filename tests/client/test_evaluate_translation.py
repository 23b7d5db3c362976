"""Missing-sequence synthesis evaluated at a site (client/evaluate_translation.py) and its metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.evaluate import check_keys
from client.evaluate_translation import TRANSLATE_KEYS, source_sets, translation_metrics
from common.conditions import Modality
from common.metrics import match_intensities, psnr, ssim
from common.model import load_ldm
from common.protocol import EvalRequest
from sites.bids import read_site, split_subjects


def test_the_site_reports_every_source_set_over_its_held_out_subjects(tiny_sites: Path, source_base: Path) -> None:
    _, heldout = split_subjects(read_site(tiny_sites / "tiny-a", image_size=64), "tiny-a", 0.5)  # 2 subjects
    settings = EvalRequest(samples_per_condition=4, steps=2, min_subjects=2)
    metrics = translation_metrics(load_ldm(source_base), heldout, settings)
    check_keys(metrics)  # only whitelisted aggregates may leave
    pairs = {tuple(k.split("/")[1:3]) for k in metrics}
    assert len(pairs) == 4 * 3 + 1 and ("T1w+T2w", "FLAIR") in pairs  # tiny-a: T1w, T1ce, T2w, FLAIR
    for source, target in pairs:
        figures = {key: metrics[f"translate/{source}/{target}/{key}"] for key in TRANSLATE_KEYS}
        assert figures["n_subjects"] == 2 and figures["n_slices"] == 4  # spread over both subjects
        assert all(np.isfinite(v) for v in figures.values())
    strict = translation_metrics(
        load_ldm(source_base), heldout, EvalRequest(samples_per_condition=4, steps=2, min_subjects=3)
    )
    assert strict == {}  # nothing rests on fewer held-out subjects than the minimum


def test_source_sets_add_t1w_and_t2w_only_for_flair() -> None:
    present = {Modality.T1w, Modality.T2w, Modality.FLAIR}
    assert source_sets(present, Modality.FLAIR) == [(Modality.T1w,), (Modality.T2w,), (Modality.T1w, Modality.T2w)]
    assert source_sets(present, Modality.T2w) == [(Modality.T1w,), (Modality.FLAIR,)]


def _slices(seed: int) -> np.ndarray:
    """Blobby head-like slices [4, 64, 64] in [0, 1] with a zero background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:64, :64]
    head = ((x - 32) ** 2 / 26**2 + (y - 32) ** 2 / 29**2) < 1
    out = np.zeros((4, 64, 64), dtype=np.float32)
    for i in range(4):
        texture = sum(rng.random() * np.sin(x / rng.uniform(2, 6) + rng.uniform(0, 6)) for _ in range(3))
        out[i] = np.where(head, 0.5 + 0.15 * texture, 0.0)
    return np.clip(out, 0, 1)


def test_the_metrics_tell_a_faithful_slice_from_another_subjects() -> None:
    real = _slices(0)
    assert ssim(real, real).min() == 1.0 and psnr(real, real).min() > 100
    noisy = np.clip(real + np.random.default_rng(1).normal(0, 0.02, real.shape), 0, 1)
    other = _slices(2)
    assert ssim(noisy, real).mean() > ssim(other, real).mean() + 0.3
    assert psnr(noisy, real).mean() > psnr(other, real).mean() + 10


def test_the_copy_baseline_undoes_a_monotone_contrast_but_not_an_inverted_one() -> None:
    """Quantile matching turns a gamma-changed copy back into the target, but cannot turn an
    inverted contrast (T1w vs T2w's CSF) into it: the baseline is what intensity alone gives."""
    real = _slices(0)
    head = real > 0
    gamma = np.where(head, real**2.2 * 0.7 + 0.1, 0.0)
    inverted = np.where(head, 1.05 - real, 0.0)
    matched, flipped = match_intensities(gamma, real), match_intensities(inverted, real)
    assert ssim(matched, real).mean() > 0.95
    assert ssim(flipped, real).mean() < ssim(matched, real).mean() - 0.3


def test_slices_are_spread_over_subjects_and_none_dominates() -> None:
    from client.evaluate_translation import _spread

    rows = np.arange(104)
    subjects = np.array([0] * 100 + [1, 2, 3, 4])  # one subject with 100 candidate slices, four with 1
    chosen = _spread(rows, subjects, 32, np.random.default_rng(0))
    counts = np.bincount(subjects[chosen], minlength=5)
    assert counts.tolist() == [7, 1, 1, 1, 1]  # ceil(32 / 5) = 7 from the big one, not 28
    even = _spread(np.arange(40), np.repeat(np.arange(10), 4), 16, np.random.default_rng(1))
    assert len(even) == 16 and np.bincount(np.repeat(np.arange(10), 4)[even]).max() == 2
