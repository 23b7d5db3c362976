"""The local DP trainer. This file is the only place fedmri calls Opacus."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from torch.utils.data import DataLoader, Dataset

from client.policy import RoundPlan
from common.model import LDM
from common.objective import encode, ldm_loss


@dataclass(frozen=True)
class TrainSettings:
    """Training knobs that do not touch privacy."""

    drop_prob: float = 0.1  # classifier-free guidance attribute dropout
    min_snr_gamma: float | None = 5.0
    proximal_mu: float = 0.0  # FedProx (Li et al. 2020); applied as a decoupled step, see below


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    steps: int
    empty_batches: int


def make_private(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, plan: RoundPlan
) -> tuple[GradSampleModule, torch.optim.Optimizer, DataLoader]:
    """Wrap model, optimizer and loader for DP-SGD with per-item clipping and Gaussian noise.

    Items are subjects (sites.datasets.SubjectDataset), so Poisson sampling of items at
    q = B / N samples subjects, clipping bounds each subject's gradient by C, the noise is
    N(0, σ²C²), and Opacus normalises by the *expected* batch size B (poisson_sampling=True).
    """
    engine = PrivacyEngine(accountant="prv")  # fedmri's own ledger does the accounting
    private_module, private_optimizer, private_loader = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode="hooks",
    )
    return private_module, private_optimizer, private_loader


def train_round(
    ldm: LDM, dataset: Dataset, plan: RoundPlan, seed: int, settings: TrainSettings = TrainSettings()
) -> TrainResult:
    """Run plan.local_steps DP-SGD steps on ldm.denoiser's trainable tensors, in place."""
    torch.manual_seed(seed)  # Opacus draws its noise from torch's global generator
    generator = torch.Generator().manual_seed(seed)
    denoiser = ldm.denoiser.train()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=plan.learning_rate)
    loader = DataLoader(dataset, batch_size=plan.expected_batch_size, generator=torch.Generator().manual_seed(seed))
    model, optimizer, loader = make_private(denoiser, optimizer, loader, plan)
    try:
        losses, empty, batches = [], 0, iter(loader)
        for _ in range(plan.local_steps):
            try:
                images, conditions = next(batches)
            except StopIteration:
                batches = iter(loader)
                images, conditions = next(batches)
            if len(images) == 0:  # Poisson sampling drew nobody; the step is still accounted
                empty += 1
                continue
            latents = encode(ldm.vae, images, ldm.settings.scale_factor, generator)  # -> [B, 4, 16, 16]
            loss = ldm_loss(
                model, ldm.scheduler, latents, conditions, generator, settings.drop_prob, settings.min_snr_gamma
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if settings.proximal_mu > 0:
                # FedProx as a decoupled proximal step w <- w - lr·μ(w - w_global): it reads no data,
                # so it is post-processing of the DP update and costs no privacy.
                with torch.no_grad():
                    for p, p0 in zip(params, start, strict=True):
                        p.sub_(plan.learning_rate * settings.proximal_mu * (p - p0))
            losses.append(loss.item())
    finally:
        model.remove_hooks()  # unwrap: the weights sent are the plain module's
        for p in params:
            p.grad_sample = None
    mean = sum(losses) / len(losses) if losses else float("nan")  # nan: every batch was empty
    return TrainResult(mean, plan.local_steps, empty)
