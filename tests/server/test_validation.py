"""Update screening: every kind of bad update is named; good ones pass."""

from __future__ import annotations

import pytest
import torch

from server.validation import update_problem

GLOBAL = {"a.weight": torch.zeros(4, 3), "b.bias": torch.zeros(3)}


def test_good_update_passes() -> None:
    assert update_problem({k: v + 0.1 for k, v in GLOBAL.items()}, GLOBAL, max_update_norm=10.0) is None


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"a.weight": torch.full((4, 3), float("nan")), "b.bias": torch.zeros(3)}, "a.weight: NaN or Inf"),
        ({"a.weight": torch.zeros(3, 4), "b.bias": torch.zeros(3)}, r"a.weight: shape \(3, 4\), expected \(4, 3\)"),
        (
            {"a.weight": torch.zeros(4, 3, dtype=torch.float64), "b.bias": torch.zeros(3)},
            "a.weight: dtype torch.float64",
        ),
        ({"a.weight": torch.full((4, 3), 1e4), "b.bias": torch.zeros(3)}, "update norm .* exceeds the bound 10"),
        ({"a.weight": torch.zeros(4, 3)}, r"keys differ .*missing \['b.bias'\]"),
    ],
)
def test_bad_updates_are_rejected_with_the_reason(update: dict, reason: str) -> None:
    problem = update_problem(update, GLOBAL, max_update_norm=10.0)
    assert problem is not None
    assert __import__("re").search(reason, problem), problem
