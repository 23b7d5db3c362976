"""Validation only: translate the real MS subjects of ../shared/real-dev, T1w + T2w -> FLAIR.

    .venv/bin/python scripts/real_dev_translate_check.py ../shared/real-dev MODEL [--sheets DIR]

For each subject with T1w, T2w and FLAIR (openms_cs*), the scans go through exactly what
`fedmri translate` does (sites/subject_stack.py, common/translate.py): the T1w sets the grid, the
T2w is resampled onto it through world coordinates, and every kept slice is translated. The
real FLAIR is resampled onto the same slices. The JSON on stdout gives, per subject and overall,
the whole-slice PSNR and SSIM of the synthetic FLAIR and of the copy baseline (the better of
T1w and T2w, quantile-matched to the real slice), over the slices that all three scans reach.
Nothing is trained or tuned on these scans. `--sheets` writes the side-by-side PNGs outside
the project; they show real scans and must not be committed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.conditions import Modality
from common.metrics import match_intensities, psnr, ssim
from common.model import load_ldm
from common.translate import Target, translate_slices, write_sheet
from sites.subject_stack import SourceScan, resample_onto, stack_scans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real_dev", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--sheets", type=Path, help="write side-by-side PNGs here (outside the project)")
    args = parser.parse_args()
    ldm = load_ldm(args.model)
    subjects = sorted(p.name.removesuffix("_FLAIR.nii.gz") for p in args.real_dev.glob("*_FLAIR.nii.gz"))
    rows, pooled = {}, {k: [] for k in ("psnr", "ssim", "psnr_copy", "ssim_copy")}
    for subject in subjects:
        scans = [SourceScan(args.real_dev / f"{subject}_{m.value}.nii.gz", m) for m in (Modality.T1w, Modality.T2w)]
        stack = stack_scans(scans, ldm.settings.image_size, ldm.settings.fov_mm)
        real = resample_onto(args.real_dev / f"{subject}_FLAIR.nii.gz", stack)  # -> [S, H, W]
        # The provenance leaves these scans' field strength unverified: the model's "unknown".
        synthetic = translate_slices(
            ldm, stack.images, [s.modality for s in scans], stack.positions, Target(Modality.FLAIR)
        )
        reached = ~np.isnan(real).any((1, 2)) & ~np.isnan(stack.images).any((0, 2, 3))
        truth, made, sources = real[reached], synthetic[reached], stack.images[:, reached]
        copy = max((match_intensities(s, truth) for s in sources), key=lambda c: float(ssim(c, truth).mean()))
        figures = {"psnr": psnr(made, truth), "ssim": ssim(made, truth), "psnr_copy": psnr(copy, truth),
                   "ssim_copy": ssim(copy, truth)}  # fmt: skip
        for key, values in figures.items():
            pooled[key].extend(values.tolist())
        rows[subject] = {"slices": int(reached.sum()), **{k: round(float(v.mean()), 4) for k, v in figures.items()}}
        if args.sheets:
            args.sheets.mkdir(parents=True, exist_ok=True)
            write_sheet(args.sheets / f"{subject}.png", stack.images, [s.modality for s in scans], synthetic,
                        Modality.FLAIR, real)  # fmt: skip
    print(json.dumps({
        "date": datetime.date.today().isoformat(),
        "model": str(args.model),
        "machine": {"python": platform.python_version(), "cpu": platform.machine()},
        "pair": "T1w+T2w -> FLAIR",
        "subjects": rows,
        "all_slices": {k: round(float(np.mean(v)), 4) for k, v in pooled.items()},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
