"""The DP trainer: each subject's contribution is bounded, and noise is really added."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from client.policy import RoundPlan
from client.round import load_model
from client.trainer import make_private, train_round
from common.finetune import FinetuneMode, trainable_tensors
from sites.bids import read_site
from sites.datasets import SubjectDataset


def test_each_subject_contribution_is_clipped_to_c() -> None:
    # Arrange: per-subject gradients far larger than C, no noise, plain SGD with lr 1.
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    data = TensorDataset(torch.randn(6, 8) * 100.0, torch.zeros(6))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(data, batch_size=6)
    plan = RoundPlan(1, 1.0, 6, 1.0, noise_multiplier=0.0, max_grad_norm=0.5)
    private, optimizer, loader = make_private(model, optimizer, loader, plan)
    before = [p.detach().clone() for p in model.parameters()]
    # Act: one step on whatever Poisson sampling drew (q = 1: everyone).
    x, _ = next(iter(loader))
    loss = (private(x) ** 2).mean()
    loss.backward()
    per_subject = torch.cat([p.grad_sample.flatten(1) for p in model.parameters()], 1).norm(dim=1)
    optimizer.step()
    change = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]).norm()
    # Assert: raw per-subject norms exceed C, the update is at most (batch / expected batch) * C.
    assert (per_subject > 10 * plan.max_grad_norm).all()
    assert change <= len(x) / plan.expected_batch_size * plan.max_grad_norm + 1e-5
    private.remove_hooks()


def test_noise_is_really_added(tiny_sites: Path, tiny_base: Path) -> None:
    slices = read_site(tiny_sites / "tiny-b", image_size=64)
    updates = []
    for seed, sigma in ((1, 1.0), (2, 1.0), (1, 0.0)):
        ldm = load_model(str(tiny_base), FinetuneMode.attention, 2, _initial(tiny_base))
        plan = RoundPlan(2, 1.0, 4, 1e-3, noise_multiplier=sigma, max_grad_norm=1.0)
        train_round(ldm, SubjectDataset(slices, seed=0), plan, seed=seed)
        updates.append(torch.cat([t.flatten() for t in trainable_tensors(ldm.denoiser).values()]))
    assert not torch.allclose(updates[0], updates[1])  # two seeds, two noise draws
    assert not torch.allclose(updates[0], updates[2])  # same seed, with and without noise


def _initial(base: Path) -> dict[str, torch.Tensor]:
    from common.finetune import configure
    from common.model import load_ldm

    ldm = load_ldm(base)
    configure(ldm.denoiser, FinetuneMode.attention, 2)
    return trainable_tensors(ldm.denoiser)
