"""Screen client updates before aggregation: keys, shapes, dtypes, finite values, norm bound."""

from __future__ import annotations

import torch


def update_problem(
    update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], max_update_norm: float
) -> str | None:
    """None if `update` may be aggregated, else why not (one line, for the server log)."""
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        return f"keys differ from the global model (missing {missing[:3]}, unexpected {extra[:3]})"
    squared = 0.0
    for name, ref in reference.items():
        value = update[name]
        if value.shape != ref.shape:
            return f"{name}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"{name}: dtype {value.dtype}, expected {ref.dtype}"
        if not torch.isfinite(value).all():
            return f"{name}: NaN or Inf values"
        squared += float(((value.double() - ref.double()) ** 2).sum())
    norm = squared**0.5
    if norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_update_norm:g}"
    return None
