"""The lesion-mask branch: a slice's lesion mask enters the UNet as extra input channels.

Issue 15 asks for whichever of a ControlNet-style branch or a mask concatenated to the latents
trains under DP with fewer tensors. Concatenation adds one tensor pair (the widened `conv_in`,
64 x 8 x 3 x 3 weights and 64 biases at the default size); a ControlNet copies the UNet's encoder
(dozens of tensors, about half the UNet's parameters), each of them noised by DP-SGD. So the
mask is concatenated, as the inpainting LDM concatenates its mask (Rombach et al. 2022, §4.5),
and the new input weights start at zero: a widened base computes exactly what the base computed
(the zero convolution of ControlNet, Zhang et al. 2023, §3.1), and fine-tuning teaches it the mask.

A mask is [H, W] of labels on the slice grid: 0 none, 1 glioma core or MS plaque, 2 oedema,
3 enhancing rim (sites/lesion_prior.py, BraTS 2023's numbering); NO_MASK fills a row whose mask
is not given. The channels, at the latent grid, are a 'given' flag and the fraction of each
latent cell that each label covers. A lesion-free slice has a given, all-zero mask; a slice
whose mask is unknown has none, and the model then generates from its attributes alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from common.branches import MASK_CHANNELS, branches, widen_conv_in

if TYPE_CHECKING:  # diffusers stays unloaded for `fedmri --help` (tests/simulation/test_cli.py)
    from diffusers import UNet2DConditionModel

MASK_LABELS = (1, 2, 3)
NO_MASK = 255  # fills a row whose mask is not given
assert 1 + len(MASK_LABELS) == MASK_CHANNELS  # 'given', then one area fraction per label


def no_masks(batch: int, size: int, device: torch.device | None = None) -> torch.Tensor:
    """`batch` rows of 'no mask given'. -> [B, size, size] uint8"""
    return torch.full((batch, size, size), NO_MASK, dtype=torch.uint8, device=device)


def check_masks(masks: torch.Tensor) -> None:
    """Refuse labels outside MASK_LABELS and rows that are partly NO_MASK, naming them."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be [B, H, W] labels, got shape {tuple(masks.shape)}")
    unknown = masks == NO_MASK
    partial = unknown.any(dim=(1, 2)) & ~unknown.all(dim=(1, 2))
    if partial.any():
        raise ValueError(f"mask rows {partial.nonzero().flatten().tolist()} are only partly 'not given' ({NO_MASK})")
    allowed = torch.tensor((0, *MASK_LABELS, NO_MASK), device=masks.device)
    bad = ~torch.isin(masks, allowed)
    if bad.any():
        values = sorted(int(v) for v in masks[bad].unique()[:5])
        raise ValueError(f"mask labels must be 0 (none) or {MASK_LABELS}; got {values}")


def mask_channels(masks: torch.Tensor, latent_size: int) -> torch.Tensor:
    """[B, H, W] labels -> [B, 4, h, w]: 'given' (1 or 0), then each label's share of each latent cell."""
    check_masks(masks)
    size = masks.shape[-1]
    if masks.shape[-2] != size or size % latent_size:
        raise ValueError(
            f"masks must be square and a multiple of the latent grid {latent_size}, got {tuple(masks.shape)}"
        )
    given = (masks[:, 0, 0] != NO_MASK).float()  # -> [B]
    one_hot = torch.stack([masks == label for label in MASK_LABELS], dim=1).float()  # -> [B, 3, H, W]
    shares = F.avg_pool2d(one_hot, size // latent_size)  # -> [B, 3, h, w]
    flag = given[:, None, None, None].expand(-1, 1, latent_size, latent_size)  # -> [B, 1, h, w]
    return torch.cat([flag, shares], dim=1)  # -> [B, 4, h, w]


def has_mask_branch(unet: UNet2DConditionModel) -> bool:
    """Does `unet` take the mask channels (common/branches.py)?"""
    return branches(unet).mask


def add_mask_branch(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Widen `unet.conv_in` by MASK_CHANNELS zero-weighted input channels, in place (its output is unchanged)."""
    if has_mask_branch(unet):
        raise ValueError("this UNet has a mask branch already")
    widen_conv_in(unet, int(unet.config.out_channels), MASK_CHANNELS)  # right after the latents
    return unet
