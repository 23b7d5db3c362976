"""The UNet's optional input branches, and where their channels sit in `conv_in`.

Two kinds of per-pixel conditioning enter the UNet the same way, as extra input channels of a
widened `conv_in` whose new weights start at zero (so a widened base computes exactly what the
base computed; ControlNet's zero convolution, Zhang et al. 2023, §3.1):

- the lesion-mask branch (common/mask_branch.py): MASK_CHANNELS;
- the source branch (common/source_branch.py): one slot per modality of a subject's acquired
  slices, source_channel_count(latent channels).

The channel layout is fixed: [noisy latents | mask | sources], each part present or not. The
counts differ for every combination, so a UNet's config alone says which branches it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from common.conditions import Modality

if TYPE_CHECKING:  # diffusers stays unloaded for `fedmri --help` (tests/simulation/test_cli.py)
    from diffusers import UNet2DConditionModel

MASK_CHANNELS = 4  # 'given', then one area fraction per lesion label (common/mask_branch.py)
SOURCE_MODALITIES = tuple(Modality)  # one source slot per modality, in this order


def source_channel_count(latent_channels: int) -> int:
    """Per modality slot: a 'given' flag and the source slice's latents."""
    return len(SOURCE_MODALITIES) * (1 + latent_channels)


@dataclass(frozen=True)
class Branches:
    mask: bool
    sources: bool


def branches(unet: UNet2DConditionModel) -> Branches:
    """Which input branches `unet` has, from its in_channels; refuses a count no layout gives."""
    latent = int(unet.config.out_channels)
    extra = int(unet.config.in_channels) - latent
    sources = source_channel_count(latent)
    layouts = {
        0: Branches(False, False),
        MASK_CHANNELS: Branches(True, False),
        sources: Branches(False, True),
        MASK_CHANNELS + sources: Branches(True, True),
    }
    if extra not in layouts:
        raise ValueError(
            f"UNet takes {unet.config.in_channels} input channels for {latent} latent ones: no fedmri layout "
            f"(extra channels: 0, {MASK_CHANNELS} for the mask, {sources} for the sources, or both)"
        )
    return layouts[extra]


def widen_conv_in(unet: UNet2DConditionModel, at: int, count: int) -> None:
    """Insert `count` zero-weighted input channels into `unet.conv_in` before channel `at`, in place.
    The UNet's output is unchanged; the new weights train when conv_in does."""
    old = unet.conv_in
    assert isinstance(old.padding, tuple)
    new = nn.Conv2d(
        old.in_channels + count, old.out_channels, old.kernel_size, padding=old.padding,
        device=old.weight.device, dtype=old.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :at].copy_(old.weight[:, :at])
        new.weight[:, at + count :].copy_(old.weight[:, at:])
        assert old.bias is not None and new.bias is not None
        new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)
