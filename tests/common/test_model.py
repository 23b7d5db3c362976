"""Saving and loading the LDM in diffusers format, and adapting a foreign base."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors import safe_open

from common.conditioning import ConditionEncoder
from common.model import ModelSpec, build_ldm, load_foreign_base, load_ldm, save_ldm

TINY = ModelSpec(
    image_size=16, vae_channels=(8, 8, 8), unet_channels=(16, 32), condition_dim=16, attention_head_dim=8, norm_groups=8
)


def test_saved_components_load_with_diffusers_from_pretrained(tmp_path: Path) -> None:
    ldm = build_ldm(TINY)
    files = save_ldm(ldm, tmp_path, dtype=torch.float16)
    assert all(p.suffix != ".bin" for p in files) and any(p.suffix == ".safetensors" for p in files)
    vae = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    encoder = ConditionEncoder.from_pretrained(tmp_path, subfolder="condition_encoder")
    DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert vae.config.in_channels == 1 and unet.config.cross_attention_dim == encoder.config["dim"] == 16
    with safe_open(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as stored:
        assert stored.get_tensor(next(iter(stored.keys()))).dtype == torch.float16
    loaded = load_ldm(tmp_path)
    assert next(loaded.denoiser.parameters()).dtype == torch.float32
    original = ldm.denoiser.unet.conv_in.weight.half().float()
    assert torch.equal(loaded.denoiser.unet.conv_in.weight, original)
    assert json.loads((tmp_path / "fedmri.json").read_text())["prediction_type"] == "epsilon"


def test_foreign_rgb_base_is_adapted_and_reported(tmp_path: Path) -> None:
    # A tiny Stable-Diffusion-style base: RGB VAE, cross-attention width 24, scaling_factor set.
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, scaling_factor=0.18215)  # fmt: skip
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    unet.save_pretrained(tmp_path / "unet")
    ldm, adapted = load_foreign_base(tmp_path, image_size=16)
    assert any("3 image channels to 1" in a for a in adapted)
    assert any("width 24" in a for a in adapted)
    assert ldm.settings.scale_factor == 0.18215
    grey = torch.rand(1, 1, 16, 16)
    # Summed conv_in on a grey image equals the original on that image replicated to RGB.
    original = vae.encoder.conv_in(grey.repeat(1, 3, 1, 1))
    assert torch.allclose(ldm.vae.encoder.conv_in(grey), original, atol=1e-5)
    out = ldm.denoiser(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.full((2, 7), float("nan")))
    assert out.shape == (2, 4, 8, 8)
