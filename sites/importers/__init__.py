"""Importers that write public MRI datasets as fedmri sites: BIDS folders plus site YAMLs."""

from __future__ import annotations

from pathlib import Path

from sites.importers.site_writer import DatasetImportError, Options, Report

DATASETS = ("ixi", "brats", "fets", "oasis3", "fastmri-brain", "m4raw")
# Datasets stored as k-space HDF5: their magnitude images are converted and written as NIfTI.
CONVERTED = frozenset({"fastmri-brain", "m4raw"})
# What each dataset can leave unstated, so what --assume may fill (stated values always win).
# Whatever else a dataset states for every subject: an --assume for it is refused, not ignored.
ASSUMABLE = {
    "ixi": frozenset(),
    "brats": frozenset({"field"}),
    "fets": frozenset({"field"}),
    "oasis3": frozenset({"field", "pathology"}),
    "fastmri-brain": frozenset({"field", "pathology"}),
    "m4raw": frozenset(),
}
STATED = {
    "ixi": "IXI states every scanner's field strength (by hospital) and that every subject is healthy",
    "brats": "BraTS states that every subject has a glioma",
    "fets": "FeTS (BraTS) states that every subject has a glioma",
    "m4raw": "M4Raw states its one 0.3 T scanner and that every subject is a healthy volunteer",
}


def import_dataset(
    dataset: str,
    src: Path,
    options: Options,
    command: str,
    report: Report,
    partitioning: Path | None = None,
    clinical: Path | None = None,
) -> list[Path]:
    """Import `src` as `dataset` into options.out; -> the site YAML paths, one per hospital."""
    if dataset not in DATASETS:
        raise DatasetImportError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    if partitioning is not None and dataset != "fets":
        raise DatasetImportError("--partitioning applies to fets only")
    if clinical is not None and dataset != "oasis3":
        raise DatasetImportError("--clinical applies to oasis3 only")
    refused = sorted(options.assume.given() - ASSUMABLE[dataset])
    if refused:
        raise DatasetImportError(f"--assume {refused[0]}=... does not apply to {dataset}: {STATED[dataset]}")
    if not src.is_dir():
        raise DatasetImportError(f"{src}: not a folder; give the extracted dataset")
    options.out.mkdir(parents=True, exist_ok=True)
    if dataset == "ixi":
        from sites.importers.ixi import import_ixi

        return import_ixi(src, options, command, report)
    if dataset == "brats":
        from sites.importers.brats import import_brats

        return import_brats(src, options, command, report)
    if dataset == "fets":
        from sites.importers.fets import import_fets

        return import_fets(src, options, command, report, partitioning)
    if dataset == "oasis3":
        from sites.importers.oasis3 import import_oasis3

        return import_oasis3(src, options, command, report, clinical)
    if dataset == "fastmri-brain":
        from sites.importers.fastmri_brain import import_fastmri_brain

        return import_fastmri_brain(src, options, command, report)
    from sites.importers.m4raw import import_m4raw

    return import_m4raw(src, options, command, report)
