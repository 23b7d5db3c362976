"""The condition encoder: per-slice attributes -> a short token sequence for cross-attention."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from common.conditions import CONDITION_VECTOR, Modality, Pathology

# Attribute groups dropped together for classifier-free guidance, as columns of CONDITION_VECTOR.
ATTRIBUTE_GROUPS = {
    "modality": [0],
    "pathology": [1],
    "field_strength": [2],
    "timing": [3, 4, 5],  # TR, TE, TI
    "slice_position": [6],
}
NUM_TOKENS = len(ATTRIBUTE_GROUPS)


def fourier(x: torch.Tensor, n_freq: int) -> torch.Tensor:
    """[B] -> [B, 1 + 2 n_freq]: x and sin/cos at octave frequencies (Tancik et al. 2020)."""
    freqs = 2.0 ** torch.arange(n_freq, dtype=x.dtype, device=x.device) * math.pi
    angles = x[:, None] * freqs
    return torch.cat([x[:, None], angles.sin(), angles.cos()], dim=1)


class ConditionEncoder(ModelMixin, ConfigMixin):
    """Encode a condition vector [B, 7] (CONDITION_VECTOR, NaN = unknown) into tokens [B, 5, dim].

    One token per attribute group. Field strength enters as Fourier features of log(B0 / 1.5 T),
    so unseen strengths interpolate; TR/TE/TI as logs of seconds. An unknown (or dropped)
    attribute selects a learned "unknown" embedding instead. Every parameter sits in an
    Embedding, Linear or LayerNorm, so Opacus computes per-sample gradients for all of them.
    """

    @register_to_config
    def __init__(self, dim: int = 64, n_freq: int = 6) -> None:
        super().__init__()
        self.modality = nn.Embedding(len(Modality) + 1, dim)  # last row: unknown
        self.pathology = nn.Embedding(len(Pathology) + 1, dim)
        self.field = nn.Sequential(nn.Linear(1 + 2 * n_freq, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.timing = nn.Sequential(nn.Linear(4, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.position = nn.Sequential(nn.Linear(1 + 2 * n_freq, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.unknown = nn.Embedding(3, dim)  # rows: field, timing, position
        self.token_type = nn.Embedding(NUM_TOKENS, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, conditions: torch.Tensor) -> torch.Tensor:
        n_freq = self.config["n_freq"]
        batch = conditions.shape[0]
        known = ~torch.isnan(conditions)  # -> [B, 7]
        c = torch.nan_to_num(conditions, nan=0.0)

        modality = torch.where(known[:, 0], c[:, 0], float(len(Modality))).long()
        pathology = torch.where(known[:, 1], c[:, 1], float(len(Pathology))).long()
        field = self.field(fourier(torch.log(c[:, 2].clamp_min(1e-3) / 1.5), n_freq))
        ti_known = known[:, 5].float()
        timing_features = torch.stack(
            [
                torch.log(c[:, 3].clamp_min(1e-4)),
                torch.log(c[:, 4].clamp_min(1e-4)),
                torch.log(c[:, 5].clamp_min(1e-4)) * ti_known,
                ti_known,
            ],
            1,
        )
        timing = self.timing(timing_features)
        position = self.position(fourier(c[:, 6] * 2.0 - 1.0, n_freq))

        unknown = self.unknown(torch.arange(3, device=c.device).expand(batch, 3))  # -> [B, 3, dim]
        field = torch.where(known[:, 2:3], field, unknown[:, 0])
        timing = torch.where(known[:, 3:5].all(1, keepdim=True), timing, unknown[:, 1])
        position = torch.where(known[:, 6:7], position, unknown[:, 2])

        tokens = torch.stack([self.modality(modality), self.pathology(pathology), field, timing, position], 1)
        types = self.token_type(torch.arange(NUM_TOKENS, device=c.device).expand(batch, NUM_TOKENS))
        return self.norm(tokens + types)  # -> [B, 5, dim]


def drop_attributes(conditions: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Set each attribute group to unknown (NaN) independently with probability p.

    Training with dropped attributes gives one model that is conditional on any subset of
    them, which classifier-free guidance needs (Ho & Salimans 2022, §3.2) and which lets partial
    prompts ("FLAIR" alone, or "glioma at 0.3T") work.
    """
    out = conditions.clone()
    drop = torch.rand(conditions.shape[0], NUM_TOKENS, generator=generator, device=conditions.device) < p  # -> [B, 5]
    for g, columns in enumerate(ATTRIBUTE_GROUPS.values()):
        for col in columns:
            out[drop[:, g], col] = float("nan")
    return out


def unconditional(batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """All attributes unknown: the unconditional branch of classifier-free guidance. -> [B, 7]"""
    return torch.full((batch, len(CONDITION_VECTOR)), float("nan"), device=device)
