"""Sampling with classifier-free guidance: DPM-Solver++ (fast) or DDPM (baseline)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from common.conditioning import unconditional
from common.mask_branch import no_masks
from common.model import LDM
from common.source_branch import no_sources

SAMPLERS = ("dpm++", "ddpm")


def make_scheduler(ldm: LDM, sampler: str) -> DDPMScheduler | DPMSolverMultistepScheduler:
    """The inference scheduler for `sampler`, sharing the training noise schedule."""
    if sampler == "dpm++":  # DPM-Solver++(2M) (Lu et al. 2022b)
        return DPMSolverMultistepScheduler.from_config(
            ldm.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
        )
    if sampler == "ddpm":  # ancestral sampling (Ho et al. 2020, Alg. 2)
        return DDPMScheduler.from_config(ldm.scheduler.config)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")


@torch.no_grad()
def sample(
    ldm: LDM,
    conditions: torch.Tensor,
    steps: int = 25,
    guidance_scale: float = 3.0,
    sampler: str = "dpm++",
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    masks: torch.Tensor | None = None,
    sources: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate one image per row of `conditions` [N, 7], following `masks` [N, H, W] (lesion
    labels, common/mask_branch.py) and `sources` [N, 5, 4, h, w] (a subject's other contrasts,
    scaled latents, NaN where not given: common/source_branch.py) when given. Returns [N, 1, H, W]
    in [0, 1].

    Guided prediction: ε̂ = ε(∅) + w (ε(c) − ε(∅)) (Ho & Salimans 2022, eq. 6). The mask and the
    sources belong to c: ∅ has no attributes, mask or sources, so guidance strengthens them all. The same seed gives
    the same images on the same device. Runs where the model is; the images come back on the CPU.
    """
    device = next(ldm.denoiser.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ldm.denoiser.eval()
    ldm.vae.eval()
    size = ldm.latent_size
    channels = ldm.vae.config.latent_channels
    noise = torch.randn(len(conditions), channels, size, size, generator=generator, device=device)  # -> [N, 4, 16, 16]
    outputs = []
    done = 0
    for start in range(0, len(conditions), batch_size):
        cond = conditions[start : start + batch_size].to(device)
        scheduler = make_scheduler(ldm, sampler)
        scheduler.set_timesteps(
            steps if sampler == "dpm++" else min(steps, ldm.scheduler.config.num_train_timesteps), device=device
        )
        latents = noise[start : start + batch_size] * scheduler.init_noise_sigma
        both = torch.cat([unconditional(len(cond), device), cond])  # -> [2b, 7]
        extra: dict[str, torch.Tensor] = {}
        if masks is not None:
            given = masks[start : start + batch_size].to(device)  # -> [b, H, W]
            extra["masks"] = torch.cat([no_masks(len(given), given.shape[-1], device), given])  # -> [2b, H, W]
        if sources is not None:
            chosen = sources[start : start + batch_size].to(device)  # -> [b, 5, 4, h, w]
            extra["sources"] = torch.cat([no_sources(len(chosen), channels, size, device), chosen])  # -> [2b, ...]
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            prediction = ldm.denoiser(model_input, t.expand(len(both)), both, **extra)  # -> [2b, 4, 16, 16]
            uncond, cond_pred = prediction.chunk(2)
            guided = uncond + guidance_scale * (cond_pred - uncond)
            latents = scheduler.step(guided, t, latents, generator=generator).prev_sample
        images = ldm.vae.decode(latents / ldm.settings.scale_factor).sample  # -> [b, 1, 64, 64]
        outputs.append(((images.clamp(-1, 1) + 1) / 2).cpu())
        done += len(cond)
        if progress:
            progress(done, len(conditions))
    return torch.cat(outputs)
