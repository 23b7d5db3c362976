"""The local DP trainer. This file is the only place fedmri calls Opacus.

DP-SGD (Abadi et al. 2016, Alg. 1) with Poisson sampling of subjects at rate q = B/N. Every
accounted step releases noise: a step whose Poisson draw is empty still adds N(0, σ²C²)/B to
the update, exactly as the subsampled Gaussian mechanism that the ledger accounts for.

Subject multiplicity: a sampled subject's term is the mean loss over K of its slices (any of
its contrasts) and M noise/timestep draws per slice, and it is that mean's gradient that is
clipped to C. The subject stays the privacy unit, so ε does not change; the clipped gradient is
a K·M-sample estimate instead of a one-sample one (augmentation multiplicity, De et al. 2022,
§3.2; noise multiplicity, Dockhorn et al. 2023, §3.3). Opacus computes one gradient per row of
the [b·K·M] batch; `group_by_subject` averages each subject's rows before the optimizer clips.

Randomness (client/secure_random.py): subject sampling and the DP noise each come from their
own ChaCha20 stream keyed with 256 bits of os.urandom per round. The randomness inside one
subject's gradient (which slice, the diffusion noise and timestep, the VAE sample) comes from
a torch generator: DP holds for every value of it, because clipping bounds the subject's
contribution whatever it is, so it need not be secret.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch.utils.data import Dataset

from client.policy import RoundPlan
from client.secure_random import SecureRandom, fresh_seed
from common.branches import branches
from common.model import LDM
from common.objective import encode, encode_sources, ldm_loss
from common.run_config import RunConfig
from sites.bids import SiteSlices
from sites.datasets import SubjectDataset

Batch = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]  # images, conditions, masks, sources (sites/datasets.py)


@dataclass(frozen=True)
class TrainSettings:
    """Training knobs that do not touch privacy."""

    drop_prob: float = 0.1  # classifier-free guidance attribute dropout
    min_snr_gamma: float | None = 5.0
    proximal_mu: float = 0.0  # FedProx (Li et al. 2020); applied as a decoupled step, see below
    slices_per_subject: int = RunConfig.slices_per_subject  # K
    noise_draws: int = RunConfig.noise_draws  # M

    def __post_init__(self) -> None:
        for name in ("slices_per_subject", "noise_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class RoundRandomness:
    """A round's random sources: two independent CSPRNG streams and a non-secret torch seed."""

    sampling: SecureRandom = field(default_factory=SecureRandom)
    noise: SecureRandom = field(default_factory=SecureRandom)
    torch_seed: int = field(default_factory=fresh_seed)


@dataclass(frozen=True)
class TrainResult:
    """Stays at the site: the mean training loss is about the sampled subjects and is never sent."""

    mean_loss: float  # over non-empty steps; nan if every step was empty
    steps: int
    empty_steps: int  # steps whose Poisson draw was empty: noise only


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus's DP optimizer with the Gaussian noise drawn from a ChaCha20 stream.

    The clipped sum and the noise are added in float64 and rounded once to the parameter's dtype.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise: SecureRandom, **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)
        self.noise = noise

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            summed = p.summed_grad
            noise = self.noise.normal(summed.shape, std) if std > 0 else torch.zeros(summed.shape, dtype=torch.float64)
            p.grad = (summed.double() + noise.to(summed.device)).to(summed.dtype).view_as(p)


def make_private(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: RoundPlan, noise: SecureRandom
) -> tuple[GradSampleModule, SecureNoiseDPOptimizer]:
    """Wrap model and optimizer for DP-SGD: per-subject clipping to C, noise N(0, σ²C²) from `noise`,
    and normalisation by the *expected* batch size B (Poisson sampling)."""
    ModuleValidator.validate(module, strict=True)
    private_module = GradSampleModule(module, batch_first=True, loss_reduction="mean")  # hooks mode: exact
    private_optimizer = SecureNoiseDPOptimizer(
        optimizer,
        noise=noise,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        loss_reduction="mean",
    )
    return private_module, private_optimizer


def poisson_batches(dataset: Dataset, plan: RoundPlan, sampling: SecureRandom) -> list[list[int]]:
    """The subjects of each of the round's steps: each one independently with probability q."""
    n = len(dataset)  # type: ignore[arg-type]
    return [np.nonzero(sampling.bernoulli(n, plan.sample_rate))[0].tolist() for _ in range(plan.local_steps)]


def group_by_subject(params: Sequence[torch.nn.Parameter], rows_per_subject: int) -> None:
    """Opacus's per-row gradients [b·R, ...] -> per-subject gradients [b, ...], in place.

    Rows are subject-major (subject s owns rows s·R .. s·R + R - 1). With loss_reduction="mean",
    row i's grad_sample is the gradient of row i's loss, so the mean of a subject's R rows is the
    gradient of the subject's mean loss: the quantity DP-SGD then clips to C.
    """
    if rows_per_subject == 1:
        return
    for p in params:
        rows = p.grad_sample  # type: ignore[attr-defined]
        if not isinstance(rows, torch.Tensor) or rows.shape[0] % rows_per_subject:
            raise RuntimeError(
                f"per-sample gradient of shape {getattr(rows, 'shape', type(rows))} is not {rows_per_subject} rows "
                "per subject: one forward pass per step, subject-major rows"
            )
        p.grad_sample = rows.view(-1, rows_per_subject, *rows.shape[1:]).mean(1)  # type: ignore[attr-defined]


def run_dp_steps(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[torch.nn.Module, Batch], torch.Tensor],
    dataset: Dataset,
    plan: RoundPlan,
    randomness: RoundRandomness,
    proximal_mu: float = 0.0,
    rows_per_subject: int = 1,
) -> TrainResult:
    """plan.local_steps DP-SGD steps on `module`'s trainable tensors, in place. The step reads the
    same with σ = 0 (allowed only by a site's explicit policy) as with σ > 0.

    `loss_of` returns the mean loss over rows_per_subject rows per drawn subject, subject-major.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    model, private_optimizer = make_private(module, optimizer, plan, randomness.noise)
    losses: list[float] = []
    empty = 0
    try:
        for indices in poisson_batches(dataset, plan, randomness.sampling):
            private_optimizer.zero_grad(set_to_none=True)
            if indices:
                loss = loss_of(model, collate([dataset[i] for i in indices]))
                loss.backward()
                group_by_subject(params, rows_per_subject)  # -> grad_sample [b, ...]
                losses.append(loss.item())
            else:  # nobody drawn: the clipped sum is zero, the noise is still added
                empty += 1
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
            private_optimizer.step()
            if proximal_mu > 0:
                # FedProx as a decoupled proximal step w <- w - lr·μ(w - w_global): it reads no data,
                # so it is post-processing of the DP update and costs no privacy.
                with torch.no_grad():
                    for p, p0 in zip(params, start, strict=True):
                        p.sub_(plan.learning_rate * proximal_mu * (p - p0))
    finally:
        model.remove_hooks()  # unwrap: the weights sent are the plain module's
        for p in params:
            p.grad_sample = None  # type: ignore[attr-defined]
            p.summed_grad = None  # type: ignore[attr-defined]
    mean = sum(losses) / len(losses) if losses else float("nan")
    return TrainResult(mean, plan.local_steps, empty)


def subject_loss(
    ldm: LDM, settings: TrainSettings, generator: torch.Generator
) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
    """The loss DP-SGD differentiates: over b subjects' K slices each, with M draws per slice, the
    mean over the b·K·M rows, subject-major (so group_by_subject can take each subject's mean)."""
    device = ldm.device
    m = settings.noise_draws
    has = branches(ldm.denoiser.unet)  # common/branches.py

    def loss_of(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        images, conditions, masks, sources = (
            batch  # -> [b, K, 1, 64, 64], [b, K, 7], [b, K, 64, 64], [b, K, 5, 1, 64, 64]
        )
        images = images.flatten(0, 1).to(device)  # -> [b·K, 1, 64, 64], subject-major
        conditions = conditions.flatten(0, 1).to(device)  # -> [b·K, 7]
        latents = encode(ldm.vae, images, ldm.settings.scale_factor, generator)  # -> [b·K, 4, 16, 16]
        # M draws of (ε, t) per slice: each row below gets its own in ldm_loss.
        latents = latents.repeat_interleave(m, dim=0)  # -> [b·K·M, 4, 16, 16], still subject-major
        conditions = conditions.repeat_interleave(m, dim=0)  # -> [b·K·M, 7]
        row_masks = (
            masks.flatten(0, 1).to(device).repeat_interleave(m, dim=0) if has.mask else None
        )  # -> [b·K·M, 64, 64]
        row_sources = None
        if has.sources:  # the subject's other contrasts at the same position (common/source_branch.py)
            source_latents = encode_sources(
                ldm.vae, sources.flatten(0, 1).to(device), ldm.settings.scale_factor, generator
            )
            row_sources = source_latents.repeat_interleave(m, dim=0)  # -> [b·K·M, 5, 4, 16, 16]
        return ldm_loss(
            model, ldm.scheduler, latents, conditions, generator, settings.drop_prob, settings.min_snr_gamma,
            row_masks, row_sources,
        )  # fmt: skip

    return loss_of


def train_round(
    ldm: LDM,
    slices: SiteSlices,
    plan: RoundPlan,
    settings: TrainSettings = TrainSettings(),
    randomness: RoundRandomness | None = None,
) -> TrainResult:
    """Run plan.local_steps DP-SGD steps on ldm.denoiser's trainable tensors, in place, over the
    site's training subjects (one item per subject: K slices, sites/datasets.SubjectDataset)."""
    randomness = RoundRandomness() if randomness is None else randomness
    k, m = settings.slices_per_subject, settings.noise_draws
    dataset = SubjectDataset(slices, seed=randomness.torch_seed, slices_per_subject=k)
    generator = torch.Generator(device=ldm.device).manual_seed(randomness.torch_seed)
    denoiser = ldm.denoiser.train()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=plan.learning_rate)
    loss_of = subject_loss(ldm, settings, generator)
    return run_dp_steps(denoiser, optimizer, loss_of, dataset, plan, randomness, settings.proximal_mu, k * m)


def collate(items: Sequence[Batch]) -> Batch:
    images, conditions, masks, sources = zip(*items, strict=True)
    return torch.stack(images), torch.stack(conditions), torch.stack(masks), torch.stack(sources)
