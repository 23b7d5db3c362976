"""Each metric separates a good case from a bad one, on real (synthetic-hospital) slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.metrics import frechet_distance, memorization_audit, ms_ssim, pairwise_ms_ssim, save_closest_pairs, ssim


@pytest.fixture(scope="module")
def split(tiny_sites: Path) -> tuple[np.ndarray, np.ndarray]:
    """tiny-public's T2w-or-any slices, split by subject: (train, held-out)."""
    from sites.bids import read_site

    data = read_site(tiny_sites / "tiny-public", image_size=64)
    images = data.images.astype(np.float32)
    first_half = data.subject < len(data.subjects) // 2
    return images[first_half], images[~first_half]


def pooled(images: np.ndarray) -> np.ndarray:
    """A stand-in feature: 8 x 8 average-pooled pixels (-> [N, 64])."""
    return images.reshape(len(images), 8, 8, 8, 8).mean((2, 4)).reshape(len(images), -1)


def test_frechet_distance_matches_the_closed_form_for_gaussians() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (200_000, 1))
    b = rng.normal(2.0, 3.0, (200_000, 1))
    # 1-D: (m_a - m_b)^2 + s_a^2 + s_b^2 - 2 s_a s_b = 4 + 1 + 9 - 6 = 8
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fd_of_real_against_real_is_well_below_real_against_noise(split) -> None:
    train, heldout = split
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 1, heldout.shape).astype(np.float32)
    real_real = frechet_distance(pooled(train), pooled(heldout))
    real_noise = frechet_distance(pooled(train), pooled(noise))
    assert real_real * 10 < real_noise


def test_ssim_and_ms_ssim_are_one_for_identical_images_and_low_for_noise(split) -> None:
    train, _ = split
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 1, train[:8].shape)
    assert np.allclose(ssim(train[:8], train[:8]), 1.0) and np.allclose(ms_ssim(train[:8], train[:8]), 1.0)
    assert ms_ssim(train[:8], noise).max() < 0.3


def test_diversity_separates_copies_from_varied_samples(split) -> None:
    train, _ = split
    copies = np.repeat(train[:1], 16, axis=0)
    assert pairwise_ms_ssim(copies) == pytest.approx(1.0)
    assert pairwise_ms_ssim(train) < 0.9


def test_audit_flags_a_generator_that_returns_training_slices(split, tmp_path: Path) -> None:
    train, heldout = split
    rng = np.random.default_rng(0)
    half = len(heldout) // 2
    copier = np.clip(train[rng.integers(0, len(train), 32)] + rng.normal(0, 0.002, (32, 64, 64)), 0, 1)
    honest = heldout[:half]  # real slices never trained on stand in for a generator that does not copy
    audit = memorization_audit(copier, train, heldout[half:])
    assert audit.flagged_fraction > 0.9 and audit.median_to_train < audit.median_to_heldout
    # Expected ~5 % for a perfect non-copier; a few subjects' correlated slices make it noisier.
    assert memorization_audit(honest, train, heldout[half:]).flagged_fraction < 0.3
    png = save_closest_pairs(copier, train, audit, tmp_path / "closest.png")
    assert png.stat().st_size > 1000


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="44 px"):
        ms_ssim(np.zeros((2, 32, 32)), np.zeros((2, 32, 32)))


def test_downstream_utility_rewards_faithful_synthetic_data_and_punishes_mislabelled(tiny_sites: Path) -> None:
    """A perfect 'generator' (more real slices, right labels) helps a 1-shot contrast classifier;
    the same slices with shuffled labels hurt it."""
    from common.metrics import downstream_utility
    from sites.bids import read_site

    data = read_site(tiny_sites / "tiny-a", image_size=64)
    images, labels = data.images.astype(np.float32), data.modality
    train = data.subject < len(data.subjects) - 1
    test = ~train
    rng = np.random.default_rng(0)
    pool = rng.choice(np.nonzero(train)[0], 120, replace=False)
    good = downstream_utility(
        images[train], labels[train], images[pool], labels[pool], images[test], labels[test], classes=5, k=1
    )
    bad = downstream_utility(
        images[train], labels[train], images[pool], rng.permutation(labels[pool]), images[test], labels[test],
        classes=5, k=1,
    )  # fmt: skip
    assert good.real_only == bad.real_only  # the same k-shot draws and seeds
    assert good.with_synthetic > good.real_only + 0.1
    assert bad.with_synthetic < good.with_synthetic - 0.2
    assert good.k == 1 and good.synthetic_per_class >= 24
