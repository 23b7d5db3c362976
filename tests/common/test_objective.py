"""The LDM loss: ε and v targets, min-SNR weights, and that it actually trains."""

from __future__ import annotations

import pytest
import torch

from common.model import ModelSpec, build_ldm, build_scheduler
from common.objective import EMA, ldm_loss, min_snr_weight

TINY = ModelSpec(
    image_size=16, vae_channels=(8, 8, 8), unet_channels=(16, 32), condition_dim=16, attention_head_dim=8, norm_groups=8
)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_trains_down_on_a_fixed_batch(prediction_type: str) -> None:
    ldm = build_ldm(TINY, prediction_type=prediction_type)
    latents = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    conditions = torch.tensor([[0, 0, 1.5, 0.5, 0.01, float("nan"), 0.5]]).repeat(8, 1)
    optimizer = torch.optim.Adam(ldm.denoiser.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        generator = torch.Generator().manual_seed(step % 4)  # a few fixed noise draws to overfit
        loss = ldm_loss(ldm.denoiser, ldm.scheduler, latents, conditions, generator, drop_prob=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])


def test_min_snr_weights_cap_low_noise_steps() -> None:
    scheduler = build_scheduler("epsilon")
    t = torch.tensor([0, 100, 500, 999])
    weights = min_snr_weight(scheduler, t, gamma=5.0)
    assert weights[0] < 0.01 and torch.isclose(weights[-1], torch.tensor(1.0))
    v_weights = min_snr_weight(build_scheduler("v_prediction"), t, gamma=5.0)
    assert (v_weights <= 1.0).all() and (v_weights > 0).all()


def test_ema_tracks_parameters() -> None:
    module = torch.nn.Linear(2, 2)
    ema = EMA(module, decay=0.5)
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)
    averaged = ema.copy_to(module)
    assert torch.allclose(averaged.weight, module.weight - 0.5)


def test_how_many_sources_one_subject_has_never_shifts_anothers_draws() -> None:
    """encode_sources draws the sampling noise for every slot, given or not: subject 0 with 1 or
    with 4 sources leaves subject 1's source latents bit-identical. (Sampling only the given
    slots would draw a data-dependent amount of noise and shift every later row.)"""
    from common.model import ModelSpec, build_ldm
    from common.objective import encode_sources

    spec = ModelSpec(image_size=16, vae_channels=(8, 8, 8), unet_channels=(16, 32), condition_dim=16,
                     attention_head_dim=8, norm_groups=8)  # fmt: skip
    vae = build_ldm(spec, seed=0).vae.eval()
    images = torch.rand(2, 5, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    few, many = images.clone(), images.clone()
    few[0, 1:] = float("nan")  # subject 0: one source
    many[0, 4:] = float("nan")  # subject 0: four sources
    few[1, 3:] = many[1, 3:] = float("nan")  # subject 1: three sources either way
    first = encode_sources(vae, few, 0.5, torch.Generator().manual_seed(7))
    second = encode_sources(vae, many, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(first[1, :3], second[1, :3]) and torch.isnan(first[1, 3:]).all()
    assert torch.equal(first[0, 0], second[0, 0]) and torch.isnan(first[0, 1:]).all()
