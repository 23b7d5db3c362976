"""Pretrain the base LDM on public slices: the VAE first, then the UNet and condition encoder."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from common.atomic import sha256_file
from common.device import describe
from common.model import LDM, ModelSpec, build_ldm, load_ldm, save_ldm
from common.objective import EMA, encode, ldm_loss
from common.pretrain_config import PretrainConfig
from common.randomize import randomize
from common.source_branch import add_source_branch, has_source_branch


@dataclass(frozen=True)
class SliceTable:
    """Public training slices: images [N, 1, H, W] in [-1, 1], conditions [N, 7], and for each
    slice the rows of its subject's other contrasts at its position, -1 where none [N, 5]
    (sites/datasets.source_rows; used by a model with the source branch)."""

    images: torch.Tensor
    conditions: torch.Tensor
    sources: torch.Tensor | None = None


Progress = Callable[[str, int, int, float], None]  # (phase, step, total, loss)


def train_vae(ldm: LDM, data: SliceTable, cfg: PretrainConfig, progress: Progress | None = None) -> None:
    """L1 reconstruction + β·KL (Kingma & Welling 2014; Rombach et al. 2022 §3 use a small β)."""
    generator = torch.Generator(device=ldm.device).manual_seed(cfg.seed)
    vae = ldm.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, cfg.vae_steps))
    for step in range(cfg.vae_steps):
        idx = torch.randint(len(data.images), (cfg.batch_size,), generator=generator, device=ldm.device)
        images = data.images[idx]  # -> [B, 1, 64, 64]
        if cfg.randomize:
            images = _randomized(images, generator)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = (reconstruction - images).abs().mean() + cfg.kl_weight * posterior.kl().mean() / images[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress:
            progress("vae", step + 1, cfg.vae_steps, loss.item())
    vae.eval()


@torch.no_grad()
def latent_moments(ldm: LDM, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N, 4, h, w] of every image (unscaled)."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = ldm.vae.encode(images[start : start + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def scale_factor(means: torch.Tensor, stds: torch.Tensor) -> float:
    """1 / std of latent samples, so diffused latents have unit variance (Rombach et al. 2022, §4.3.2)."""
    generator = torch.Generator().manual_seed(0)
    means, stds = means.cpu(), stds.cpu()  # the same factor whichever device trained the VAE
    sample = means + stds * torch.randn(means.shape, generator=generator)
    return float(1.0 / sample.flatten().std())


def _randomized(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, 1, H, W] in [-1, 1] -> randomized, same range (the draws on the CPU, whatever the device)."""
    cpu = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
    return randomize((images.cpu() + 1) / 2, cpu).to(images.device) * 2 - 1


def _source_latents(
    rows: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """Source rows [B, 5] (-1 = none) -> a posterior sample of each source's scaled latents,
    NaN where none (common/source_branch.py). -> [B, 5, 4, h, w]"""
    picked = rows.clamp(min=0)  # -> [B, 5]
    sample = means[picked] + stds[picked] * torch.randn(means[picked].shape, generator=generator, device=means.device)
    return torch.where((rows >= 0)[:, :, None, None, None], sample * scale, float("nan"))


def train_unet(
    ldm: LDM,
    means: torch.Tensor,
    stds: torch.Tensor,
    conditions: torch.Tensor,
    cfg: PretrainConfig,
    progress: Progress | None = None,
    images: torch.Tensor | None = None,
    sources: torch.Tensor | None = None,
) -> int:
    """Train UNet + condition encoder with EMA; the EMA weights replace the live ones. Returns steps done.
    A UNet with the source branch learns from `sources` (SliceTable.sources), which it then needs."""
    with_sources = has_source_branch(ldm.denoiser.unet)
    if with_sources and sources is None:
        raise ValueError("a UNet with the source branch trains on paired slices: SliceTable.sources is missing")
    if with_sources and cfg.randomize:
        raise ValueError(
            "domain randomization draws each slice's look on its own, which breaks the pairing of a subject's "
            "contrasts that the source branch learns from: pretrain the source branch without --randomize"
        )
    generator = torch.Generator(device=ldm.device).manual_seed(cfg.seed + 1)
    denoiser = ldm.denoiser.train()
    ema = EMA(denoiser, cfg.ema_decay)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 200))
    deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else None
    step = 0
    for step in range(1, cfg.unet_steps + 1):
        idx = torch.randint(len(means), (cfg.batch_size,), generator=generator, device=ldm.device)
        if cfg.randomize and images is not None:  # encode this step's randomized slices
            latents = encode(ldm.vae, _randomized(images[idx], generator), ldm.settings.scale_factor, generator)
        else:
            latents = (
                means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator, device=ldm.device)
            ) * ldm.settings.scale_factor  # -> [B, 4, 16, 16]
        source_latents = None
        if with_sources and sources is not None:  # -> [B, 5, 4, 16, 16], NaN where none
            source_latents = _source_latents(sources[idx], means, stds, ldm.settings.scale_factor, generator)
        loss = ldm_loss(
            denoiser, ldm.scheduler, latents, conditions[idx], generator, cfg.drop_prob, cfg.min_snr_gamma,
            sources=source_latents,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        ema.update(denoiser)
        if progress:
            progress("unet", step, cfg.unet_steps, loss.item())
        if deadline and time.monotonic() > deadline:
            break
    ldm.denoiser = ema.copy_to(denoiser).eval()
    return step


def pretrain(
    data: SliceTable,
    out: Path,
    cfg: PretrainConfig,
    spec: ModelSpec = ModelSpec(),
    data_summary: dict | None = None,
    command: str = "",
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    device: torch.device = torch.device("cpu"),
    base: Path | None = None,
) -> LDM:
    """Train a base LDM on `data`, on `device`, and save it with a provenance file: from scratch,
    or, from `base`, its UNet phase only (the VAE and latent scale kept), adding the source
    branch first when cfg.source_branch asks for it (common/source_branch.py)."""
    start = time.time()
    torch.manual_seed(cfg.seed)
    sources = None if data.sources is None else data.sources.to(device)
    data = SliceTable(data.images.to(device), data.conditions.to(device), sources)
    if base is None:
        ldm = build_ldm(replace(spec, image_size=data.images.shape[-1]), cfg.prediction_type, seed=cfg.seed).to(device)
        train_vae(ldm, data, cfg, progress)
    else:
        ldm = load_ldm(base).to(device)
        if ldm.settings.image_size != data.images.shape[-1]:
            raise ValueError(
                f"{base}: a {ldm.settings.image_size} px model cannot train on {data.images.shape[-1]} px slices"
            )
    if cfg.source_branch and not has_source_branch(ldm.denoiser.unet):
        add_source_branch(ldm.denoiser.unet)
    means, stds = latent_moments(ldm, data.images)
    if base is None:
        ldm.settings = replace(ldm.settings, scale_factor=scale_factor(means, stds))
    unet_steps = train_unet(ldm, means, stds, data.conditions, cfg, progress, data.images, data.sources)
    files = save_ldm(ldm.to(torch.device("cpu")), out, dtype)
    provenance = {
        "command": command or " ".join(sys.argv),
        "config": asdict(cfg),
        "model_spec": asdict(spec) if base is None else json.loads((out / "unet" / "config.json").read_text()),
        "base": None if base is None else _base_record(Path(base)),
        "seed": cfg.seed,
        "data": data_summary or {"slices": len(data.images)},
        "steps": {"vae": 0 if base is not None else cfg.vae_steps, "unet": unet_steps},
        "scale_factor": ldm.settings.scale_factor,
        "dtype": str(dtype).removeprefix("torch."),
        "wall_time_s": round(time.time() - start, 1),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "device": describe(device),
        },
        "files": {str(p.relative_to(out)): sha256_file(p) for p in files},
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return ldm


def _base_record(base: Path) -> dict:
    """What a continued model started from: its path and the sha256 of its files."""
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.name != "provenance.json")
    return {"path": str(base), "files": {str(p.relative_to(base)): sha256_file(p) for p in files}}


def slice_table(images: np.ndarray, conditions: np.ndarray, sources: np.ndarray | None = None) -> SliceTable:
    """float16 [N, H, W] in [0, 1], [N, 7] and source rows [N, 5] -> SliceTable in [-1, 1]."""
    return SliceTable(
        torch.from_numpy(images.astype(np.float32)).unsqueeze(1) * 2.0 - 1.0,
        torch.from_numpy(conditions.astype(np.float32)),
        None if sources is None else torch.from_numpy(sources.astype(np.int64)),
    )
