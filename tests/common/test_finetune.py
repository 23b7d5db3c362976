"""Fine-tuning modes: which tensors train and travel, and Opacus per-sample gradients per mode."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from client.trainer import group_by_subject
from common.finetune import FinetuneMode, LoRALinear, configure, load_trainable, merge_lora, trainable_tensors
from common.mask_branch import MASK_CHANNELS, NO_MASK, add_mask_branch
from common.model import ModelSpec, build_ldm
from common.source_branch import add_source_branch

TINY = ModelSpec(
    image_size=16, vae_channels=(8, 8, 8), unet_channels=(16, 32), condition_dim=16, attention_head_dim=8, norm_groups=8
)


def _denoiser(mode: FinetuneMode, seed: int = 0, mask_branch: bool = False, source_branch: bool = False):
    ldm = build_ldm(TINY, seed=seed)
    if source_branch:
        add_source_branch(ldm.denoiser.unet)
    if mask_branch:
        add_mask_branch(ldm.denoiser.unet)
    if mask_branch or source_branch:  # widened, then given non-zero input weights so that masks and sources matter
        torch.nn.init.normal_(ldm.denoiser.unet.conv_in.weight, std=0.1, generator=torch.Generator().manual_seed(seed))
    denoiser = configure(ldm.denoiser, mode, lora_rank=2)
    if mode is FinetuneMode.lora:  # give the zero-initialised up-projections a value so gradients reach both factors
        for module in denoiser.modules():
            if isinstance(module, LoRALinear):
                torch.nn.init.normal_(module.lora_up.weight, std=0.02)
    return denoiser


def _batch(n: int = 3):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(n, 4, 4, 4, generator=g)
    timesteps = torch.tensor([5, 400, 900, 150])[:n]
    conditions = torch.tensor(
        [[0, 1, 3.0, 0.5, 0.012, float("nan"), 0.3], [3, 0, 0.3, 6.0, 0.12, 2.0, 0.7], [float("nan")] * 7,
         [2, 2, 1.5, 9.0, 0.09, 2.5, 0.5]]
    )[:n]  # fmt: skip
    target = torch.randn(n, 4, 4, 4, generator=g)
    return latents, timesteps, conditions, target


def _masks(n: int = 4) -> torch.Tensor:
    """A glioma (core, oedema, rim), an MS plaque, a lesion-free slice and an unknown mask. -> [4, 16, 16]"""
    masks = torch.zeros(4, 16, 16, dtype=torch.uint8)
    masks[0, 4:12, 4:12], masks[0, 6:10, 6:10], masks[0, 7:9, 7:9] = 2, 3, 1
    masks[1, 10:13, 2:5] = 1
    masks[3] = NO_MASK
    return masks[:n]


def _sources(n: int = 4) -> torch.Tensor:
    """Source latents: row 0 has T2w and FLAIR, row 1 T1w, row 2 none, row 3 all but PDw. -> [4, 5, 4, 4, 4]"""
    sources = torch.randn(4, 5, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    for row, slots in ((0, [0, 1, 4]), (1, [1, 2, 3, 4]), (2, [0, 1, 2, 3, 4]), (3, [4])):
        sources[row, slots] = float("nan")
    return sources[:n]


def _loss(model, latents, timesteps, conditions, target, masks=None, sources=None) -> torch.Tensor:
    prediction = model(latents, timesteps, conditions, masks=masks, sources=sources)
    return ((prediction - target) ** 2).mean(dim=(1, 2, 3)).mean()


@pytest.mark.parametrize("branch", ["none", "mask", "mask+sources"])
@pytest.mark.parametrize("rows_per_subject", [1, 2])
@pytest.mark.parametrize("mode", list(FinetuneMode))
def test_per_subject_gradients_equal_autograd(mode: FinetuneMode, rows_per_subject: int, branch: str) -> None:
    """What DP-SGD clips is each subject's gradient: with R rows per subject (K slices x M draws,
    client/trainer.py), Opacus's per-row gradients averaged by group_by_subject must equal autograd
    of that subject's mean loss, computed one subject at a time; with the lesion-mask branch and the
    source branch too (common/branches.py)."""
    # Arrange: the real diffusers UNet in each mode, wrapped as the trainer wraps it (hooks).
    mask_branch, source_branch = "mask" in branch, "sources" in branch
    denoiser = _denoiser(mode, mask_branch=mask_branch, source_branch=source_branch)
    latents, timesteps, conditions, target = _batch(4)  # 4 rows: 4 subjects, or 2 subjects x 2 rows
    masks = _masks() if mask_branch else None
    sources = _sources() if source_branch else None
    wrapped = GradSampleModule(denoiser, batch_first=True, loss_reduction="mean")
    params = [p for p in denoiser.parameters() if p.requires_grad]
    # Act: one batched backward through Opacus, rows grouped by subject ...
    _loss(wrapped, latents, timesteps, conditions, target, masks, sources).backward()
    group_by_subject(params, rows_per_subject)
    opacus_grads = {n: p.grad_sample.clone() for n, p in denoiser.named_parameters() if p.requires_grad}
    # ... and plain autograd, one subject (its rows' mean loss) at a time, on an identical copy.
    reference = _denoiser(mode, mask_branch=mask_branch, source_branch=source_branch)
    per_subject = []
    for rows in torch.arange(4).split(rows_per_subject):
        reference.zero_grad()
        row_masks = None if masks is None else masks[rows]
        row_sources = None if sources is None else sources[rows]
        _loss(
            reference, latents[rows], timesteps[rows], conditions[rows], target[rows], row_masks, row_sources
        ).backward()
        per_subject.append({n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad})
    # Assert: every trainable tensor has a per-subject gradient equal to autograd's.
    assert opacus_grads, "no trainable parameters"
    assert set(opacus_grads) == set(per_subject[0])
    for name, grad_sample in opacus_grads.items():
        expected = torch.stack([g[name] for g in per_subject])
        assert grad_sample.shape[0] == 4 // rows_per_subject
        assert torch.allclose(grad_sample, expected, rtol=1e-4, atol=1e-6), f"{mode.value}: {name}"
    assert any(g.abs().sum() > 0 for g in opacus_grads.values())
    if mask_branch:  # the mask's input weights are trained, and their gradient reads the masks
        grad = opacus_grads["unet.conv_in.weight"][:, :, TINY.latent_channels : TINY.latent_channels + 4]
        assert grad.abs().sum() > 0  # -> [subjects, out, 4, 3, 3]
    if source_branch:  # so are the sources', and a slot that no row gives gets no gradient
        grad = opacus_grads["unet.conv_in.weight"][:, :, -25:].unflatten(2, (5, 5))  # -> [subjects, out, 5, 5, 3, 3]
        assert grad[:, :, :4].abs().sum() > 0 and grad[:, :, 4].abs().sum() == 0


@pytest.mark.parametrize("mode", list(FinetuneMode))
def test_the_mask_branch_trains_its_input_weights_in_every_mode(mode: FinetuneMode) -> None:
    plain = trainable_tensors(_denoiser(mode))
    widened = trainable_tensors(_denoiser(mode, mask_branch=True))
    assert set(widened) - set(plain) <= {"unet.conv_in.weight", "unet.conv_in.bias"}
    assert widened["unet.conv_in.weight"].shape[1] == TINY.latent_channels + MASK_CHANNELS


def test_modes_train_what_they_promise() -> None:
    full = trainable_tensors(_denoiser(FinetuneMode.full))
    attention = trainable_tensors(_denoiser(FinetuneMode.attention))
    lora = trainable_tensors(_denoiser(FinetuneMode.lora))
    conditioning = trainable_tensors(_denoiser(FinetuneMode.conditioning))
    assert all(".attn1." in n or ".attn2." in n or n.startswith("encoder.") for n in attention)
    assert all("lora_" in n or n.startswith("encoder.") for n in lora)
    assert any(n.startswith("unet.conv_in") for n in full)
    assert conditioning and all(n.startswith("encoder.") for n in conditioning)
    assert {n for n in full if n.startswith("encoder.")} == set(conditioning)
    size = lambda tensors: sum(t.numel() for t in tensors.values())  # noqa: E731
    assert size(conditioning) < size(lora) < size(attention) < size(full)


def test_trainable_tensors_round_trip_and_mismatch_is_refused() -> None:
    source, target = _denoiser(FinetuneMode.attention, seed=1), _denoiser(FinetuneMode.attention, seed=2)
    tensors = trainable_tensors(source)
    load_trainable(target, tensors)
    assert all(torch.equal(tensors[n], t) for n, t in trainable_tensors(target).items())
    with pytest.raises(ValueError, match="missing"):
        load_trainable(target, dict(list(tensors.items())[1:]))
    name = next(iter(tensors))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_trainable(target, {**tensors, name: tensors[name].double()})


def test_merged_lora_matches_adapters() -> None:
    denoiser = _denoiser(FinetuneMode.lora)
    latents, timesteps, conditions, _ = _batch()
    with torch.no_grad():
        before = denoiser(latents, timesteps, conditions)
        after = merge_lora(denoiser)(latents, timesteps, conditions)
    assert not any(isinstance(m, LoRALinear) for m in denoiser.modules())
    assert torch.allclose(before, after, atol=1e-5)
