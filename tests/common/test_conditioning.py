"""The condition encoder and attribute dropping for classifier-free guidance."""

from __future__ import annotations

import torch

from common.conditioning import NUM_TOKENS, ConditionEncoder, drop_attributes, unconditional

ROW = torch.tensor([[3.0, 1.0, 0.3, 9.0, 0.12, 2.4, 0.5]])


def test_encoder_gives_one_token_per_attribute_group() -> None:
    tokens = ConditionEncoder(dim=32)(torch.cat([ROW, unconditional(2)]))
    assert tokens.shape == (3, NUM_TOKENS, 32)
    assert torch.isfinite(tokens).all()


def test_unknown_attributes_use_learned_embeddings_not_values() -> None:
    encoder = ConditionEncoder(dim=32)
    a, b = ROW.clone(), ROW.clone()
    a[0, 2], b[0, 2] = float("nan"), float("nan")  # field unknown in both ...
    b[0, 0] = 0.0  # ... modality differs
    ta, tb = encoder(a), encoder(b)
    assert torch.allclose(ta[:, 2], tb[:, 2])  # same "unknown field" token
    assert not torch.allclose(ta[:, 0], tb[:, 0])


def test_field_strength_is_continuous() -> None:
    encoder = ConditionEncoder(dim=32)
    fields = torch.tensor([0.3, 0.31, 3.0])
    rows = ROW.repeat(3, 1)
    rows[:, 2] = fields
    tokens = encoder(rows)[:, 2]
    assert (tokens[0] - tokens[1]).norm() < (tokens[0] - tokens[2]).norm()


def test_drop_attributes_drops_whole_groups() -> None:
    rows = ROW.repeat(2000, 1)
    dropped = drop_attributes(rows, 0.3, torch.Generator().manual_seed(0))
    timing = torch.isnan(dropped[:, 3:6])
    assert (timing.all(1) | ~timing.any(1)).all()  # TR, TE, TI dropped together
    rate = torch.isnan(dropped[:, 0]).float().mean()
    assert 0.25 < rate < 0.35
    assert not torch.isnan(drop_attributes(rows, 0.0)).any()
    assert torch.isnan(drop_attributes(rows, 1.0)).all()
