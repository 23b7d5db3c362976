"""A subject's scans on one slice grid and back (sites/subject_stack.py), on an analytic head in world mm."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.conditions import Modality
from sites.subject_stack import SourceScan, parse_source, resample_onto, stack_scans, to_scan_grid
from sites.volume import SiteDataError
from tests.sites.test_volume import grid, rotation, write_scan


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same head as an oblique 2 mm scan, an axis-aligned 1.5 x 1.5 x 3 mm scan stored LPS,
    and a copy moved 12 mm to the left (a different head position)."""
    root = tmp_path_factory.mktemp("stack")
    oblique_affine, oblique_shape = grid(2.0, rotation(15, 10), (200, 230, 190))
    lps_shape = (126, 146, 56)  # 1.5 x 1.5 x 3 mm voxels; x runs right to left, y anterior to posterior
    lps = np.diag([-1.5, -1.5, 3.0, 1.0])
    lps[:3, 3] = -lps[:3, :3] @ ((np.array(lps_shape) - 1) / 2)
    oblique = write_scan(root / "sub-01_T1w.nii.gz", oblique_affine, oblique_shape)
    moved = oblique_affine.copy()
    moved[0, 3] += 12.0  # the same voxels said to lie 12 mm further right: the head has moved
    nib.save(nib.Nifti1Image(np.asarray(nib.load(oblique).dataobj), moved), root / "sub-01_FLAIR.nii.gz")
    return {
        "oblique": oblique,
        "lps": write_scan(root / "sub-01_T2w.nii.gz", lps, lps_shape),
        "moved": root / "sub-01_FLAIR.nii.gz",
    }


def _brain(stack_images: np.ndarray) -> np.ndarray:
    return stack_images > 0.2


def test_scans_on_other_grids_land_on_the_references_pixels(scans: dict[str, Path]) -> None:
    """The same head, oblique at 2 mm and LPS at 1.5 x 1.5 x 3 mm, gives the same pixels up to
    interpolation; the head moved by 12 mm does not."""
    stack = stack_scans([SourceScan(scans["oblique"], Modality.T1w), SourceScan(scans["lps"], Modality.T2w)], 64, 220.0)
    moved = resample_onto(scans["moved"], stack)
    reference, other = stack.images
    inside = _brain(reference)
    same = np.abs(reference - other)[inside].mean()
    shifted = np.abs(reference - moved)[inside].mean()
    print(f"mean |difference| in the brain: other grid {same:.4f}, moved 12 mm {shifted:.4f}")
    assert same < 0.03 and shifted > 3 * same
    assert stack.images.shape[1] == len(stack.positions) == stack.kept[1] - stack.kept[0] + 1


@pytest.mark.parametrize("reference", ["oblique", "lps"])
def test_slices_go_back_to_the_reference_files_own_shape_affine_and_voxels(
    scans: dict[str, Path], reference: str
) -> None:
    """Unslicing inverts slicing: the reference's own slices, put back, match the file's voxels
    (normalised) inside the brain, on its own grid (oblique, or stored LPS); put back mirrored,
    or one slice off, they do not."""
    stack = stack_scans([SourceScan(scans[reference], Modality.T1w)], 64, 220.0)
    image = to_scan_grid(stack.images[0], stack)
    original = nib.load(scans[reference])
    assert image.shape == original.shape and np.array_equal(image.affine, original.affine)
    assert image.header.get_sform(coded=True)[1] == 1 and image.header.get_qform(coded=True)[1] == 1
    voxels = np.asarray(original.dataobj, dtype=np.float32)
    normalised = voxels / np.percentile(voxels[voxels > 0.1 * np.percentile(voxels, 99)], 99.5)
    back = image.get_fdata()
    inside = (normalised > 0.3) & (back > 0)  # the brain, within the kept slab
    assert inside.sum() > 20_000

    def error(volume: np.ndarray) -> float:
        return float(np.abs(volume - normalised)[inside].mean())

    mirrored = error(to_scan_grid(stack.images[0][:, :, ::-1], stack).get_fdata())
    shifted = replace(stack, kept=(stack.kept[0] + 1, stack.kept[1] + 1))
    one_off = error(to_scan_grid(stack.images[0], shifted).get_fdata())
    print(f"{reference}: mean |difference| in the brain: put back {error(back):.4f}, mirrored {mirrored:.4f}, "
          f"one slice off {one_off:.4f}")  # fmt: skip
    assert error(back) < 0.035 and mirrored > 2 * error(back) and one_off > 1.5 * error(back)


def test_a_scan_that_reaches_only_part_of_the_slab_is_not_given_beyond_it(
    scans: dict[str, Path], tmp_path: Path
) -> None:
    """A T2w that stops 40 mm below the top of the reference's head: those slices have no T2w
    (NaN, as a missing source in training), the others do."""
    original = nib.load(scans["lps"])
    data = np.asarray(original.dataobj)
    keep = data.shape[2] - 14  # drop the top 14 slices of 3 mm
    partial = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(nib.Nifti1Image(data[:, :, :keep], original.affine), partial)
    stack = stack_scans([SourceScan(scans["oblique"], Modality.T1w), SourceScan(partial, Modality.T2w)], 64, 220.0)
    missing = np.isnan(stack.images[1]).all((1, 2))
    assert 0 < missing.sum() < len(missing) and not np.isnan(stack.images[0]).any()
    assert not np.isnan(stack.images[1][~missing]).any()
    top = stack.positions[missing]  # the slices without a T2w are the top ones
    assert top.min() > stack.positions[~missing].max()


def test_a_scan_that_does_not_overlap_the_reference_is_refused(scans: dict[str, Path], tmp_path: Path) -> None:
    original = nib.load(scans["oblique"])
    affine = original.affine.copy()
    affine[:3, 3] += 2000.0  # the same head, said to lie two metres away
    far = tmp_path / "far.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(original.dataobj), affine), far)
    with pytest.raises(SiteDataError, match="does not overlap"):
        stack_scans([SourceScan(scans["oblique"], Modality.T1w), SourceScan(far, Modality.T2w)], 64, 220.0)


@pytest.mark.parametrize(
    ("text", "modality"),
    [
        ("sub-01_T1w.nii.gz", Modality.T1w),
        ("a/b/sub-01_ses-2_ce-gadolinium_T1w.nii.gz", Modality.T1ce),
        ("sub-01_FLAIR.nii", Modality.FLAIR),
        ("PDw=scan.nii.gz", Modality.PDw),
        ("T2w=sub-01_T1w.nii.gz", Modality.T2w),  # said explicitly: the name is not read
    ],
)
def test_the_input_contrast_comes_from_the_bids_suffix_or_is_said(text: str, modality: Modality) -> None:
    assert parse_source(text).modality is modality


@pytest.mark.parametrize("text", ["scan.nii.gz", "sub-01_bold.nii.gz", "T3w=scan.nii.gz"])
def test_an_input_whose_contrast_cannot_be_told_is_refused_with_the_way_out(text: str) -> None:
    with pytest.raises(ValueError, match="MODALITY=PATH"):
        parse_source(text)
