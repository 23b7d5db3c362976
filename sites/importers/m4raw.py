"""M4Raw: 183 healthy volunteers on a 0.3 T scanner, T1, T2 and FLAIR with 2-3 repetitions each, as one site.

Layout: fastMRI-style HDF5 files `<subject>_<contrast><repetition>.h5`, e.g. `2022061003_T101.h5`,
`2022061003_T201.h5`, `2022061003_FLAIR01.h5`, in `multicoil_train/`, `multicoil_val/`, with the
keys `ismrmrd_header`, `kspace` and `reconstruction_rss` and the attributes `acquisition`, `max`
and `patient_id`. Sources: mylyu/M4Raw M4Raw_tutorial.ipynb (keys, attributes, the file
2022061003_T201.h5) and denoising_demo/dataloader/dataset.py (`*_{modal}0{i}.h5` repetitions);
Lyu et al. 2023, Scientific Data, doi:10.1038/s41597-023-02181-4 (0.3 T Oper-0.3, Ningbo Xingaoyi;
healthy volunteers). File and header reading: sites/importers/hdf5.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.conditions import Modality, Pathology
from sites.importers import hdf5
from sites.importers.site_writer import (
    DatasetImportError,
    DatasetInfo,
    Options,
    Participant,
    Report,
    Scan,
    Site,
    with_field,
    write_site,
)

DATASET = DatasetInfo(
    name="M4Raw",
    url="https://doi.org/10.5281/zenodo.7523691",
    license="as stated on the Zenodo record 10.5281/zenodo.7523691 (cite Lyu et al. 2023)",
    layout_source="mylyu/M4Raw M4Raw_tutorial.ipynb and denoising_demo/dataloader/dataset.py",
)
FIELD_STRENGTH = 0.3  # tesla: every M4Raw scan, on one Oper-0.3 scanner (Lyu et al. 2023)
CONTRASTS = {"T1": Modality.T1w, "T2": Modality.T2w, "FLAIR": Modality.FLAIR}
_NAME = re.compile(r"^(\d+)_(T1|T2|FLAIR)(\d{2})\.h5$")
NOTES = [
    f"image: {hdf5.IMAGE_NOTE}",
    f"geometry: {hdf5.GEOMETRY_NOTE}",
    "MagneticFieldStrength: the ismrmrd_header's systemFieldStrength_T where it states one, else 0.3 T "
    "(M4Raw's one scanner, Lyu et al. 2023)",
    "RepetitionTime, EchoTime, InversionTime: ismrmrd_header sequenceParameters (ms), in seconds, where stated",
    "each repetition (NEX) of a contrast is its own run (run-01, run-02, ...); none is averaged",
    "pathology: healthy for every subject (M4Raw: healthy volunteers)",
]


def import_m4raw(src: Path, options: Options, command: str, report: Report) -> list[Path]:
    """Import M4Raw HDF5 files as the site `m4raw`."""
    files = sorted(src.rglob("*.h5"))
    if not files:
        raise DatasetImportError(f"{src}: no .h5 files (M4Raw multicoil_train / multicoil_val)")
    site = Site("m4raw", notes=list(NOTES))
    for path in files:
        match = _NAME.match(path.name)
        if not match:
            site.skipped.append((str(path), "not an M4Raw file name (<subject>_<T1|T2|FLAIR><nn>.h5)"))
            continue
        subject, contrast, repetition = match.groups()
        volume = hdf5.read_h5(path)
        stated = volume.header.field_strength
        sidecar = with_field(hdf5.sidecar_of(volume.header, None), stated if stated else FIELD_STRENGTH, None)
        scan = Scan(subject, CONTRASTS[contrast], sidecar, volume=hdf5.as_nifti(volume), entities=f"_run-{repetition}")
        site.scans.append(scan)
        site.participants[subject] = Participant(subject, Pathology.healthy, source_id=subject)
    return [write_site(site, DATASET, options, command, report)]
