"""The client's BIDS reader: slices and conditions, datasets, caching, and every bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.conditions import CONDITION_VECTOR, Modality, Pathology
from sites.bids import OTHER, SiteDataError, SiteDataWarning, read_site
from sites.datasets import SliceDataset, SubjectDataset


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def site(tiny_sites: Path, tmp_path: Path) -> Path:
    """A private copy of tiny-b (0.3 T, 4 healthy subjects: T1w, T2w, FLAIR)."""
    return Path(shutil.copytree(tiny_sites / "tiny-b", tmp_path / "tiny-b"))


def test_reads_slices_with_conditions(tiny_sites: Path) -> None:
    slices = read_site(tiny_sites / "tiny-a", image_size=32, fov_mm=220.0)
    assert slices.images.shape[1:] == (32, 32)
    assert float(slices.images.min()) >= 0.0 and float(slices.images.max()) <= 1.0
    assert set(np.unique(slices.modality)) == {
        m.ordinal for m in (Modality.T1w, Modality.T1ce, Modality.T2w, Modality.FLAIR)
    }
    assert set(np.unique(slices.pathology)) == {Pathology.healthy.ordinal, Pathology.glioma.ordinal}
    assert np.all(slices.field_strength == 3.0)
    flair = slices.modality == Modality.FLAIR.ordinal
    assert np.all(np.isfinite(slices.inversion_time[flair])) and np.all(np.isnan(slices.inversion_time[~flair]))
    # Positions count down from the top of the head in steps of slice thickness / 144 mm.
    assert slices.slice_position.min() >= 0.0 and slices.slice_position.max() <= 1.0
    one_scan = np.sort(slices.slice_position[slices.scan == 0])
    thickness = abs(nib.load(next((tiny_sites / "tiny-a").glob("sub-*/anat/*_T1w.nii.gz"))).affine[2, 2])
    assert np.allclose(np.diff(one_scan), thickness / 144.0, atol=1e-6)
    assert slices.summary()["subjects"] == 4 and slices.summary()["unknown"] == {}
    conditions = slices.conditions()  # -> [N, 7]
    assert not np.isnan(np.delete(conditions, CONDITION_VECTOR.index("inversion_time"), axis=1)).any()


def test_a_focal_pathology_labels_only_the_slices_its_lesion_mask_reaches(tiny_sites: Path, tmp_path: Path) -> None:
    """tiny-a's glioma subjects: a slice is labelled glioma exactly where the subject's mask has at
    least MIN_LESION_VOXELS voxels in that slice (the phantom's mask shares the scan's grid)."""
    from sites.bids import MIN_LESION_VOXELS, brain_slab, foreground_of, lesion_mask_path

    root = tiny_sites / "tiny-a"
    slices = read_site(root, image_size=32)
    glioma_subjects = [i for i, s in enumerate(slices.subjects)
                       if (slices.pathology[slices.subject == i] == Pathology.glioma.ordinal).any()]  # fmt: skip
    assert glioma_subjects, "tiny-a should hold a glioma subject with a visible tumour"
    for i in glioma_subjects:
        subject = slices.subjects[i]
        scan = next(root.glob(f"{subject}/anat/{subject}_T2w.nii.gz"))
        data = np.asarray(nib.as_closest_canonical(nib.load(scan)).dataobj, dtype=np.float32)
        lo, hi, _ = brain_slab(data, foreground_of(data), nib.load(scan).header.get_zooms()[2])
        mask = np.asarray(nib.as_closest_canonical(nib.load(lesion_mask_path(root, subject))).dataobj) > 0
        expected = mask.sum((0, 1))[lo : hi + 1] >= MIN_LESION_VOXELS
        rows = (slices.subject == i) & (slices.modality == Modality.T2w.ordinal)
        labels = slices.pathology[rows]
        assert np.array_equal(labels == Pathology.glioma.ordinal, expected)
        assert set(labels.tolist()) == {Pathology.healthy.ordinal, Pathology.glioma.ordinal}
    # Without masks (a site that has none) every slice keeps the subject's label.
    bare = Path(shutil.copytree(root, tmp_path / "tiny-a", ignore=shutil.ignore_patterns("derivatives")))
    unmasked = read_site(bare, image_size=32)
    for i in glioma_subjects:
        assert np.all(unmasked.pathology[unmasked.subject == i] == Pathology.glioma.ordinal)


def test_reorientation_makes_lps_and_ras_sites_agree(tiny_sites: Path, tmp_path: Path) -> None:
    # tiny-a is stored LPS. Re-saving a scan as RAS must give the same slices.
    slices_lps = read_site(tiny_sites / "tiny-a", image_size=32)
    copy = Path(shutil.copytree(tiny_sites / "tiny-a", tmp_path / "tiny-a"))
    for path in copy.glob("sub-*/anat/*.nii.gz"):
        nib.save(nib.as_closest_canonical(nib.load(path)), path)
    slices_ras = read_site(copy, image_size=32)
    assert np.array_equal(slices_lps.images, slices_ras.images)


@pytest.mark.parametrize("k", [1, 3])
def test_subject_dataset_yields_k_slices_of_one_subject_per_item(tiny_sites: Path, k: int) -> None:
    slices = read_site(tiny_sites / "tiny-a", image_size=32)
    dataset = SubjectDataset(slices, seed=0, slices_per_subject=k)
    assert len(dataset) == 4
    for subject in range(4):
        images, conditions, masks, _sources = dataset[subject]  # sources: tests/sites/test_datasets.py
        assert images.shape == (k, 1, 32, 32) and images.min() >= -1.0 and images.max() <= 1.0
        assert conditions.shape == (k, len(CONDITION_VECTOR)) and masks.shape == (k, 32, 32)
        # Every slice really belongs to this subject: each matches one of the subject's slices,
        # and comes with that slice's lesion mask.
        own = torch.from_numpy(slices.images[slices.subject == subject].astype(np.float32)) * 2 - 1
        own_masks = torch.from_numpy(slices.lesion_mask[slices.subject == subject])
        for image, mask in zip(images, masks, strict=True):
            row = int((own - image).abs().flatten(1).max(1).values.argmin())
            assert (own[row] - image).abs().max() == 0 and torch.equal(own_masks[row], mask)
    assert len(SliceDataset(slices)) == len(slices)
    with pytest.raises(ValueError, match="slices_per_subject"):
        SubjectDataset(slices, slices_per_subject=0)


def test_cache_is_used_and_invalidated_outside_the_site(site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = _tree_digest(site)
    first = read_site(site, image_size=32, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    again = read_site(site, image_size=32, cache_dir=cache)
    assert np.array_equal(first.images, again.images)
    assert _tree_digest(site) == before
    # Changing a scan changes the cache key.
    path = site / "sub-001" / "anat" / "sub-001_T2w.nii.gz"
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), image.affine, image.header), path)
    read_site(site, image_size=32, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2
    with pytest.raises(SiteDataError, match="lies inside the site data"):
        read_site(site, image_size=16, cache_dir=site / "cache")


def _truncate(site: Path) -> Path:
    path = site / "sub-002" / "anat" / "sub-002_T1w.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _replace_volume(array: np.ndarray) -> Callable[[Path], Path]:
    def change(site: Path) -> Path:
        path = site / "sub-002" / "anat" / "sub-002_T2w.nii.gz"
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)
        return path

    return change


def _nan_volume(site: Path) -> Path:
    path = site / "sub-002" / "anat" / "sub-002_T2w.nii.gz"
    data = np.asarray(nib.load(path).dataobj).astype(np.float32)
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, nib.load(path).affine), path)
    return path


def _edit_sidecar(name: str, **fields: object) -> Callable[[Path], Path]:
    """Set (or, with None, delete) fields of sub-002's `name` sidecar."""

    def edit(site: Path) -> Path:
        path = site / "sub-002" / "anat" / f"sub-002_{name}.json"
        sidecar = json.loads(path.read_text()) | fields
        path.write_text(json.dumps({k: v for k, v in sidecar.items() if v is not None}))
        return path

    return edit


def _unknown_suffix(site: Path) -> Path:
    anat = site / "sub-002" / "anat"
    for ext in (".nii.gz", ".json"):
        (anat / f"sub-002_T2w{ext}").rename(anat / f"sub-002_T2starw{ext}")
    return anat / "sub-002_T2starw.nii.gz"


def _edit_participants(change: Callable[[list[dict]], list[dict]]) -> Callable[[Path], Path]:
    def edit(site: Path) -> Path:
        path = site / "participants.tsv"
        rows = change(list(csv.DictReader(path.read_text().splitlines(), delimiter="\t")))
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
        return path

    return edit


def _drop_subject(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["participant_id"] != "sub-002"]


def _label(label: str) -> Callable[[list[dict]], list[dict]]:
    def relabel(rows: list[dict]) -> list[dict]:
        for r in rows:
            if r["participant_id"] == "sub-002":
                r["pathology"] = label
        return rows

    return relabel


BAD_INPUTS = {
    "truncated gzip": (_truncate, "sub-002_T1w.nii.gz: corrupt or truncated NIfTI"),
    "NaN voxels": (_nan_volume, "sub-002_T2w.nii.gz: 1 NaN or Inf voxels"),
    "two volumes in one file": (
        _replace_volume(np.ones((8, 8, 8, 2), np.float32)),
        r"sub-002_T2w.nii.gz: expected one 3D volume, got shape \(8, 8, 8, 2\); split the file",
    ),
    "2D volume": (
        _replace_volume(np.ones((8, 8), np.float32)),
        r"sub-002_T2w.nii.gz: expected one 3D volume, got shape \(8, 8\)",
    ),
    "empty volume": (_replace_volume(np.zeros((8, 8, 8), np.float32)), "sub-002_T2w.nii.gz: empty volume"),
    "sidecar field not a number": (
        _edit_sidecar("FLAIR", RepetitionTime="fast"),
        r"sub-002_FLAIR.json: sidecar field RepetitionTime is not a positive number \('fast'",
    ),
    "milliseconds": (_edit_sidecar("T2w", EchoTime=90), "sub-002_T2w.json: .* look like milliseconds"),
    "a short TE in milliseconds": (_edit_sidecar("T2w", EchoTime=4.6), "sub-002_T2w.json: .* look like milliseconds"),
    "unknown suffix": (_unknown_suffix, "sub-002_T2starw.nii.gz: unknown modality suffix 'T2starw'"),
    "subject not in participants.tsv": (
        _edit_participants(_drop_subject),
        "sub-002_.*: subject sub-002 is missing from participants.tsv",
    ),
    "no pathology label": (
        _edit_participants(_label("n/a")),
        r"participants.tsv: line \d: no pathology label for sub-002",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_strict_names_file_and_problem(site: Path, case: str) -> None:
    corrupt, message = BAD_INPUTS[case]
    corrupt(site)
    before = _tree_digest(site)
    with pytest.raises(SiteDataError, match=message):
        read_site(site, strict=True, image_size=16)
    assert _tree_digest(site) == before  # nothing in the site folder was touched


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_lenient_skips_and_lists(site: Path, case: str, tmp_path: Path) -> None:
    corrupt, message = BAD_INPUTS[case]
    corrupt(site)
    before = _tree_digest(site)
    slices = read_site(site, strict=False, image_size=16, cache_dir=tmp_path / "cache")
    assert _tree_digest(site) == before
    skipped = [f"{entry['file']}: {entry['reason']}" for entry in slices.summary()["skipped"]]
    assert any(re.search(message, line) for line in skipped), skipped
    assert slices.summary()["subjects"] >= 3  # the rest of the site is still read


def test_site_without_usable_scans_fails_even_when_lenient(site: Path) -> None:
    for path in site.glob("sub-*/anat/*.nii.gz"):
        path.write_bytes(b"not a nifti")
    with pytest.raises(SiteDataError, match="no usable scans"):
        read_site(site, strict=False, image_size=16)


def test_missing_dataset_description_is_explained(site: Path) -> None:
    (site / "dataset_description.json").unlink()
    with pytest.raises(SiteDataError, match=r"dataset_description\.json: missing; is .* a BIDS dataset"):
        read_site(site)


def test_missing_acquisition_fields_are_unknown_conditions_not_dropped(site: Path) -> None:
    """Most public sidecars lack TR, TE or the field: every scan is still read, the missing value
    is an unknown condition, and the reader warns once per field and site."""
    for sidecar in (site / "sub-002" / "anat").glob("*.json"):
        _edit_sidecar(sidecar.stem.removeprefix("sub-002_"), MagneticFieldStrength=None)(site)
    _edit_sidecar("T2w", RepetitionTime=None, EchoTime=None)(site)
    _edit_sidecar("FLAIR", InversionTime=None)(site)
    scans = len(list(site.glob("sub-*/anat/*.nii.gz")))
    with pytest.warns(SiteDataWarning) as caught:
        slices = read_site(site, strict=True, image_size=16)
    messages = [str(w.message) for w in caught if issubclass(w.category, SiteDataWarning)]
    assert len(messages) == 4, messages  # one per field: the field, TR, TE, and a FLAIR's TI
    assert any("3 of 12 scans have no MagneticFieldStrength" in m for m in messages), messages
    assert any(
        "1 of 4 FLAIR scans have no InversionTime in their sidecars; their timing (TR, TE, TI) is" in m
        for m in messages
    )
    assert len(np.unique(slices.scan)) == scans and slices.skipped == []
    sub2 = slices.subject == slices.subjects.index("sub-002")
    assert np.isnan(slices.field_strength[sub2]).all() and np.isfinite(slices.field_strength[~sub2]).all()
    untimed = sub2 & np.isin(slices.modality, [Modality.T2w.ordinal, Modality.FLAIR.ordinal])
    timing = slices.conditions()[:, [CONDITION_VECTOR.index(n) for n in ("repetition_time", "echo_time")]]
    assert np.isnan(timing[untimed]).all() and np.isfinite(timing[~untimed]).all()
    assert slices.summary()["unknown"] == {"field_strength": int(sub2.sum()), "timing": int(untimed.sum())}


def test_a_label_outside_the_vocabulary_is_read_as_other(site: Path) -> None:
    """A participant labelled 'stroke' no longer refuses the site: the subject's slices are read
    with the pathology condition unknown (never trained as a label), and the reader says so."""
    _edit_participants(_label("stroke"))(site)
    with pytest.warns(SiteDataWarning, match=r"outside the vocabulary .* `other`.*sub-002 \('stroke'\)"):
        slices = read_site(site, strict=True, image_size=16)
    other = slices.subject == slices.subjects.index("sub-002")
    assert np.all(slices.pathology[other] == OTHER) and np.all(slices.pathology[~other] == Pathology.healthy.ordinal)
    pathology = slices.conditions()[:, CONDITION_VECTOR.index("pathology")]
    assert np.isnan(pathology[other]).all() and not np.isnan(pathology[~other]).any()
    assert slices.summary()["pathologies"] == {"healthy": 3, "other": 1}


def test_strict_mode_names_every_file_it_cannot_use(site: Path) -> None:
    """Strict mode refuses the site only after looking at all of it, naming each file and why."""
    truncated = _truncate(site)
    renamed = _unknown_suffix(site)
    milliseconds = _edit_sidecar("FLAIR", EchoTime=90)(site)
    with pytest.raises(SiteDataError) as refused:
        read_site(site, strict=True, image_size=16)
    message = str(refused.value)
    assert "strict mode refuses the site; 3 file(s) cannot be used" in message
    assert f"{truncated}: corrupt or truncated NIfTI" in message
    assert f"{renamed}: unknown modality suffix 'T2starw'" in message
    assert f"{milliseconds}: RepetitionTime/EchoTime/InversionTime look like milliseconds" in message
    lenient = read_site(site, strict=False, image_size=16)
    assert {Path(f) for f, _ in lenient.skipped} == {truncated, renamed, milliseconds}


def test_held_out_subjects_are_split_by_subject_and_stable(tiny_sites: Path) -> None:
    from sites.bids import split_subjects

    data = read_site(tiny_sites / "tiny-public", image_size=64)
    training, heldout = split_subjects(data, "tiny-public", 0.25)
    assert len(heldout.subjects) == 1 and len(training.subjects) == len(data.subjects) - 1
    assert not set(training.subjects) & set(heldout.subjects)
    assert len(training) + len(heldout) == len(data)
    # Re-indexed subjects point at the right names: every slice keeps its original subject.
    for part in (training, heldout):
        original = {name: i for i, name in enumerate(data.subjects)}
        rows = [np.nonzero((data.images == part.images[j]).all(axis=(1, 2)))[0][0] for j in range(0, len(part), 7)]
        assert [data.subjects[data.subject[r]] for r in rows] == [
            part.subjects[part.subject[j]] for j in range(0, len(part), 7)
        ]
        assert set(part.subjects) <= set(original)
    # Same split every time; another site id gives an independent split; 0 holds nobody out.
    assert split_subjects(data, "tiny-public", 0.25)[1].subjects == heldout.subjects
    assert len(split_subjects(data, "tiny-public", 0.0)[1].subjects) == 0
    splits = {tuple(split_subjects(data, f"site-{i}", 0.25)[1].subjects) for i in range(12)}
    assert len(splits) > 1


def test_an_empty_lesion_mask_is_lesion_free_and_a_corrupt_one_is_named(tiny_sites: Path, tmp_path: Path) -> None:
    """An all-zero mask (no lesion in this subject's scans) labels every slice healthy. A corrupt
    mask makes the subject's per-slice labels unknown: strict mode refuses, naming each scan and
    the mask; lenient mode drops those scans, names them, and reads the rest of the site."""
    from sites.bids import lesion_mask_path

    root = Path(shutil.copytree(tiny_sites / "tiny-a", tmp_path / "tiny-a"))
    before = read_site(root, image_size=16)
    i = next(i for i in range(len(before.subjects)) if (before.pathology[before.subject == i] == Pathology.glioma.ordinal).any())  # fmt: skip
    subject = before.subjects[i]
    mask = lesion_mask_path(root, subject)
    assert mask is not None
    image = nib.load(mask)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), mask)
    empty = read_site(root, image_size=16)
    assert np.all(empty.pathology[empty.subject == i] == Pathology.healthy.ordinal)
    assert not empty.skipped

    mask.write_bytes(mask.read_bytes()[:200])
    with pytest.raises(SiteDataError) as refused:
        read_site(root, strict=True, image_size=16)
    scans = sorted(p.name for p in (root / subject / "anat").glob("*.nii.gz"))
    for name in scans:
        assert re.search(rf"{name}: its lesion mask cannot be used: .*{mask.name}: corrupt", str(refused.value))
    lenient = read_site(root, strict=False, image_size=16)
    assert subject not in lenient.subjects and len(lenient.subjects) == len(before.subjects) - 1
    assert sorted(Path(f).name for f, _ in lenient.skipped) == scans


def _glioma_subject(slices) -> int:
    return next(i for i in range(len(slices.subjects)) if (slices.pathology[slices.subject == i] == Pathology.glioma.ordinal).any())  # fmt: skip


def test_each_slice_carries_its_lesion_mask_on_its_own_pixel_grid(tiny_sites: Path, tmp_path: Path) -> None:
    """A glioma subject's slices carry the mask (core, oedema, rim) where it reaches them; a healthy
    subject's are lesion-free (all 0); a glioma subject without a mask file has NO_MASK. The mask
    is sampled through world coordinates: stored reoriented (LPS) or on a grid twice as fine, it
    gives the same pixels."""
    from common.mask_branch import NO_MASK
    from sites.bids import lesion_mask_path

    root = Path(shutil.copytree(tiny_sites / "tiny-a", tmp_path / "tiny-a"))
    slices = read_site(root, image_size=32)
    i = _glioma_subject(slices)
    mine = slices.subject == i
    shown = mine & (slices.pathology == Pathology.glioma.ordinal)
    assert set(np.unique(slices.lesion_mask[shown]).tolist()) == {0, 1, 2, 3}
    assert (slices.lesion_mask[shown] > 0).reshape(shown.sum(), -1).any(1).mean() > 0.8
    healthy = [s for s in range(len(slices.subjects)) if s != i and not (slices.pathology[slices.subject == s] == Pathology.glioma.ordinal).any()]  # fmt: skip
    assert healthy and all((slices.lesion_mask[slices.subject == s] == 0).all() for s in healthy)
    # The same mask stored LPS, then on a grid twice as fine (each voxel split in 8): same pixels.
    path = lesion_mask_path(root, slices.subjects[i])
    assert path is not None
    canonical = nib.as_closest_canonical(nib.load(path))
    labels = np.asarray(canonical.dataobj)
    lps = nib.Nifti1Image(labels[::-1, ::-1].copy(), canonical.affine @ _flip_xy(labels.shape))
    nib.save(lps, path)
    assert np.array_equal(read_site(root, image_size=32).lesion_mask, slices.lesion_mask)
    fine = labels.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    half = np.diag([0.5, 0.5, 0.5, 1.0])
    half[:3, 3] = -0.25  # voxel 0 of the fine grid lies a quarter voxel before voxel 0 of the coarse one
    nib.save(nib.Nifti1Image(fine, canonical.affine @ half), path)
    assert np.array_equal(read_site(root, image_size=32).lesion_mask, slices.lesion_mask)
    # Without the mask file, the glioma subject's masks are unknown; the others' are unchanged.
    path.unlink()
    bare = read_site(root, image_size=32)
    assert (bare.lesion_mask[bare.subject == i] == NO_MASK).all()
    assert np.array_equal(bare.lesion_mask[~mine], slices.lesion_mask[~mine])


def _flip_xy(shape: tuple[int, ...]) -> np.ndarray:
    """Voxel -> voxel affine of an array reversed along its first two axes."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    return flip


@pytest.mark.parametrize(
    ("values", "outcome"),
    [(4, "read as 3"), (7, "labels \\[7\\] are not"), (0.5, "not whole-number labels")],
)
def test_lesion_mask_labels_are_brats_numbers_or_the_scans_are_dropped_by_name(
    tiny_sites: Path, tmp_path: Path, values: float, outcome: str
) -> None:
    """BraTS's older enhancing label 4 reads as 3; labels outside 0-4, or a probability map, make the
    subject's masks unusable: lenient mode drops its scans and names the mask and the reason."""
    from sites.bids import lesion_mask_path

    root = Path(shutil.copytree(tiny_sites / "tiny-a", tmp_path / "tiny-a"))
    before = read_site(root, image_size=16)
    i = _glioma_subject(before)
    path = lesion_mask_path(root, before.subjects[i])
    assert path is not None
    image = nib.load(path)
    labels = np.asarray(image.dataobj).astype(np.float32)
    labels[labels == 3] = values
    nib.save(nib.Nifti1Image(labels, image.affine), path)
    after = read_site(root, strict=False, image_size=16)
    if outcome == "read as 3":
        assert np.array_equal(after.lesion_mask, before.lesion_mask) and not after.skipped
    else:
        assert before.subjects[i] not in after.subjects
        assert after.skipped and all(re.search(outcome, reason) for _, reason in after.skipped)
