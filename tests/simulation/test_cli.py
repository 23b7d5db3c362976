"""The `fedmri` command line, run as a user would (in-process through typer's runner)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from simulation.cli import app

runner = CliRunner()


def test_help_explains_every_command() -> None:
    result = runner.invoke(app, ["sites", "make", "--help"])
    assert result.exit_code == 0
    assert "BIDS" in result.output and "--scenario" in result.output


def test_sites_make_single_yaml_then_summary(tiny_sites: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["sites", "make", "--site", str(tiny_sites / "tiny-b.yaml"), "--subjects", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny-b" / "participants.tsv").exists()
    assert (tmp_path / "tiny-b_contact_sheet.png").exists()
    result = runner.invoke(app, ["sites", "summary", "--json", str(tmp_path / "tiny-b.yaml")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tiny-b"]["subjects"] == 2


def test_unknown_scenario_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sites", "make", "--scenario", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown scenario 'nope'" in result.output and "demo" in result.output
