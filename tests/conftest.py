"""Shared fixtures: the `tiny` scenario's synthetic sites, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from sites import scenarios
from sites.cli import make_scenario_sites


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding tiny-a (3 T, glioma), tiny-b (0.3 T) and tiny-public, as BIDS + YAML."""
    out = tmp_path_factory.mktemp("tiny-sites")
    make_scenario_sites(scenarios.create("tiny").all_sites, out, workers=2)
    return out
