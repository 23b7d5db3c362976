"""Domain randomization of slices, in the spirit of SynthSeg (Billot et al. 2023, §3.2): train on
images whose look varies far more than any scanner's, so that a network reads what does not vary.

What varies here: the intensity curve, gamma, a smooth bias field, noise, blur and resolution,
the skull (present or stripped), and the crop (scale, shift, rotation). What does not: the
order of tissue intensities within a contrast, which is what tells T1w from T2w from FLAIR.
SynthSeg draws every tissue class's intensity independently; fedmri cannot, because its
classifier must read the contrast that such draws would erase, and its slices carry no tissue
labels. A random *monotone* intensity curve is the stand-in: it moves every tissue's grey
level but keeps their order.

Used by the evaluator's training (`fedmri train-evaluator --randomize`) and offered to base
pretraining (`fedmri pretrain --randomize`). All draws come from `generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Randomization:
    """Ranges of each draw. Every transform is applied with its own probability `p`."""

    p: float = 0.8
    knots: int = 5  # monotone intensity curve: control points on [0, 1]
    gamma: float = 0.5  # log-gamma ~ U(-gamma, gamma)
    bias: float = 0.5  # peak amplitude of the log bias field
    noise: float = 0.06  # std of Gaussian noise, before taking the magnitude (Rician)
    blur: float = 1.2  # Gaussian blur sigma in px, up to
    low_res: float = 3.0  # downsample factor per axis, up to
    strip_px: tuple[int, int] = (3, 6)  # erosion radius when stripping the skull, px
    scale: float = 0.15  # zoom ~ U(1 - scale, 1 + scale)
    shift_px: float = 6.0
    rotate_deg: float = 12.0


def _u(shape: tuple[int, ...], lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator) * (hi - lo) + lo


def _apply(mask: torch.Tensor, changed: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[:, None, None, None], changed, images)


def monotone_curve(images: torch.Tensor, knots: int, generator: torch.Generator) -> torch.Tensor:
    """A random increasing piecewise-linear map of [0, 1] onto [0, 1], one per image."""
    b = len(images)
    steps = _u((b, knots), 0.2, 1.0, generator)  # positive increments -> increasing
    ys = torch.cat([torch.zeros(b, 1), steps.cumsum(1)], 1)
    ys = ys / ys[:, -1:]  # -> [B, knots + 1] from 0 to 1
    x = images.clamp(0, 1) * knots  # -> [B, 1, H, W] in knot units
    i = x.floor().clamp(max=knots - 1).long()
    frac = x - i
    lo = torch.gather(ys, 1, i.flatten(1)).view_as(x)
    hi = torch.gather(ys, 1, (i + 1).flatten(1)).view_as(x)
    return lo + frac * (hi - lo)


def bias_field(shape: torch.Size, amplitude: float, generator: torch.Generator) -> torch.Tensor:
    """exp of a smooth random field: a 4x4 grid of U(-a, a), upsampled bicubically. -> [B, 1, H, W]"""
    coarse = _u((shape[0], 1, 4, 4), -amplitude, amplitude, generator)
    return torch.exp(F.interpolate(coarse, size=shape[-2:], mode="bicubic", align_corners=True))


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma [B] in px (sigma 0 leaves the image)."""
    radius = 4
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # -> [B, 9]
    b = images.shape[0]
    x = images.transpose(0, 1)  # -> [1, B, H, W]: one group per image
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=b)
    return x.transpose(0, 1)


def strip_skull(images: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Zero everything outside the head mask eroded by `radius` px [B]: the skull and scalp go."""
    head = (images > 0.05).float()
    out = torch.empty_like(images)
    for r in radius.unique():  # erosion = 1 - dilation of the background
        rows = radius == r
        k = 2 * int(r) + 1
        eroded = 1 - F.max_pool2d(1 - head[rows], k, stride=1, padding=int(r))
        out[rows] = images[rows] * eroded
    return out


def crop(images: torch.Tensor, cfg: Randomization, generator: torch.Generator) -> torch.Tensor:
    """Random zoom, shift and in-plane rotation (bilinear; outside the slice is 0)."""
    b, _, h, _ = images.shape
    angle = _u((b,), -cfg.rotate_deg, cfg.rotate_deg, generator) * math.pi / 180
    zoom = _u((b,), 1 - cfg.scale, 1 + cfg.scale, generator)
    shift = _u((b, 2), -cfg.shift_px, cfg.shift_px, generator) * 2 / h
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # -> [B, H, W, 2]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def randomize(images: torch.Tensor, generator: torch.Generator, cfg: Randomization = Randomization()) -> torch.Tensor:
    """[B, 1, H, W] in [0, 1] -> the same shape in [0, 1], each image with its own random look."""
    b, _, h, w = images.shape

    def chosen() -> torch.Tensor:
        return torch.rand(b, generator=generator) < cfg.p

    images = _apply(chosen(), strip_skull(images, torch.randint(*cfg.strip_px, (b,), generator=generator)), images)
    images = _apply(chosen(), crop(images, cfg, generator), images)
    images = _apply(chosen(), monotone_curve(images, cfg.knots, generator), images)
    gamma = torch.exp(_u((b, 1, 1, 1), -cfg.gamma, cfg.gamma, generator))
    images = _apply(chosen(), images.clamp(0, 1) ** gamma, images)
    images = _apply(chosen(), images * bias_field(images.shape, cfg.bias, generator), images)
    factor = _u((2,), 1.0, cfg.low_res, generator)  # one low resolution per batch, both axes
    small = F.interpolate(images, size=(max(8, int(h / factor[0])), max(8, int(w / factor[1]))), mode="area")
    images = _apply(chosen(), F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False), images)
    images = _apply(chosen(), gaussian_blur(images, _u((b,), 0.0, cfg.blur, generator)), images)
    std = _u((b, 1, 1, 1), 0.0, cfg.noise, generator)
    real = images + std * torch.randn(images.shape, generator=generator)
    imaginary = std * torch.randn(images.shape, generator=generator)
    images = _apply(chosen(), torch.sqrt(real**2 + imaginary**2), images)  # Rician magnitude
    peak = torch.quantile(images.flatten(1), 0.995, dim=1).clamp(min=1e-3)[:, None, None, None]
    return (images / peak).clamp(0, 1)  # as the reader normalises: by the 99.5th percentile
