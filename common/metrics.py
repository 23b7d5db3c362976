"""Evaluation metrics that a site computes on its own held-out subjects; only aggregates leave.

Pure functions of arrays: images are [N, H, W] in [0, 1]; features are [N, D]. Nothing here
downloads weights. (The feature network and condition classifiers are a separate concern.)

- Fréchet distance between two Gaussians fitted to features (Dowson & Landau 1982; used as FID by
  Heusel et al. 2017, §3): |μ_a − μ_b|² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½).
- SSIM with an 11-tap Gaussian window, σ = 1.5 (Wang et al. 2004, §III-C), and MS-SSIM over
  3 scales for 64 × 64 slices, with the first three of Wang et al. 2003's exponents renormalized.
  Diversity is the mean MS-SSIM over pairs of samples of one condition: lower is more diverse.
- Memorization audit: each generated sample's nearest-neighbour (L2) distance to the site's
  training slices, against τ = the 5th percentile of held-out slices' own nearest-neighbour
  distances to the training slices. A sample closer than τ is flagged: it sits nearer to a
  training slice than 95 % of real, never-trained-on slices do.
- PSNR of each pair, data range 1: 10 log10(1 / MSE), over the whole slice like SSIM. The copy
  baseline of missing-sequence synthesis maps a source slice onto the real target's intensity
  histogram (quantile matching, within the head): a monotone map, so it cannot invert a contrast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)  # Wang et al. 2003, first three of five scales


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: regularize, as in Heusel et al.'s code
        eps = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def _window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # -> [1, 1, 11, 11]


def _ssim_parts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and mean contrast-structure term, for a, b [N, 1, H, W] in [0, 1]."""
    c1, c2 = 0.01**2, 0.03**2  # K1, K2 of Wang et al. 2004 with data range 1
    w = _window().to(a)
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return (luminance * cs).mean((1, 2, 3)), cs.mean((1, 2, 3))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of each pair (a[i], b[i]); images [N, H, W] in [0, 1]."""
    ta, tb = (torch.as_tensor(x, dtype=torch.float64)[:, None] for x in (a, b))
    return _ssim_parts(ta, tb)[0].numpy()


def ms_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3-scale MS-SSIM of each pair (a[i], b[i]); images [N, H, W] in [0, 1], at least 44 px."""
    ta, tb = (torch.as_tensor(x, dtype=torch.float64)[:, None] for x in (a, b))
    if min(ta.shape[-2:]) < 11 * 4:
        raise ValueError(f"MS-SSIM over 3 scales needs images of at least 44 px, got {tuple(ta.shape[-2:])}")
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64)
    weights = weights / weights.sum()
    value = torch.ones(len(ta), dtype=torch.float64)
    for scale, weight in enumerate(weights):
        full, cs = _ssim_parts(ta, tb)
        term = full if scale == len(weights) - 1 else cs
        value = value * term.clamp(min=1e-6) ** weight
        ta, tb = F.avg_pool2d(ta, 2), F.avg_pool2d(tb, 2)
    return value.numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR (dB, data range 1) of each pair (a[i], b[i]); images [N, H, W] in [0, 1]."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean((1, 2))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def match_intensities(source: np.ndarray, target: np.ndarray, head: float = 0.05) -> np.ndarray:
    """Each source slice mapped onto its target slice's intensity histogram, within the head (both
    above `head`): the source's k-th quantile there becomes the target's; background stays 0.
    images [N, H, W] in [0, 1] -> [N, H, W]"""
    out = np.zeros_like(source, dtype=np.float32)
    levels = np.linspace(0, 1, 101)
    for i, (s, t) in enumerate(zip(source, target, strict=True)):
        inside = s > head
        if not inside.any() or not (t > head).any():
            continue
        ranks = np.interp(s[inside], np.quantile(s[inside], levels), levels)  # -> quantile of each source pixel
        out[i][inside] = np.quantile(t[t > head], ranks)
    return out


def pairwise_ms_ssim(images: np.ndarray, pairs: int = 64, seed: int = 0) -> float:
    """Mean MS-SSIM over random distinct pairs of `images`: the diversity score (lower = more diverse)."""
    if len(images) < 2:
        raise ValueError("need at least 2 images for pairs")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(images), pairs)
    j = (i + rng.integers(1, len(images), pairs)) % len(images)  # never i itself
    return float(ms_ssim(images[i], images[j]).mean())


def _nearest(queries: np.ndarray, pool: np.ndarray, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    q = torch.as_tensor(queries.reshape(len(queries), -1), dtype=torch.float32)
    p = torch.as_tensor(pool.reshape(len(pool), -1), dtype=torch.float32)
    d = torch.cdist(q, p)  # -> [Q, P]
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    distance, index = d.min(1)
    return distance.numpy(), index.numpy()


@dataclass(frozen=True)
class Audit:
    """Aggregates that may leave the site; `closest` (indices) stays with the site's PNG."""

    flagged_fraction: float  # generated samples nearer a training slice than τ
    threshold: float  # τ: 5th percentile of held-out → train nearest-neighbour distances
    median_to_train: float
    median_to_heldout: float
    closest: list[tuple[int, int, float]]  # (generated index, train index, distance), nearest first


def memorization_audit(
    generated: np.ndarray, train: np.ndarray, heldout: np.ndarray, percentile: float = 5.0, keep: int = 8
) -> Audit:
    """Flag generated slices closer to a training slice than held-out real slices ever get."""
    heldout_to_train, _ = _nearest(heldout, train)
    threshold = float(np.percentile(heldout_to_train, percentile))
    to_train, train_index = _nearest(generated, train)
    to_heldout, _ = _nearest(generated, heldout)
    order = np.argsort(to_train)[:keep]
    return Audit(
        flagged_fraction=float((to_train < threshold).mean()),
        threshold=threshold,
        median_to_train=float(np.median(to_train)),
        median_to_heldout=float(np.median(to_heldout)),
        closest=[(int(g), int(train_index[g]), float(to_train[g])) for g in order],
    )


def save_closest_pairs(generated: np.ndarray, train: np.ndarray, audit: Audit, path: Path) -> Path:
    """Side-by-side PNG of the closest (generated, training) pairs. It shows patient slices: keep it at the site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(audit.closest))
    fig, axes = plt.subplots(rows, 2, figsize=(3.2, 1.6 * rows), squeeze=False)
    for row, (g, t, distance) in enumerate(audit.closest):
        for col, (image, label) in enumerate(((generated[g], f"generated {g}"), (train[t], f"train {t}"))):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}" + (f"  d={distance:.2f}" if col == 0 else ""), fontsize=6)
    fig.suptitle(f"closest pairs; τ = {audit.threshold:.2f}, flagged {audit.flagged_fraction:.0%}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def adherence(predicted: np.ndarray, requested: np.ndarray) -> float:
    """Fraction of samples whose classifier prediction equals the condition they were generated for."""
    if len(predicted) != len(requested) or len(predicted) == 0:
        raise ValueError(f"need equal, non-empty label arrays, got {len(predicted)} and {len(requested)}")
    return float((np.asarray(predicted) == np.asarray(requested)).mean())


def _few_shot_classifier(classes: int) -> torch.nn.Module:
    """A deliberately small CNN trained from scratch on 32 x 32 slices (no pretrained features)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> [B, 8, 16, 16]
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> [B, 16, 8, 8]
        nn.Flatten(), nn.Linear(16 * 8 * 8, classes),
    )  # fmt: skip


def few_shot_accuracy(
    x: np.ndarray, y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, classes: int, seed: int, steps: int = 150
) -> float:
    """Train the small CNN on (x [N, H, W], y [N]) and return its accuracy on (test_x, test_y)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    def prepare(images: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(images, dtype=np.float32)).unsqueeze(1)
        return F.interpolate(t, size=(32, 32), mode="area")  # -> [N, 1, 32, 32]

    inputs, targets = prepare(x), torch.as_tensor(np.asarray(y, dtype=np.int64))
    model = _few_shot_classifier(classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        rows = torch.randint(len(inputs), (min(32, len(inputs)),), generator=generator)
        batch = inputs[rows]
        batch = torch.where(torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5, batch.flip(-1), batch)
        loss = F.cross_entropy(model(batch), targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = model.eval()(prepare(test_x)).argmax(1).numpy()
    return float((predicted == np.asarray(test_y)).mean())


@dataclass(frozen=True)
class Utility:
    """Held-out accuracy of a few-shot classifier, with and without synthetic training data."""

    k: int  # real examples per class
    synthetic_per_class: int
    real_only: float  # mean over repeats
    with_synthetic: float

    @property
    def gain(self) -> float:
        return self.with_synthetic - self.real_only


def downstream_utility(
    real_x: np.ndarray,
    real_y: np.ndarray,
    synthetic_x: np.ndarray,
    synthetic_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    classes: int,
    k: int = 3,
    repeats: int = 3,
    seed: int = 0,
) -> Utility:
    """k real examples per class alone vs. plus every synthetic example, as in the text-prompted
    MRI study (contrast classification with and without synthetic slices). Each repeat draws a
    new k-shot set; the same draw and seed serve both arms, so only the synthetic data differ.
    """
    rng = np.random.default_rng(seed)
    real_only, with_synthetic = [], []
    present = np.unique(real_y)
    for r in range(repeats):
        rows = np.concatenate(
            [rng.choice(np.nonzero(real_y == c)[0], min(k, int((real_y == c).sum())), replace=False) for c in present]
        )
        x, y = real_x[rows], real_y[rows]
        real_only.append(few_shot_accuracy(x, y, test_x, test_y, classes, seed + r))
        mixed_x, mixed_y = np.concatenate([x, synthetic_x]), np.concatenate([y, synthetic_y])
        with_synthetic.append(few_shot_accuracy(mixed_x, mixed_y, test_x, test_y, classes, seed + r))
    per_class = int(np.bincount(np.asarray(synthetic_y, dtype=np.int64)).max()) if len(synthetic_y) else 0
    return Utility(k, per_class, float(np.mean(real_only)), float(np.mean(with_synthetic)))
