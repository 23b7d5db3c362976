"""The optimisation loop shared by fedmri's measuring networks (the evaluator and the lesion segmenter)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def fit(
    net: nn.Module,
    steps: int,
    learning_rate: float,
    loss_at: Callable[[], torch.Tensor],
    progress: Callable[[int, int, float], None] | None = None,
) -> nn.Module:
    """`steps` AdamW steps (weight decay 1e-4) on `loss_at()` under a one-cycle schedule; -> net in eval mode."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    for step in range(1, steps + 1):
        loss = loss_at()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress:
            progress(step, steps, loss.item())
    return net.eval()
