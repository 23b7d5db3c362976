"""The source branch: a subject's acquired slices steer the generation of another contrast.

Issue 16 (missing-sequence synthesis, after TUMSyn) asks for a latent concatenation or a second
encoder path. Concatenation adds one tensor pair (the widened `conv_in`, common/branches.py), as
the inpainting LDM concatenates its masked image's latents (Rombach et al. 2022, §4.5), and it
trains through the same single Opacus call as everything else; a second encoder would add dozens
of tensors for DP-SGD to noise.

A row's sources are [5, c, h, w]: one slot per modality (SOURCE_MODALITIES, so the slot says
the source's contrast), holding that contrast's slice of the same subject at the same position,
encoded by the VAE. A slot that is not given is NaN. The channels are, per slot, a 'given' flag
and the latents (0 where not given): [B, 5·(1 + c), h, w]. The other acquisition parameters of a
source (field, TR, TE) are not encoded: a subject's scans come from one session. The target's
own modality is never a source (sites/datasets.py).

Source dropout: in training each given slot is withheld with probability SOURCE_DROP, each on
its own, so the model learns every subset of sources, and the empty one keeps it a generator
from noise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from common.branches import SOURCE_MODALITIES, branches, source_channel_count, widen_conv_in

if TYPE_CHECKING:  # diffusers stays unloaded for `fedmri --help` (tests/simulation/test_cli.py)
    from diffusers import UNet2DConditionModel

SOURCE_DROP = 0.5  # per slot, in training


def no_sources(batch: int, channels: int, size: int, device: torch.device | None = None) -> torch.Tensor:
    """`batch` rows with no source given. -> [B, 5, c, h, w] NaN"""
    return torch.full((batch, len(SOURCE_MODALITIES), channels, size, size), float("nan"), device=device)


def given_slots(sources: torch.Tensor) -> torch.Tensor:
    """[B, 5, ...] sources (NaN = not given) -> [B, 5] bool; refuses a slot only partly NaN."""
    if sources.ndim < 3 or sources.shape[1] != len(SOURCE_MODALITIES):
        raise ValueError(f"sources must be [B, {len(SOURCE_MODALITIES)}, ...], got shape {tuple(sources.shape)}")
    missing = torch.isnan(sources).flatten(2)  # -> [B, 5, n]
    partial = missing.any(-1) & ~missing.all(-1)
    if partial.any():
        raise ValueError(f"source slots {partial.nonzero().tolist()} are only partly NaN ('not given')")
    return ~missing.all(-1)


def source_channels(sources: torch.Tensor) -> torch.Tensor:
    """[B, 5, c, h, w] source latents (NaN = not given) -> [B, 5·(1 + c), h, w]: per slot, 'given' then latents."""
    given = given_slots(sources)  # -> [B, 5]
    b, slots, _c, h, w = sources.shape
    flag = given[:, :, None, None, None].to(sources.dtype).expand(b, slots, 1, h, w)  # -> [B, 5, 1, h, w]
    latents = torch.nan_to_num(sources, nan=0.0)  # -> [B, 5, c, h, w]
    return torch.cat([flag, latents], dim=2).flatten(1, 2)  # -> [B, 5·(1 + c), h, w]


def drop_sources(sources: torch.Tensor, drop_prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each slot of each row withheld (NaN) with probability drop_prob. -> [B, 5, ...]"""
    dropped = torch.rand(sources.shape[:2], generator=generator, device=sources.device) < drop_prob  # -> [B, 5]
    shape = (*sources.shape[:2], *(1,) * (sources.ndim - 2))
    return torch.where(dropped.view(shape), torch.full_like(sources, float("nan")), sources)


def has_source_branch(unet: UNet2DConditionModel) -> bool:
    """Does `unet` take the source channels (common/branches.py)?"""
    return branches(unet).sources


def add_source_branch(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Widen `unet.conv_in` by the source channels, zero-weighted, in place (its output is unchanged)."""
    if has_source_branch(unet):
        raise ValueError("this UNet has a source branch already")
    widen_conv_in(unet, int(unet.config.in_channels), source_channel_count(int(unet.config.out_channels)))  # last
    return unet
