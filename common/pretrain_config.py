"""Pretraining's settings, typed once: `fedmri pretrain` takes its defaults from here (no torch, no diffusers)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainConfig:
    vae_steps: int = 1500
    unet_steps: int = 4000
    batch_size: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 3e-4
    kl_weight: float = 1e-4
    ema_decay: float = 0.998
    drop_prob: float = 0.1
    min_snr_gamma: float | None = 5.0
    prediction_type: str = "epsilon"
    max_minutes: float | None = None  # wall-time budget for the UNet phase
    seed: int = 0
    # Domain randomization (common/randomize.py) of every training slice, VAE and UNet phases; the
    # UNet then encodes each randomized batch instead of reusing precomputed latent moments.
    randomize: bool = False
    # Add the source branch (common/source_branch.py) and train it on the public sites' paired
    # contrasts: a subject's other contrasts at the same slice position.
    source_branch: bool = False
