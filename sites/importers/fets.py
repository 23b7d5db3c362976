"""FeTS 2022: the BraTS 2021 glioma cases split by the institution that acquired them, one site per partition.

Layout: `MICCAI_FeTS2022_TrainingData/FeTS2022_00000/FeTS2022_00000_{t1,t1ce,t2,flair,seg}.nii.gz`
(BraTS 2021 naming and labels: 1 necrotic core, 2 oedema, 4 enhancing tumour) and, beside the
case folders, `partitioning_1.csv` (the acquiring institution) and `partitioning_2.csv` (the 5
largest institutions split further by tumour size), with the columns `Subject_ID` and
`Partition_ID`. Source: FeTS-AI/Challenge, Task_1/README.md ("Each of the partitioning CSV files
has two columns, Partition_ID and Subject_ID") and its partitioning_1.csv; the case naming as in
public FeTS 2022 loaders (MICCAI_FeTS2022_TrainingData/FeTS2022_00000/FeTS2022_00000_t1.nii.gz).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from common.conditions import Modality
from sites.importers.brats import NOTES, Naming, read_case
from sites.importers.site_writer import (
    DatasetImportError,
    DatasetInfo,
    Options,
    Report,
    Site,
    write_left_out,
    write_site,
)

DATASET = DatasetInfo(
    name="FeTS 2022",
    url="https://www.synapse.org/fets",
    license="FeTS/BraTS data use terms (registration for the FeTS challenge; cite the BraTS and FeTS papers)",
    layout_source="FeTS-AI/Challenge Task_1/README.md and partitioning_1.csv",
)
NAMING = Naming(
    "2022",
    re.compile(r"^FeTS2022_(\d+)$"),
    "_",
    {"t1": Modality.T1w, "t1ce": Modality.T1ce, "t2": Modality.T2w, "flair": Modality.FLAIR},
    {"necrotic tumour core": 1, "peritumoral oedema": 2, "enhancing tumour": 4},
)


def read_partitions(path: Path) -> dict[str, str]:
    """Subject_ID -> site id (`fets-p01` for Partition_ID 1) from a FeTS partitioning CSV."""
    if not path.exists():
        raise DatasetImportError(f"{path}: partitioning CSV not found; pass it with --partitioning")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"Subject_ID", "Partition_ID"} <= set(rows[0]):
        raise DatasetImportError(f"{path}: needs the columns Subject_ID and Partition_ID")
    partitions = {}
    for line, row in enumerate(rows, start=2):
        partition = row["Partition_ID"].strip()
        if not partition.isdigit():
            raise DatasetImportError(f"{path}: line {line}: Partition_ID {partition!r} is not a number")
        partitions[row["Subject_ID"].strip()] = f"fets-p{int(partition):02d}"
    return partitions


def import_fets(src: Path, options: Options, command: str, report: Report, partitioning: Path | None) -> list[Path]:
    """Import an extracted FeTS 2022 training set: one site per partition of the partitioning CSV."""
    csv_path = partitioning or src / "partitioning_1.csv"
    partitions = read_partitions(csv_path)
    folders = {p.name: p for p in sorted(src.iterdir()) if p.is_dir() and NAMING.folder.match(p.name)}
    if not folders:
        raise DatasetImportError(f"{src}: no FeTS2022_<nnnnn> case folders")
    sites = {
        site_id: Site(site_id, notes=[f"partition from {csv_path.name}", *NOTES]) for site_id in partitions.values()
    }
    for case, site_id in partitions.items():
        if case not in folders:
            sites[site_id].skipped.append((case, f"listed in {csv_path.name} but no folder {src / case}"))
            continue
        match = NAMING.folder.match(case)
        assert match is not None
        read_case(folders[case], case, NAMING, sites[site_id], options.assume, match.group(1))
    unlisted = [(str(folders[case]), f"not listed in {csv_path}") for case in sorted(set(folders) - set(partitions))]
    ordered = sorted(sites.values(), key=_id)
    paths = [write_site(site, DATASET, options, command, report) for site in ordered if site.scans]
    write_left_out(options.out, "fets", unlisted, [site for site in ordered if not site.scans], report)
    return paths


def _id(site: Site) -> str:
    return site.site_id
