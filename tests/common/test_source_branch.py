"""The source branch: a subject's acquired slices as zero-initialised input channels (common/source_branch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.branches import Branches, branches, source_channel_count
from common.finetune import FinetuneMode, configure
from common.mask_branch import NO_MASK, add_mask_branch
from common.model import ModelSpec, build_ldm, load_ldm, save_ldm
from common.source_branch import add_source_branch, drop_sources, given_slots, has_source_branch, source_channels

TINY = ModelSpec(
    image_size=16, vae_channels=(8, 8, 8), unet_channels=(16, 32), condition_dim=16, attention_head_dim=8, norm_groups=8
)
NAN = float("nan")


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(n, 4, 4, 4, generator=g)
    timesteps = torch.tensor([10, 500, 990])[:n]
    conditions = torch.tensor([[3, 1, 3.0, 9.0, 0.09, 2.5, 0.5]] * n)  # FLAIR at 3 T
    sources = torch.randn(n, 5, 4, 4, 4, generator=g)  # T1w and T2w given in row 0, T1w in row 1, none in row 2
    sources[0, [1, 3, 4]] = NAN
    sources[1, 1:] = NAN
    sources[2] = NAN
    return latents, timesteps, conditions, sources


def _randomised(denoiser: torch.nn.Module, seed: int = 0) -> None:
    with torch.no_grad():
        denoiser.unet.conv_in.weight[:, 4:].normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))


def test_a_widened_base_computes_exactly_what_the_base_computed() -> None:
    base = build_ldm(TINY, seed=0).denoiser.eval()
    widened = build_ldm(TINY, seed=0).denoiser.eval()
    add_source_branch(widened.unet)
    latents, timesteps, conditions, sources = _inputs()
    with torch.no_grad():
        expected = base(latents, timesteps, conditions)
        assert torch.equal(widened(latents, timesteps, conditions), expected)
        assert torch.equal(widened(latents, timesteps, conditions, sources=sources), expected)
    assert has_source_branch(widened.unet) and not has_source_branch(base.unet)
    assert widened.unet.config.in_channels == 4 + source_channel_count(4) == 29


def test_source_channels_are_a_given_flag_and_the_latents_per_modality_slot() -> None:
    _, _, _, sources = _inputs()
    channels = source_channels(sources).unflatten(1, (5, 5))  # -> [3, 5 slots, flag + 4 latents, 4, 4]
    assert given_slots(sources).tolist() == [[True, False, True, False, False], [True] + [False] * 4, [False] * 5]
    assert torch.equal(channels[:, :, 0, 0, 0], given_slots(sources).float())
    assert torch.equal(channels[0, 2, 1:], sources[0, 2]) and torch.equal(channels[1, 0, 1:], sources[1, 0])
    assert channels[0, 1].abs().sum() == 0 and channels[2].abs().sum() == 0  # not given: all zero, no NaN
    half = sources.clone()
    half[0, 0, 0] = NAN  # one latent channel missing: a slot is given whole or not at all
    with pytest.raises(ValueError, match=r"partly NaN"):
        source_channels(half)
    with pytest.raises(ValueError, match=r"\[B, 5"):
        source_channels(sources[:, :4])


def test_mask_and_sources_keep_their_weights_whichever_branch_came_first() -> None:
    """The layout is [latents | mask | sources] (common/branches.py): adding the mask branch to a
    UNet that has trained source weights moves them, so the model computes what it computed."""
    latents, timesteps, conditions, sources = _inputs()
    model = build_ldm(TINY, seed=0).denoiser.eval()
    add_source_branch(model.unet)
    _randomised(model)
    with torch.no_grad():
        before = model(latents, timesteps, conditions, sources=sources)
        add_mask_branch(model.unet)
        assert branches(model.unet) == Branches(mask=True, sources=True)
        no_lesion = torch.zeros(3, 16, 16, dtype=torch.uint8)
        unknown = torch.full_like(no_lesion, NO_MASK)
        # Equal up to float summation order (conv_in sums 33 channels now, 29 before); a moved
        # weight would change the output by about 0.1.
        for masks in (unknown, no_lesion):
            after = model(latents, timesteps, conditions, masks=masks, sources=sources)
            assert torch.allclose(after, before, rtol=0, atol=1e-5), (after - before).abs().max()


def test_a_model_without_the_branch_refuses_sources_and_a_branch_is_added_once() -> None:
    denoiser = build_ldm(TINY, seed=0).denoiser
    latents, timesteps, conditions, sources = _inputs()
    with pytest.raises(ValueError, match="no source branch"):
        denoiser(latents, timesteps, conditions, sources=sources)
    add_source_branch(denoiser.unet)
    with pytest.raises(ValueError, match="already"):
        add_source_branch(denoiser.unet)


def test_an_unknown_channel_count_is_refused() -> None:
    ldm = build_ldm(TINY, seed=0)
    ldm.denoiser.unet.register_to_config(in_channels=7)
    with pytest.raises(ValueError, match="no fedmri layout"):
        branches(ldm.denoiser.unet)


def test_the_branch_survives_save_and_load(tmp_path: Path) -> None:
    ldm = build_ldm(TINY, seed=0)
    add_source_branch(ldm.denoiser.unet)
    _randomised(ldm.denoiser)
    save_ldm(ldm, tmp_path / "model")
    loaded = load_ldm(tmp_path / "model")
    assert has_source_branch(loaded.denoiser.unet)
    latents, timesteps, conditions, sources = _inputs()
    with torch.no_grad():
        assert torch.equal(
            loaded.denoiser.eval()(latents, timesteps, conditions, sources=sources),
            ldm.denoiser.eval()(latents, timesteps, conditions, sources=sources),
        )


def test_dropping_sources_removes_whole_slots_at_the_asked_rate() -> None:
    sources = torch.randn(400, 5, 4, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(drop_sources(sources, 0.0, g), sources)
    assert torch.isnan(drop_sources(sources, 1.0, g)).all()
    dropped = drop_sources(sources, 0.5, g)
    gone = ~given_slots(dropped)  # raises if a slot were only partly dropped
    assert torch.equal(dropped[~gone], sources[~gone])
    # 2,000 slots, each dropped with probability 0.5: 1,000 ± 4 sd (sd 22.4).
    assert 910 < int(gone.sum()) < 1090
    assert gone.any(1).sum() > gone.all(1).sum() > 0  # slots drop one by one: rows keep some sources


def test_the_branch_learns_to_copy_what_only_a_source_tells() -> None:
    """From the zero start, 60 steps in full mode teach the model a target that only the T2w
    source tells (its latents): its loss with the true sources falls far below its loss with them
    shuffled between rows. (Measured: 0.007 against 1.8.)"""
    torch.manual_seed(0)
    denoiser = build_ldm(TINY, seed=0).denoiser
    add_source_branch(denoiser.unet)
    configure(denoiser, FinetuneMode.full)
    g = torch.Generator().manual_seed(1)
    sources = torch.full((32, 5, 4, 4, 4), NAN)
    sources[:, 2] = torch.randn(32, 4, 4, 4, generator=g)  # T2w latents
    target = sources[:, 2]  # -> [32, 4, 4, 4]
    latents = torch.zeros(32, 4, 4, 4)
    timesteps = torch.full((32,), 500)
    conditions = torch.full((32, 7), NAN)
    optimizer = torch.optim.Adam([p for p in denoiser.parameters() if p.requires_grad], lr=3e-3)

    def loss(s: torch.Tensor) -> torch.Tensor:
        return ((denoiser(latents, timesteps, conditions, sources=s) - target) ** 2).mean()

    for _ in range(60):
        optimizer.zero_grad()
        loss(sources).backward()
        optimizer.step()
    with torch.no_grad():
        true, shuffled = loss(sources).item(), loss(sources[torch.randperm(32, generator=g)]).item()
    assert true < 0.05 * shuffled, (true, shuffled)
