"""Fine-tuning modes (full, attention, lora, conditioning) and the tensors that travel: exactly the trainable ones."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from common.branches import branches
from common.model import Denoiser
from common.protocol import FinetuneMode, parse


def parse_mode(text: str) -> FinetuneMode:
    return parse(FinetuneMode, text, "fine-tuning mode")


class LoRALinear(nn.Module):
    """y = W x + b + (α / r) B A x with W, b frozen, A: in -> r, B: r -> out, B initialised to zero.

    A and B are plain nn.Linear layers, so Opacus computes their per-sample gradients with its
    standard Linear grad sampler (no PEFT: see opacus #820).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        where = {"device": base.weight.device, "dtype": base.weight.dtype}  # beside the frozen layer, GPU or not
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, **where)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, **where)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(x)) * self.scale

    def merged(self) -> nn.Linear:
        """The equivalent single nn.Linear (W + (α/r) B A)."""
        merged = nn.Linear(
            self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
            device=self.base.weight.device, dtype=self.base.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.scale * self.lora_up.weight @ self.lora_down.weight)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


def _attention_modules(denoiser: Denoiser) -> list[tuple[str, nn.Module]]:
    """The self- and cross-attention blocks of the UNet (diffusers names them attn1 / attn2)."""
    return [(n, m) for n, m in denoiser.unet.named_modules() if n.endswith(("attn1", "attn2"))]


def configure(denoiser: Denoiser, mode: FinetuneMode, lora_rank: int = 4) -> Denoiser:
    """Freeze everything but the mode's tensors (adding LoRA adapters for `lora`), in place. A UNet
    with an input branch (mask, sources: common/branches.py) also trains its widened conv_in,
    whatever the mode."""
    denoiser.requires_grad_(False)
    denoiser.encoder.requires_grad_(True)
    if mode is FinetuneMode.conditioning:
        pass  # the encoder only
    elif mode is FinetuneMode.full:
        denoiser.unet.requires_grad_(True)
    elif mode is FinetuneMode.attention:
        for _, attention in _attention_modules(denoiser):
            attention.requires_grad_(True)
    elif mode is FinetuneMode.lora:
        for _, attention in _attention_modules(denoiser):
            for name in ("to_q", "to_k", "to_v"):
                setattr(attention, name, LoRALinear(getattr(attention, name), lora_rank))
            to_out = cast(nn.ModuleList, attention.to_out)
            to_out[0] = LoRALinear(cast(nn.Linear, to_out[0]), lora_rank)
        for module in denoiser.unet.modules():
            if isinstance(module, LoRALinear):
                module.lora_down.requires_grad_(True)
                module.lora_up.requires_grad_(True)
    else:  # pragma: no cover - exhaustive over FinetuneMode
        raise ValueError(mode)
    has = branches(denoiser.unet)
    if has.mask or has.sources:  # the branches' input weights train in every mode
        denoiser.unet.conv_in.requires_grad_(True)
    return denoiser


def merge_lora(denoiser: Denoiser) -> Denoiser:
    """Fold every LoRA adapter into its base layer, in place, so plain diffusers can load the UNet."""
    for _, attention in _attention_modules(denoiser):
        for name in ("to_q", "to_k", "to_v"):
            layer = getattr(attention, name)
            if isinstance(layer, LoRALinear):
                setattr(attention, name, layer.merged())
        to_out = cast(nn.ModuleList, attention.to_out)
        if isinstance(to_out[0], LoRALinear):
            to_out[0] = to_out[0].merged()
    return denoiser


def trainable_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the tensors that are federated: detached CPU copies of the trainable parameters."""
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy federated tensors into `module`; names, shapes and dtypes must match exactly."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"trainable tensors do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            target = params[name]
            if value.shape != target.shape or value.dtype != target.dtype:
                raise ValueError(
                    f"tensor {name}: got {tuple(value.shape)} {value.dtype}, model has {tuple(target.shape)} {target.dtype}"
                )
            target.copy_(value)
