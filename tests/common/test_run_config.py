"""The run config: RunConfig is the one source of defaults, and pyproject's table says the same."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import tomllib

from common.run_config import RunConfig

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_run_config_lists_every_key_with_runconfigs_default() -> None:
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig().to_flower()
    assert set(table) == set(defaults), set(table) ^ set(defaults)
    for key, value in table.items():
        assert value == defaults[key], f"pyproject {key} = {value!r}, RunConfig has {defaults[key]!r}"


@pytest.mark.parametrize("key", ["slices_per_subject", "noise_draws"])
def test_multiplicity_must_be_at_least_one(key: str) -> None:
    assert getattr(RunConfig(), key) >= 1
    with pytest.raises(ValueError, match=f"'{key.replace('_', '-')}' must be >= 1"):
        dataclasses.replace(RunConfig(), **{key: 0})
