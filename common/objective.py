"""The LDM training loss, top to bottom, and EMA weights."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from torch import nn

from common.conditioning import drop_attributes
from common.mask_branch import NO_MASK
from common.source_branch import SOURCE_DROP, drop_sources


@torch.no_grad()
def encode(
    vae: AutoencoderKL, images: torch.Tensor, scale_factor: float, generator: torch.Generator | None
) -> torch.Tensor:
    """images [B, 1, H, W] in [-1, 1] -> scaled latents [B, 4, H/4, W/4] (a sample of q(z|x))."""
    latents = vae.encode(images).latent_dist.sample(generator)  # -> [B, 4, 16, 16]
    # Rombach et al. 2022, §4.3.2 / App. G: rescale latents to unit variance before diffusion.
    return latents * scale_factor


@torch.no_grad()
def encode_sources(
    vae: AutoencoderKL, images: torch.Tensor, scale_factor: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Source slices [B, 5, 1, H, W] in [-1, 1], NaN where not given (sites/datasets.py) -> scaled
    latents [B, 5, 4, h, w], a sample of q(z|x), NaN where not given (common/source_branch.py).

    Only given slices are encoded, but the sampling noise is drawn for every slot, so how many
    sources one subject has never shifts the random draws of the rows after it."""
    flat = images.flatten(0, 1)  # -> [B·5, 1, H, W]
    given = ~torch.isnan(flat).flatten(1).any(1)  # -> [B·5]
    size = images.shape[-1] // 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (len(flat), vae.config.latent_channels, size, size)
    noise = torch.randn(shape, generator=generator, device=images.device)  # -> [B·5, 4, h, w]
    latents = torch.full(shape, float("nan"), device=images.device)
    if given.any():
        posterior = vae.encode(flat[given]).latent_dist
        latents[given] = (posterior.mean + posterior.std * noise[given]) * scale_factor
    return latents.unflatten(0, images.shape[:2])  # -> [B, 5, 4, h, w]


def drop_masks(masks: torch.Tensor, drop_prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each row's mask replaced by 'not given' (NO_MASK) with probability drop_prob. -> [B, H, W]"""
    dropped = torch.rand(len(masks), generator=generator, device=masks.device) < drop_prob  # -> [B]
    return torch.where(dropped[:, None, None], torch.full_like(masks, NO_MASK), masks)


def min_snr_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 9): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1.0 - alphas)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1.0) if scheduler.config.prediction_type == "v_prediction" else clipped / snr


def ldm_loss(
    denoiser: nn.Module,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    conditions: torch.Tensor,
    generator: torch.Generator | None = None,
    drop_prob: float = 0.1,
    min_snr_gamma: float | None = None,
    masks: torch.Tensor | None = None,
    sources: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean denoising loss of a batch of scaled latents [B, 4, h, w] and conditions [B, 7], with
    lesion masks [B, H, W] for a denoiser with the mask branch (common/mask_branch.py) and source
    latents [B, 5, 4, h, w] for one with the source branch (common/source_branch.py).

    `denoiser` is the plain module or its Opacus wrapper: this function reads the same either way.
    """
    batch = latents.shape[0]
    # Noise and timestep: t ~ U{0..T-1}, ε ~ N(0, I) (Ho et al. 2020, Alg. 1).
    # Drawn on the latents' device: a GPU run needs `generator` on that device too.
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)  # -> [B, 4, h, w]
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=latents.device
    )  # -> [B]
    # Forward process: z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε (Ho et al. 2020, eq. 4).
    noisy = scheduler.add_noise(latents, noise, timesteps)  # -> [B, 4, h, w]
    # Condition: drop attribute groups at random for classifier-free guidance (Ho & Salimans 2022).
    conditions = drop_attributes(conditions, drop_prob, generator)  # -> [B, 7]
    # Predict, following the mask and the subject's other contrasts where given. Both are dropped
    # like attribute groups (the sources slot by slot), so the same model still generates from noise.
    extra: dict[str, torch.Tensor] = {}
    if masks is not None:
        extra["masks"] = drop_masks(masks, drop_prob, generator)  # -> [B, H, W]
    if sources is not None:
        extra["sources"] = drop_sources(sources, SOURCE_DROP, generator)  # -> [B, 5, 4, h, w]
    prediction = denoiser(noisy, timesteps, conditions, **extra)  # -> [B, 4, h, w]
    # Target: ε (Ho et al. 2020, eq. 14) or v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) z_0 (Salimans & Ho 2022, §4).
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    # MSE per sample, optionally min-SNR-γ weighted, then the batch mean.
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))  # -> [B]
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(scheduler, timesteps, min_snr_gamma)
    return per_sample.mean()


M = TypeVar("M", bound=nn.Module)


class EMA:
    """Exponential moving average of a module's trainable parameters (Polyak averaging)."""

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach(), 1.0 - self.decay)

    def copy_to(self, module: M) -> M:
        """A copy of `module` carrying the averaged weights."""
        averaged = copy.deepcopy(module)
        params = dict(averaged.named_parameters())
        with torch.no_grad():
            for name, value in self.shadow.items():
                params[name].copy_(value)
        return averaged
