"""Generation that follows lesion masks: paired NIfTI, the grid's outlines, and the CLI's choices."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from common.conditions import Modality, Pathology
from common.generate import read_mask_slices, to_volume
from common.model import load_ldm
from common.sampling import sample
from simulation.cli import app


def _mask(rows: slice, cols: slice, label: int = 2) -> np.ndarray:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[rows, cols] = label
    return mask


def test_masks_round_trip_through_the_samples_layout(tmp_path: Path) -> None:
    masks = np.stack([_mask(slice(5, 20), slice(30, 40), 1), _mask(slice(40, 50), slice(2, 9), 3)])
    nib.save(to_volume(masks, 220 / 64), tmp_path / "m.nii.gz")
    assert np.array_equal(read_mask_slices(tmp_path / "m.nii.gz", 64), masks)
    brats = np.asarray(to_volume(masks, 220 / 64).dataobj).copy()
    brats[brats == 3] = 4  # an older BraTS enhancing label
    nib.save(nib.Nifti1Image(brats, np.eye(4)), tmp_path / "b.nii.gz")
    assert np.array_equal(read_mask_slices(tmp_path / "b.nii.gz", 64), masks)


@pytest.mark.parametrize(
    ("volume", "message"),
    [(np.zeros((240, 240, 155), np.uint8), r"shape \(240, 240, 155\).*64 x 64"), (np.full((64, 64), 7.0), r"\[7.0\]")],
)
def test_a_mask_off_the_model_grid_or_with_other_labels_is_refused_by_name(
    tmp_path: Path, volume: np.ndarray, message: str
) -> None:
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    with pytest.raises(ValueError, match=message) as refused:
        read_mask_slices(path, 64)
    assert str(path) in str(refused.value)


def test_the_sampler_reads_each_images_mask(masked_base: Path) -> None:
    ldm = load_ldm(masked_base)
    conditions = torch.full((2, 7), float("nan"))
    masks = torch.from_numpy(np.stack([_mask(slice(10, 30), slice(10, 30))] * 2))
    other = torch.from_numpy(np.stack([_mask(slice(40, 60), slice(40, 60))] * 2))
    first = sample(ldm, conditions, steps=2, masks=masks)
    assert torch.equal(first, sample(ldm, conditions, steps=2, masks=masks))  # same seed, same images
    assert not torch.equal(first, sample(ldm, conditions, steps=2, masks=other))


def test_generate_writes_paired_images_and_masks_from_the_public_prior(masked_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["generate", "--model", str(masked_base), "--out", str(out), "--steps", "2"]
    result = CliRunner().invoke(
        app, [*args, "--prompt", "FLAIR, 3T", "--lesion", "glioma, 3 cm, left frontal", "-n", "2"]
    )
    assert result.exit_code == 0, result.output
    images = nib.load(out / "samples.nii.gz")
    masks = read_mask_slices(out / "samples_mask.nii.gz", 64)
    assert images.shape == (64, 64, 2) and masks.shape == (2, 64, 64)
    assert np.allclose(images.affine, nib.load(out / "samples_mask.nii.gz").affine)
    assert all(set(np.unique(m).tolist()) == {0, 1, 2, 3} for m in masks)
    assert not np.array_equal(masks[0], masks[1])  # two draws of the same request
    records = json.loads((out / "samples.json").read_text())
    assert [r["lesion"] for r in records] == ["glioma, 30 mm, left frontal"] * 2
    assert {r["modality"] for r in records} == {Modality.FLAIR.value} and {r["pathology"] for r in records} == {
        "glioma"
    }
    assert (out / "grid.png").stat().st_size > 5_000
    # Random plausible masks, then the same masks given back as a file: the same images.
    again = tmp_path / "again"
    result = CliRunner().invoke(app, [*args[:-4], "--out", str(again), "--steps", "2", "--prompt", "T2w, glioma",
                                      "--mask", str(out / "samples_mask.nii.gz")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_mask_slices(again / "samples_mask.nii.gz", 64), masks)
    drawn = tmp_path / "random"
    result = CliRunner().invoke(app, [*args[:-4], "--out", str(drawn), "--steps", "2", "--random-masks", "4"])
    assert result.exit_code == 0, result.output
    pathologies = {r["pathology"] for r in json.loads((drawn / "samples.json").read_text())}
    assert pathologies <= {Pathology.glioma.value, Pathology.ms.value}
    assert all((m > 0).any() for m in read_mask_slices(drawn / "samples_mask.nii.gz", 64))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "healthy T1w", "--lesion", "glioma"], "prompt says healthy but the lesion is glioma"),
        (["--prompt", "T1w", "--mask", "MASK"], "say in --prompt which lesion it outlines"),
        (["--grid", "--random-masks", "2"], "choose one of --grid, --random-masks"),
        (["--lesion", "glioma, 3 cm, left occipital, 0.95"], "lesion request"),
    ],
)
def test_generate_refuses_what_cannot_be_followed(
    masked_base: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    mask = tmp_path / "mask.nii.gz"
    nib.save(to_volume(_mask(slice(10, 20), slice(10, 20))[None], 220 / 64), mask)
    extra = [str(mask) if e == "MASK" else e for e in extra]
    result = CliRunner().invoke(app, ["generate", "--model", str(masked_base), "--out", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_a_model_without_the_branch_is_refused_before_sampling(tiny_base: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["generate", "--model", str(tiny_base), "--out", str(tmp_path / "o"), "--random-masks", "1"]
    )
    assert result.exit_code == 2 and "has no mask branch" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o").exists()
