"""`fedmri translate`: a subject's acquired scans in, the contrast it lacks out (docs/translate.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from common.cli_helpers import MODEL_PANEL, Device, check_before_loading, console, device_or_exit

app = typer.Typer(rich_markup_mode="markdown")

_ENTITIES = re.compile(r"^((?:[a-zA-Z0-9]+-[a-zA-Z0-9]+_)*[a-zA-Z0-9]+-[a-zA-Z0-9]+)_")


def output_name(reference: Path, modality: str) -> str:
    """sub-01_ses-1_T1w.nii.gz -> sub-01_ses-1_desc-synthetic_FLAIR; anything else -> synthetic_FLAIR."""
    match = _ENTITIES.match(reference.name)
    entities = [e for e in (match.group(1).split("_") if match else []) if not e.startswith("ce-")]
    return "_".join([*entities, "desc-synthetic", modality]) if entities else f"synthetic_{modality}"


@app.command(rich_help_panel=MODEL_PANEL)
def translate(
    inputs: Annotated[
        list[str],
        typer.Option(
            "--input",
            help="An acquired scan of the subject: a BIDS-named file (sub-01_T1w.nii.gz) or MODALITY=PATH. "
            "Repeat for several contrasts; the first sets the output's grid.",
        ),
    ],
    to: Annotated[str, typer.Option(help="The contrast to synthesize: T1w, T1ce, T2w, FLAIR or PDw.")],
    out: Annotated[Path, typer.Option(help="Folder for the synthetic NIfTI, its JSON sidecar and the PNG.")],
    model: Annotated[Path, typer.Option(help="A model or release with the source branch (docs/translate.md).")],
    field_strength: Annotated[
        float | None,
        typer.Option("--field", help="Target field strength (T). Default: the first input's sidecar, if it says."),
    ] = None,
    tr: Annotated[float | None, typer.Option(help="Target repetition time (s). Default: unknown.")] = None,
    te: Annotated[float | None, typer.Option(help="Target echo time (s). Default: unknown.")] = None,
    ti: Annotated[float | None, typer.Option(help="Target inversion time (s). Default: unknown.")] = None,
    real: Annotated[
        Path | None, typer.Option(help="The subject's real target scan, if one exists: shown beside the synthetic.")
    ] = None,
    steps: Annotated[int, typer.Option(help="DPM-Solver++ steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = no guidance).")] = 3.0,
    seed: Annotated[int, typer.Option(help="Same seed, same volume.")] = 0,
    skip_verify: Annotated[
        bool, typer.Option(help="Load a release without verifying its privacy.json first (says so).")
    ] = False,
    device: Device = "cpu",
) -> None:
    """Synthesize a contrast a subject lacks from the scans it has, volume by volume (after TUMSyn).

    Every axial slice of the first input is generated in the `--to` contrast, steered by the same
    slice of every input (resampled onto the first through world coordinates), and the slices are
    put back on the first input's own grid: the output has its shape and affine. Writes
    `<entities>_desc-synthetic_<TO>.nii.gz`, a JSON sidecar that says it is synthetic, and a PNG
    with sources, synthetic and (with `--real`) the real scan side by side.
    """
    import json

    import nibabel as nib
    from rich.progress import Progress

    from common.conditions import parse_modality
    from common.model import load_ldm
    from common.translate import Target, check_sources, sidecar, translate_slices, write_json, write_sheet
    from sites.bids import sidecar_path
    from sites.subject_stack import parse_source, resample_onto, stack_scans, to_scan_grid
    from sites.volume import SiteDataError

    try:
        scans = [parse_source(text) for text in inputs]
        for scan in scans:
            if not scan.path.exists():
                raise FileNotFoundError(f"{scan.path}: no such file")
        field = field_strength
        if field is None:
            side = sidecar_path(scans[0].path)
            field = json.loads(side.read_text()).get("MagneticFieldStrength") if side.exists() else None
            if field is None:
                console.print("[yellow]note:[/yellow] field strength unknown (no --field, no MagneticFieldStrength "
                              f"in {side.name}): the model's 'unknown'")  # fmt: skip
        target = Target(parse_modality(to), field, tr, te, ti)
        target.conditions(None)  # refuses a non-positive field or time, naming it
        check_before_loading(model, skip_verify)
        ldm = load_ldm(model)
        check_sources(ldm, [s.modality for s in scans], target)
        stack = stack_scans(scans, ldm.settings.image_size, ldm.settings.fov_mm)
        truth = resample_onto(real, stack) if real is not None else None
    except (ValueError, FileNotFoundError, SiteDataError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    ldm.to(device_or_exit(device))
    modalities = [s.modality for s in scans]
    with Progress(console=console) as bar:
        task = bar.add_task(
            f"{target.modality.value} from {', '.join(m.value for m in modalities)}", total=stack.images.shape[1]
        )
        synthetic = translate_slices(
            ldm, stack.images, modalities, stack.positions, target, steps, guidance, seed,
            progress=lambda done, total: bar.update(task, completed=done),
        )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    name = output_name(scans[0].path, target.modality.value)
    nib.save(to_scan_grid(synthetic, stack), out / f"{name}.nii.gz")
    settings = {"Steps": steps, "Guidance": guidance, "Seed": seed}
    write_json(out / f"{name}.json", sidecar(target, [(s.path, s.modality) for s in scans], model, settings))
    write_sheet(out / f"{name}.png", stack.images, modalities, synthetic, target.modality, truth)
    console.print(
        f"{len(synthetic)} slices -> {out / name}.nii.gz (shape and affine of {scans[0].path.name}), .json, .png"
    )
