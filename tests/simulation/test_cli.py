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


def test_generate_writes_nifti_json_and_grid(tiny_base: Path, tmp_path: Path) -> None:
    import nibabel as nib

    out = tmp_path / "gen"
    args = [
        "generate",
        "--model",
        str(tiny_base),
        "--prompt",
        "axial FLAIR, 0.3T, glioma",
        "-n",
        "3",
        "--steps",
        "3",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    volume = nib.load(out / "samples.nii.gz")
    assert volume.shape == (64, 64, 3)  # slices stacked along the last axis
    records = json.loads((out / "samples.json").read_text())
    assert [r["modality"] for r in records] == ["FLAIR"] * 3 and records[0]["pathology"] == "glioma"
    assert {"modality", "pathology", "field_strength", "prompt", "seed", "guidance_scale"} <= set(records[0])
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"
    grid = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_base),
            "--grid",
            "--field",
            "0.3",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "grid"),
        ],
    )
    assert grid.exit_code == 0, grid.output
    assert nib.load(tmp_path / "grid" / "samples.nii.gz").shape[-1] == 5 * 4  # modalities x pathologies
    bad = runner.invoke(
        app, ["generate", "--model", str(tiny_base), "--prompt", "FLAIR banana", "--out", str(tmp_path / "bad")]
    )
    assert bad.exit_code == 2 and "unknown words" in bad.output
