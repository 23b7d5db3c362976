"""Validation only: write ../shared/real-dev as BIDS sites and read them as a hospital's client would.

    .venv/bin/python scripts/real_dev_reader_check.py ../shared/real-dev OUT [--picture PNG]

The 18 real scans are linked (never copied into the project) into three BIDS sites under OUT,
with only what their provenance (real-dev/README.md) states: the dcm2niix sidecars as they are,
3 T for IXI's Hammersmith (HH) scans from IXI's scanner table, and no field strength, TR or TE
for the MS scans, whose field the README marks as unverified. Each site is read in strict mode;
the JSON on stdout says, per scan, whether it was kept and whether the slices at positions
0.4-0.6 lie in the cerebrum: their head area is at least 70 % of the largest axial head area, and
for the skull-stripped MS scans (where the head *is* the brain) every one of them holds brain.
`--picture` writes those slices as a contact sheet to look at; it stays outside the project.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sites.bids import LESION_MASK, SiteDataWarning, axial_slices, index_site, read_site
from sites.volume import brain_slab, foreground_of, load_volume_affine

# source prefix -> (site, pathology, sidecar facts stated by the provenance table)
SOURCES = {
    "dcmqa": ("dcmqa", "healthy", {}),  # the dcm2niix sidecars state field, TR and TE
    "ixicbica": ("ixi-hh", "healthy", {"MagneticFieldStrength": 3}),  # IXI: HH = Philips Intera 3 T
    "openms": ("openms", "ms", {}),  # 3 T only "from memory of the paper": left unknown
}
MID = (0.4, 0.6)


def write_sites(source: Path, out: Path) -> dict[str, Path]:
    roots: dict[str, Path] = {}
    participants: dict[str, list[tuple[str, str]]] = {}
    for scan in sorted(source.glob("*.nii.gz")):
        prefix, subject, modality = scan.name.removesuffix(".nii.gz").split("_")
        site, pathology, facts = SOURCES[prefix]
        root = roots.setdefault(site, out / site)
        label = "sub-" + "".join(c for c in subject if c.isalnum())
        if modality == "lesionmask":
            target = root / "derivatives" / "masks" / label / "anat" / f"{label}{LESION_MASK}.gz"
        else:
            name = {"T1ce": "ce-gadolinium_T1w"}.get(modality, modality)
            target = root / label / "anat" / f"{label}_{name}.nii.gz"
            stated = scan.with_name(scan.name.replace(".nii.gz", ".json"))
            sidecar = json.loads(stated.read_text()) if stated.exists() else {}
            target.parent.mkdir(parents=True, exist_ok=True)
            target.with_name(target.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar | facts))
            if (label, pathology) not in participants.setdefault(site, []):
                participants[site].append((label, pathology))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(scan.resolve())
    for site, root in roots.items():
        (root / "dataset_description.json").write_text(json.dumps({"Name": site, "BIDSVersion": "1.9.0"}))
        rows = "".join(f"{p}\t{label}\n" for p, label in participants[site])
        (root / "participants.tsv").write_text("participant_id\tpathology\n" + rows)
    return roots


def check_scan(path: Path, skull_stripped: bool) -> dict:
    data, zooms, _ = load_volume_affine(path)
    foreground = foreground_of(data)
    z_lo, _, _ = brain_slab(data, foreground, zooms[2])
    images, positions = axial_slices(data, zooms, 64, 220.0)
    area = foreground.sum((0, 1))
    mid = np.nonzero((positions >= MID[0]) & (positions <= MID[1]))[0]
    fractions = area[z_lo + mid] / area.max()
    return {
        "file": path.name,
        "mid_slices": len(mid),
        "min_head_area_fraction": round(float(fractions.min()), 3) if len(mid) else None,
        "cerebrum": bool(len(mid) and fractions.min() >= 0.7 and (not skull_stripped or area[z_lo + mid].min() > 0)),
        "images": images[mid],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--picture", type=Path)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    roots = write_sites(args.source, args.out)
    machine = {"cores": os.cpu_count(), "cpu": platform.machine(), "python": platform.python_version()}
    command = "scripts/real_dev_reader_check.py " + " ".join(sys.argv[1:])
    report: dict = {"date": datetime.date.today().isoformat(), "machine": machine, "command": command, "sites": {}}
    pictures = []
    for site, root in roots.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SiteDataWarning)
            index = index_site(root, strict=True)
            slices = read_site(root, strict=True)
        scans = [check_scan(scan.path, site == "openms") for scan in index.scans]
        pictures += [(site, s["file"], s.pop("images")) for s in scans]
        report["sites"][site] = {
            "scans_on_disk": len(list(root.glob("sub-*/anat/*.nii.gz"))),
            "scans_kept": len(np.unique(slices.scan)),
            "summary": {k: v for k, v in slices.summary().items() if k != "skipped"},
            "warnings": sorted({str(w.message).split(": ", 1)[1] for w in caught}),
            "scans": scans,
        }
    report["every_scan_kept"] = all(s["scans_kept"] == s["scans_on_disk"] for s in report["sites"].values())
    report["every_mid_brain_slice_in_cerebrum"] = all(
        scan["cerebrum"] for s in report["sites"].values() for scan in s["scans"]
    )
    print(json.dumps(report, indent=1))
    if args.picture:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        columns = max(len(images) for *_, images in pictures)
        fig, axes = plt.subplots(len(pictures), columns, figsize=(columns * 0.8, len(pictures) * 0.85), squeeze=False)
        for row, (_site, name, images) in enumerate(pictures):
            for col in range(columns):
                axes[row, col].axis("off")
                if col < len(images):
                    axes[row, col].imshow(images[col].astype(np.float32), cmap="gray", vmin=0, vmax=1)
            axes[row, 0].set_title(name, fontsize=6, loc="left")
        fig.savefig(args.picture, dpi=80)


if __name__ == "__main__":
    main()
