"""`fedmri translate` and the model side of missing-sequence synthesis (common/translate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from common.cli_translate import output_name
from common.conditions import Modality
from common.model import load_ldm
from common.translate import Target, source_latents, translate_slices
from simulation.cli import app
from tests.sites.test_volume import grid, rotation, write_scan


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One head: an oblique T1w (the reference), an axis-aligned T2w and FLAIR, with a sidecar."""
    root = tmp_path_factory.mktemp("subject")
    affine, shape = grid(3.0, rotation(12, 8), (200, 230, 180))
    straight, straight_shape = grid(2.5, np.eye(3), (190, 220, 170))
    files = {
        "T1w": write_scan(root / "sub-07_ses-1_T1w.nii.gz", affine, shape),
        "T2w": write_scan(root / "sub-07_ses-1_T2w.nii.gz", straight, straight_shape),
        "FLAIR": write_scan(root / "sub-07_ses-1_FLAIR.nii.gz", straight, straight_shape),
    }
    (root / "sub-07_ses-1_T1w.json").write_text(json.dumps({"MagneticFieldStrength": 0.3}))
    return files


def test_translate_returns_a_volume_with_the_inputs_affine_and_shape(
    source_base: Path, subject: dict[str, Path], tmp_path: Path
) -> None:
    """An oblique T1w and a T2w on another grid in, a FLAIR out on the T1w's own (oblique) grid,
    with a sidecar that says it is synthetic and a PNG beside it."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "translate", "--model", str(source_base), "--input", str(subject["T1w"]), "--input", str(subject["T2w"]),
        "--to", "FLAIR", "--real", str(subject["FLAIR"]), "--out", str(out), "--steps", "2",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    written = nib.load(out / "sub-07_ses-1_desc-synthetic_FLAIR.nii.gz")
    reference = nib.load(subject["T1w"])
    assert written.shape == reference.shape and np.array_equal(written.affine, reference.affine)
    volume = written.get_fdata()
    assert np.isfinite(volume).all() and volume.min() >= 0 and volume.max() <= 1 and volume.max() > 0
    sidecar = json.loads((out / "sub-07_ses-1_desc-synthetic_FLAIR.json").read_text())
    assert sidecar["Synthetic"] is True and "SYNTHETIC FLAIR" in sidecar["Description"]
    assert sidecar["MagneticFieldStrength"] == 0.3  # from the T1w's sidecar
    assert [s["modality"] for s in sidecar["Sources"]] == ["T1w", "T2w"]
    assert (out / "sub-07_ses-1_desc-synthetic_FLAIR.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "T1w"], "nothing to synthesize"),
        (["--to", "FLAIR", "--input", "T1w={T2w}"], "given more than once"),
        (["--to", "FLAIR", "--input", "{T2w}x"], "MODALITY=PATH"),
        (["--to", "FLAIR", "--field", "-1"], "field_strength must be a positive"),
        (["--to", "T3w"], "T3w"),
    ],
)
def test_what_cannot_be_translated_is_refused_by_name(
    source_base: Path, subject: dict[str, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    args = [a.format(**{k: str(v) for k, v in subject.items()}) for a in args]
    result = CliRunner().invoke(
        app, ["translate", "--model", str(source_base), "--input", str(subject["T1w"]), "--out", str(tmp_path), *args]
    )
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not list(tmp_path.iterdir())


def test_a_model_without_the_source_branch_is_refused(
    tiny_base: Path, subject: dict[str, Path], tmp_path: Path
) -> None:
    result = CliRunner().invoke(app, [
        "translate", "--model", str(tiny_base), "--input", str(subject["T1w"]), "--to", "FLAIR", "--out", str(tmp_path),
    ])  # fmt: skip
    assert result.exit_code == 2 and "no source branch" in " ".join(result.output.split())


def test_each_source_steers_its_own_slot_and_a_seed_gives_one_volume(source_base: Path) -> None:
    ldm = load_ldm(source_base)
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 64, 64)).astype(np.float32)  # T1w and T2w, 3 slices
    latents = source_latents(ldm, images, [Modality.T1w, Modality.T2w])
    given = ~latents.isnan().flatten(2).all(2)  # -> [3, 5]
    assert given.tolist() == [[True, False, True, False, False]] * 3
    target, positions = Target(Modality.FLAIR, 3.0), np.array([0.7, np.nan, 0.4])
    first = translate_slices(ldm, images, [Modality.T1w, Modality.T2w], positions, target, steps=2, seed=3)
    again = translate_slices(ldm, images, [Modality.T1w, Modality.T2w], positions, target, steps=2, seed=3)
    other = images.copy()
    other[1] = rng.random((3, 64, 64))
    changed = translate_slices(ldm, other, [Modality.T1w, Modality.T2w], positions, target, steps=2, seed=3)
    assert first.shape == (3, 64, 64) and np.array_equal(first, again)
    assert np.abs(changed - first).mean() > 1e-3  # another T2w, another FLAIR


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sub-01_T1w.nii.gz", "sub-01_desc-synthetic_FLAIR"),
        ("sub-01_ses-2_ce-gadolinium_T1w.nii.gz", "sub-01_ses-2_desc-synthetic_FLAIR"),
        ("scan.nii.gz", "synthetic_FLAIR"),
    ],
)
def test_the_output_is_named_after_the_references_entities(name: str, expected: str) -> None:
    assert output_name(Path(name), "FLAIR") == expected
