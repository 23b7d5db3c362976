"""The conditional LDM: a 1-channel AutoencoderKL, a cross-attention UNet and the condition encoder."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

from common.branches import branches
from common.conditioning import ConditionEncoder
from common.mask_branch import mask_channels, no_masks
from common.source_branch import no_sources, source_channels

FEDMRI_JSON = "fedmri.json"  # model-level settings that no diffusers component holds


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a fedmri LDM. Defaults: 64x64 slices -> 4x16x16 latents, a ~6.6M-parameter UNet."""

    image_size: int = 64
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels: downsampling by 4
    unet_channels: tuple[int, ...] = (64, 128, 128)
    condition_dim: int = 64
    attention_head_dim: int = 8
    norm_groups: int = 16


@dataclass(frozen=True)
class ModelSettings:
    """Saved to fedmri.json beside the diffusers components."""

    image_size: int
    scale_factor: float  # latents are multiplied by this (Rombach et al. 2022, §4.3.2 and App. G)
    prediction_type: str  # "epsilon" or "v_prediction"
    fov_mm: float = 220.0


class Denoiser(nn.Module):
    """The trainable part: UNet plus condition encoder, one module so that Opacus wraps it whole."""

    def __init__(self, unet: UNet2DConditionModel, encoder: ConditionEncoder) -> None:
        super().__init__()
        self.unet = unet
        self.encoder = encoder

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditions: torch.Tensor,
        masks: torch.Tensor | None = None,
        sources: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`masks` [B, H, W] (common/mask_branch.py) and `sources` [B, 5, 4, h, w] (common/source_branch.py)
        only for a UNet with that branch, which reads 'none given' when they are None."""
        tokens = self.encoder(conditions)  # -> [B, 5, D]
        has = branches(self.unet)
        batch, channels, size = len(noisy_latents), noisy_latents.shape[1], noisy_latents.shape[-1]
        parts = [noisy_latents]  # -> [B, 4, h, w]; the layout of common/branches.py
        if has.mask:
            if masks is None:
                masks = no_masks(batch, size, noisy_latents.device)
            parts.append(mask_channels(masks.to(noisy_latents.device), size).to(noisy_latents.dtype))  # -> [B, 4, h, w]
        elif masks is not None:
            raise ValueError("this model has no mask branch (common/mask_branch.py): it cannot follow a lesion mask")
        if has.sources:
            if sources is None:
                sources = no_sources(batch, channels, size, noisy_latents.device)
            parts.append(source_channels(sources.to(noisy_latents.device)).to(noisy_latents.dtype))  # -> [B, 25, h, w]
        elif sources is not None:
            raise ValueError(
                "this model has no source branch (common/source_branch.py): it cannot translate from acquired scans"
            )
        model_input = torch.cat(parts, dim=1)  # -> [B, 4 (+4) (+25), h, w]
        return self.unet(model_input, timesteps, encoder_hidden_states=tokens).sample  # -> [B, 4, h, w]


@dataclass
class LDM:
    vae: AutoencoderKL
    denoiser: Denoiser
    scheduler: DDPMScheduler
    settings: ModelSettings

    def to(self, device: torch.device) -> LDM:
        """Move the VAE and the denoiser to `device`, in place."""
        self.vae.to(device)
        self.denoiser.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def latent_size(self) -> int:
        return self.settings.image_size // 2 ** (len(self.vae.config.block_out_channels) - 1)


def build_vae(spec: ModelSpec) -> AutoencoderKL:
    levels = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=spec.vae_channels,
        latent_channels=spec.latent_channels,
        layers_per_block=1,
        norm_num_groups=spec.norm_groups,
        sample_size=spec.image_size,
    )


def build_unet(spec: ModelSpec) -> UNet2DConditionModel:
    levels = len(spec.unet_channels)
    return UNet2DConditionModel(
        sample_size=spec.image_size // 2 ** (len(spec.vae_channels) - 1),
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        layers_per_block=1,
        block_out_channels=spec.unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=spec.condition_dim,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_groups,
    )


def build_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """1000-step DDPM with the scaled-linear betas of Stable Diffusion (Rombach et al. 2022)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False,
    )  # fmt: skip


def build_ldm(spec: ModelSpec = ModelSpec(), prediction_type: str = "epsilon", seed: int = 0) -> LDM:
    """A freshly initialised LDM (scale factor 1 until computed from data)."""
    torch.manual_seed(seed)
    denoiser = Denoiser(build_unet(spec), ConditionEncoder(dim=spec.condition_dim))
    settings = ModelSettings(image_size=spec.image_size, scale_factor=1.0, prediction_type=prediction_type)
    return LDM(build_vae(spec), denoiser, build_scheduler(prediction_type), settings)


def save_ldm(ldm: LDM, out: Path, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write a diffusers-format directory (safetensors only); return the files written.

    out/vae, out/unet and out/condition_encoder each load with their class's
    `from_pretrained(out, subfolder=...)`; out/scheduler with DDPMScheduler.from_pretrained.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name, module in (("vae", ldm.vae), ("unet", ldm.denoiser.unet), ("condition_encoder", ldm.denoiser.encoder)):
        original = next(module.parameters()).dtype
        module.to(dtype).save_pretrained(out / name, safe_serialization=True)
        module.to(original)
    ldm.scheduler.save_pretrained(out / "scheduler")
    (out / FEDMRI_JSON).write_text(json.dumps(asdict(ldm.settings), indent=2))
    return sorted(p for p in out.rglob("*") if p.is_file())


def load_ldm(path: Path) -> LDM:
    """Load a directory written by save_ldm, in float32."""
    path = Path(path)
    settings_path = path / FEDMRI_JSON
    if not settings_path.exists():
        raise FileNotFoundError(
            f"{settings_path}: missing; {path} is not a fedmri model directory (see load_foreign_base)"
        )
    settings = ModelSettings(**json.loads(settings_path.read_text()))
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
    encoder = ConditionEncoder.from_pretrained(path, subfolder="condition_encoder", torch_dtype=torch.float32)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    return LDM(vae.eval(), Denoiser(unet, encoder), scheduler, settings)


def model_configs(path: Path) -> dict[str, str]:
    """The JSON files of a model directory (architecture, scheduler, settings): {relative path: text}."""
    path = Path(path)
    names = ("vae/config.json", "unet/config.json", "condition_encoder/config.json",
             "scheduler/scheduler_config.json", FEDMRI_JSON)  # fmt: skip
    return {name: (path / name).read_text() for name in names}


def ldm_from_parts(
    configs: dict[str, str], vae_state: dict[str, torch.Tensor], denoiser_state: dict[str, torch.Tensor]
) -> LDM:
    """Rebuild an LDM from model_configs() and state dicts (e.g. sent in a Flower message); strict load."""
    vae = AutoencoderKL.from_config(json.loads(configs["vae/config.json"]))
    unet = UNet2DConditionModel.from_config(json.loads(configs["unet/config.json"]))
    encoder = ConditionEncoder.from_config(json.loads(configs["condition_encoder/config.json"]))
    scheduler = DDPMScheduler.from_config(json.loads(configs["scheduler/scheduler_config.json"]))
    settings = ModelSettings(**json.loads(configs[FEDMRI_JSON]))
    vae.load_state_dict(vae_state)
    denoiser = Denoiser(unet, encoder)
    denoiser.load_state_dict(denoiser_state)
    return LDM(vae.float().eval(), denoiser.float().eval(), scheduler, settings)


def load_foreign_base(path: Path, image_size: int = 64) -> tuple[LDM, list[str]]:
    """Adapt any local diffusers directory holding vae/ and unet/ (e.g. Stable-Diffusion-style).

    Returns the LDM and a list of what was adapted, in words:
    - a VAE with C != 1 image channels gets grey-scale conv_in (weights summed over the input
      channels, as for an image replicated C times) and conv_out (averaged over output channels);
    - the condition encoder is created fresh at the UNet's cross_attention_dim;
    - the latent scale factor is taken from the VAE config's scaling_factor when present.
    """
    path = Path(path)
    for sub in ("vae", "unet"):
        if not (path / sub / "config.json").exists():
            raise FileNotFoundError(
                f"{path / sub / 'config.json'}: missing; a base needs vae/ and unet/ in diffusers format"
            )
    adapted: list[str] = []
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(
            f"{path}: unet in_channels {unet.config.in_channels} != vae latent_channels {vae.config.latent_channels}; cannot be adapted"
        )
    if vae.config.in_channels != 1:
        channels = vae.config.in_channels
        state = vae.state_dict()
        state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"].sum(1, keepdim=True)
        state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"].mean(0, keepdim=True)
        state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"].mean(0, keepdim=True)
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        vae = AutoencoderKL.from_config({**config, "in_channels": 1, "out_channels": 1})
        vae.load_state_dict(state)
        adapted.append(f"VAE converted from {channels} image channels to 1 (conv_in summed, conv_out averaged)")
    width = int(unet.config.cross_attention_dim)
    encoder = ConditionEncoder(dim=width)
    adapted.append(f"condition encoder initialised fresh at width {width} (the UNet's cross_attention_dim)")
    scheduler_dir = path / "scheduler"
    if (scheduler_dir / "scheduler_config.json").exists():
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    else:
        scheduler = build_scheduler()
        adapted.append("no scheduler/ found: using fedmri's 1000-step scaled-linear DDPM schedule")
    scale = vae.config.get("scaling_factor")
    if scale is None or scale == 1.0:
        adapted.append("VAE has no scaling_factor: using 1.0; compute one from data before training")
    settings = ModelSettings(
        image_size=image_size, scale_factor=float(scale or 1.0), prediction_type=scheduler.config.prediction_type
    )
    return LDM(vae.eval(), Denoiser(unet, encoder), scheduler, settings), adapted
