"""The lesion-mask branch: zero-initialised extra input channels on the UNet (common/mask_branch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.finetune import FinetuneMode, configure
from common.mask_branch import MASK_CHANNELS, NO_MASK, add_mask_branch, has_mask_branch, mask_channels, no_masks
from common.model import ModelSpec, build_ldm, load_ldm, save_ldm
from common.objective import drop_masks

TINY = ModelSpec(
    image_size=16, vae_channels=(8, 8, 8), unet_channels=(16, 32), condition_dim=16, attention_head_dim=8, norm_groups=8
)


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(n, 4, 4, 4, generator=g)
    timesteps = torch.tensor([10, 500, 990])[:n]
    conditions = torch.tensor([[0, 1, 3.0, 0.5, 0.012, float("nan"), 0.5]] * n)
    masks = torch.zeros(n, 16, 16, dtype=torch.uint8)
    masks[0, 4:8, 4:8] = 1
    masks[1, 0:4, 8:16] = 2
    masks[2] = NO_MASK
    return latents, timesteps, conditions, masks


def test_a_widened_base_computes_exactly_what_the_base_computed() -> None:
    base = build_ldm(TINY, seed=0).denoiser.eval()
    widened = build_ldm(TINY, seed=0).denoiser.eval()
    add_mask_branch(widened.unet)
    latents, timesteps, conditions, masks = _inputs()
    with torch.no_grad():
        expected = base(latents, timesteps, conditions)
        assert torch.equal(widened(latents, timesteps, conditions), expected)
        assert torch.equal(widened(latents, timesteps, conditions, masks), expected)
    assert has_mask_branch(widened.unet) and not has_mask_branch(base.unet)
    assert widened.unet.config.in_channels == TINY.latent_channels + MASK_CHANNELS


def test_mask_channels_are_a_given_flag_and_each_labels_share_of_a_latent_cell() -> None:
    _, _, _, masks = _inputs()
    channels = mask_channels(masks, 4)  # 16 px masks on a 4 x 4 latent grid: 4 x 4 pixels per cell
    assert channels.shape == (3, MASK_CHANNELS, 4, 4)
    assert channels[:, 0].flatten(1).tolist() == [[1.0] * 16, [1.0] * 16, [0.0] * 16]
    assert channels[0, 1, 1, 1] == 1.0 and channels[0, 1].sum() == 1.0  # label 1 fills one cell
    assert channels[1, 2, 0, 2:].tolist() == [1.0, 1.0] and channels[1, 2].sum() == 2.0  # label 2: two cells
    assert channels[2].abs().sum() == 0  # not given: nothing at all
    half = torch.zeros(1, 16, 16, dtype=torch.uint8)
    half[0, 0:2, 0:4] = 3  # half of the first cell
    assert mask_channels(half, 4)[0, 3, 0, 0] == 0.5


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.full((1, 16, 16), 4, dtype=torch.uint8), "labels must be 0"),
        (torch.cat([no_masks(1, 16)[:, :8], torch.zeros(1, 8, 16, dtype=torch.uint8)], 1), "partly"),
        (torch.zeros(16, 16, dtype=torch.uint8), r"\[B, H, W\]"),
    ],
)
def test_masks_that_cannot_be_read_are_refused(bad: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mask_channels(bad, 4)


def test_a_model_without_the_branch_refuses_a_mask_and_a_branch_is_added_once() -> None:
    denoiser = build_ldm(TINY, seed=0).denoiser
    latents, timesteps, conditions, masks = _inputs()
    with pytest.raises(ValueError, match="no mask branch"):
        denoiser(latents, timesteps, conditions, masks)
    add_mask_branch(denoiser.unet)
    with pytest.raises(ValueError, match="already"):
        add_mask_branch(denoiser.unet)


def test_the_branch_survives_save_and_load(tmp_path: Path) -> None:
    ldm = build_ldm(TINY, seed=0)
    add_mask_branch(ldm.denoiser.unet)
    torch.nn.init.normal_(ldm.denoiser.unet.conv_in.weight, std=0.1)
    save_ldm(ldm, tmp_path / "model")
    loaded = load_ldm(tmp_path / "model")
    assert has_mask_branch(loaded.denoiser.unet)
    latents, timesteps, conditions, masks = _inputs()
    with torch.no_grad():
        assert torch.equal(
            loaded.denoiser.eval()(latents, timesteps, conditions, masks),
            ldm.denoiser.eval()(latents, timesteps, conditions, masks),
        )


def test_dropping_masks_keeps_or_removes_whole_rows() -> None:
    _, _, _, masks = _inputs()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(drop_masks(masks, 0.0, g), masks)
    assert torch.equal(drop_masks(masks, 1.0, g), no_masks(3, 16))
    many = masks.repeat(100, 1, 1)
    dropped = drop_masks(many, 0.5, g)
    gone = (dropped == NO_MASK).all(dim=(1, 2))
    assert torch.equal(dropped[~gone], many[~gone])  # a row is kept whole or dropped whole
    # 300 rows: 100 'not given' already, about half of the other 200 dropped (170..230 is ±4 sd).
    assert 170 < int(gone.sum()) < 230


def test_the_branch_learns_to_follow_a_mask() -> None:
    """From the zero start, a few steps on conv_in alone teach the model a target that only the mask
    tells: its loss with the true masks falls well below its loss with the masks shuffled."""
    torch.manual_seed(0)
    denoiser = build_ldm(TINY, seed=0).denoiser
    add_mask_branch(denoiser.unet)
    configure(denoiser, FinetuneMode.conditioning)
    denoiser.encoder.requires_grad_(False)  # only conv_in learns
    g = torch.Generator().manual_seed(1)
    masks = torch.zeros(32, 16, 16, dtype=torch.uint8)
    for i in range(32):  # a 4 x 4 plaque in a random latent cell
        r, c = (int(v) * 4 for v in torch.randint(0, 4, (2,), generator=g))
        masks[i, r : r + 4, c : c + 4] = 1
    target = mask_channels(masks, 4)[:, 1:2].expand(-1, 4, -1, -1) * 3.0  # -> [32, 4, 4, 4]: where the plaque is
    latents = torch.zeros(32, 4, 4, 4)
    timesteps = torch.full((32,), 500)
    conditions = torch.full((32, 7), float("nan"))
    optimizer = torch.optim.Adam([p for p in denoiser.parameters() if p.requires_grad], lr=3e-2)

    def loss(m: torch.Tensor) -> torch.Tensor:
        return ((denoiser(latents, timesteps, conditions, m) - target) ** 2).mean()

    for _ in range(60):
        optimizer.zero_grad()
        loss(masks).backward()
        optimizer.step()
    with torch.no_grad():
        true, shuffled = loss(masks).item(), loss(masks[torch.randperm(32, generator=g)]).item()
    assert true < 0.5 * shuffled, (true, shuffled)
