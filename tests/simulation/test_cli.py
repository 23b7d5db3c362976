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


def test_evaluator_check_prints_the_confusion_on_labelled_scans(tiny_sites: Path, tmp_path: Path) -> None:
    import json
    import shutil

    # Arrange: a folder of "real" scans named <anything>_<modality>.nii.gz, plus a mask to skip.
    scans = sorted((tiny_sites / "tiny-a").glob("sub-*/anat/*.nii.gz"))
    t2 = next(p for p in scans if p.name.endswith("_T2w.nii.gz"))
    flair = next(p for p in scans if p.name.endswith("_FLAIR.nii.gz"))
    folder = tmp_path / "real"
    folder.mkdir()
    shutil.copy(t2, folder / "siteX_s1_T2w.nii.gz")
    shutil.copy(flair, folder / "siteX_s1_FLAIR.nii.gz")
    shutil.copy(flair, folder / "siteX_s1_lesionmask.nii.gz")
    # Act
    result = runner.invoke(app, ["evaluator", "check", "--real", str(folder), "--json", str(tmp_path / "c.json")])
    # Assert: both labelled files read, the mask skipped by name, the figures agree with the confusion.
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "modality confusion" in said and "skipped siteX_s1_lesionmask.nii.gz" in said
    record = json.loads((tmp_path / "c.json").read_text())
    confusion = record["confusion"]
    assert set(record["files"]) == {"siteX_s1_T2w.nii.gz", "siteX_s1_FLAIR.nii.gz"}
    assert sum(map(sum, confusion)) == record["slices"] > 0
    diagonal = sum(confusion[i][i] for i in range(len(confusion)))
    assert record["modality"] == diagonal / record["slices"]


def test_evaluator_check_with_no_labelled_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "scan_lesionmask.nii.gz").write_bytes(b"")
    result = runner.invoke(app, ["evaluator", "check", "--real", str(tmp_path)])
    assert result.exit_code == 2
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "no labelled NIfTI file" in said and "skipped: scan_lesionmask.nii.gz (no modality" in said


def test_release_vs_base_reports_the_mean_and_max_pixel_change(tmp_path: Path) -> None:
    import json

    import nibabel as nib
    import numpy as np

    from simulation.cli import _release_vs_base

    base = np.zeros((4, 4, 2), dtype=np.float32)
    release = base.copy()
    release[0, 0, 1] = 0.5  # one pixel of 32 changed by 0.5
    for name, volume in (("release", release), ("base", base)):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / name / "samples.nii.gz")
    change = _release_vs_base(tmp_path / "release", tmp_path / "base", tmp_path / "change.json")
    assert change["mean_abs_change"] == 0.5 / 32 and change["max_abs_change"] == 0.5
    assert json.loads((tmp_path / "change.json").read_text()) == change
