"""`fedmri` commands for the model: pretrain the base, generate from it, the prompt vocabulary."""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from common.cli_helpers import MODEL_PANEL, SITES_DIR, Device, check_before_loading, console, device_or_exit
from common.pretrain_config import PretrainConfig

app = typer.Typer(rich_markup_mode="markdown")
_PRETRAIN = PretrainConfig()  # the defaults of `fedmri pretrain`


def read_slices(yaml_paths: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """All slices of these sites (images [N, H, W], conditions [N, 7], the rows of each slice's
    sources, -1 where none [N, 5]: sites/datasets.source_rows) and a per-site summary."""
    from sites.bids import read_site_data
    from sites.config import load_site
    from sites.datasets import source_rows

    images, conditions, sources, summary = [], [], [], {}
    offset = 0
    for path in yaml_paths:
        cfg = load_site(path)
        data = read_site_data(cfg)
        images.append(data.images)
        conditions.append(data.conditions())
        rows = source_rows(data)
        sources.append(np.where(rows >= 0, rows + offset, -1))  # pairs stay within a site, and a subject
        offset += len(data)
        summary[cfg.site_id] = data.summary()
    return np.concatenate(images), np.concatenate(conditions), np.concatenate(sources), summary


@app.command(rich_help_panel=MODEL_PANEL)
def pretrain(
    out: Annotated[Path, typer.Option(help="Model directory to write (diffusers format + provenance.json).")],
    scenario: Annotated[str, typer.Option(help="Scenario whose public sites are the training data.")] = "demo",
    sites_dir: Annotated[
        Path, typer.Option("--sites", help="Where the scenario's sites are (made there if missing).")
    ] = SITES_DIR,
    vae_steps: Annotated[int, typer.Option(help="VAE optimisation steps.")] = _PRETRAIN.vae_steps,
    unet_steps: Annotated[
        int, typer.Option(help="UNet optimisation steps (upper bound with --max-minutes).")
    ] = _PRETRAIN.unet_steps,
    batch_size: Annotated[int, typer.Option(help="Slices per step.")] = _PRETRAIN.batch_size,
    max_minutes: Annotated[
        float | None, typer.Option(help="Stop the UNet phase after this many minutes.")
    ] = _PRETRAIN.max_minutes,
    prediction_type: Annotated[str, typer.Option(help="'epsilon' or 'v_prediction'.")] = _PRETRAIN.prediction_type,
    fp16: Annotated[bool, typer.Option(help="Store weights in float16 (halves the size; training is fp32).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and sampling.")] = _PRETRAIN.seed,
    device: Device = "cpu",
    randomize: Annotated[
        bool, typer.Option(help="Domain randomization of every slice (common/randomize.py), VAE and UNet phases.")
    ] = _PRETRAIN.randomize,
    start: Annotated[
        Path | None,
        typer.Option("--from", help="Continue from this model (its VAE kept; only the UNet phase runs).", exists=True),
    ] = None,
    source_branch: Annotated[
        bool,
        typer.Option(
            help="Add the source branch and train it on the public subjects' paired contrasts (docs/translate.md)."
        ),
    ] = _PRETRAIN.source_branch,
) -> None:
    """Pretrain the base LDM on a scenario's **public** sites: the VAE, then the UNet with EMA.

    Writes a diffusers-format directory (`vae/`, `unet/`, `condition_encoder/`, `scheduler/`,
    `fedmri.json`) and `provenance.json` (command, config, seed, data summary, steps, wall time,
    sha256 of every file). The federation later fine-tunes this base under DP.

    With `--from BASE --source-branch`, a base learns to translate: its UNet phase continues on
    the same public slices, each with its subject's other contrasts as sources.
    """
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from common.pretrain import pretrain as run_pretrain
    from common.pretrain import slice_table
    from sites import scenarios
    from sites.cli import make_scenario_sites

    public = scenarios.create(scenario).public
    if not public:
        console.print(f"[red]error:[/red] scenario {scenario!r} has no public sites to pretrain on")
        raise typer.Exit(2)
    where = device_or_exit(device)
    yaml_paths = make_scenario_sites(public, sites_dir)
    images, conditions, sources, summary = read_slices(yaml_paths)
    cfg = PretrainConfig(
        vae_steps=vae_steps,
        unet_steps=unet_steps,
        batch_size=batch_size,
        max_minutes=max_minutes,
        prediction_type=prediction_type,
        seed=seed,
        randomize=randomize,
        source_branch=source_branch,
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks = {
            "vae": bar.add_task("VAE ", total=0 if start else vae_steps, loss=0.0),
            "unet": bar.add_task("UNet", total=unet_steps, loss=0.0),
        }

        def progress(phase: str, step: int, total: int, loss: float) -> None:
            if step % 10 == 0 or step == total:
                bar.update(tasks[phase], completed=step, loss=loss)
            if not console.is_terminal and step % 100 == 0:  # logs: a line per 100 steps
                console.print(f"{phase} step {step}/{total} loss {loss:.4f}")

        run_pretrain(
            slice_table(images, conditions, sources), out, cfg, data_summary=summary,
            command="fedmri " + shlex.join(sys.argv[1:]), dtype=torch.float16 if fp16 else torch.float32, progress=progress,
            device=where, base=start,
        )  # fmt: skip
    console.print(f"base model written to {out} ({len(images)} public slices)")


def _parse_modalities(text: str | None) -> list | None:
    from common.conditions import parse_modality

    return [parse_modality(t.strip()) for t in text.split(",")] if text else None


def _parse_pathologies(text: str | None) -> list | None:
    from common.conditions import parse_pathology

    return [parse_pathology(t.strip()) for t in text.split(",")] if text else None


@app.command(rich_help_panel=MODEL_PANEL)
def generate(
    out: Annotated[Path, typer.Option(help="Folder for samples.nii.gz, samples.json and grid.png.")],
    model: Annotated[
        Path | None, typer.Option(help="Model or release directory. Default: the shipped base model.")
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help='Free text, e.g. "axial FLAIR, 0.3T, glioma". See `fedmri vocabulary`.')
    ] = None,
    n: Annotated[int, typer.Option("-n", help="Images for --prompt.")] = 16,
    grid: Annotated[bool, typer.Option(help="Render a modality x pathology table instead of a prompt.")] = False,
    field_strength: Annotated[float, typer.Option("--field", help="Field strength (T) of the --grid table.")] = 1.5,
    modalities: Annotated[str | None, typer.Option(help="Comma-separated grid rows (default: all).")] = None,
    pathologies: Annotated[str | None, typer.Option(help="Comma-separated grid columns (default: all).")] = None,
    steps: Annotated[int, typer.Option(help="Solver steps (DPM-Solver++) or DDPM steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = no guidance).")] = 3.0,
    sampler: Annotated[str, typer.Option(help="'dpm++' (fast) or 'ddpm' (baseline).")] = "dpm++",
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
    mask: Annotated[
        Path | None,
        typer.Option(
            help="A lesion mask to follow, on the model's 64 x 64 slice grid (e.g. a samples_mask.nii.gz): one "
            "image per axial slice. Needs --prompt and a model with the mask branch (docs/masks.md)."
        ),
    ] = None,
    lesion: Annotated[
        str | None,
        typer.Option(
            help='Draw -n masks of a lesion from the public prior, e.g. "glioma, 3 cm, left frontal" or "ms".'
        ),
    ] = None,
    random_masks: Annotated[
        int, typer.Option(help="Draw this many random plausible lesion masks (glioma or MS) from the public prior.")
    ] = 0,
    skip_verify: Annotated[
        bool, typer.Option(help="Load a release without verifying its privacy.json first (says so).")
    ] = False,
    device: Device = "cpu",
) -> None:
    """Generate brain MRI slices from a prompt, or a modality x pathology grid (`--grid`).

    With a lesion mask (`--mask`, `--lesion` or `--random-masks`) each image follows its mask, and
    the masks are written beside the images (samples_mask.nii.gz) and outlined on grid.png.
    A release (a directory with privacy.json) is verified before it is loaded, as by
    `fedmri verify`; generation stops if verification fails.
    """
    import time

    from rich.progress import Progress

    from common.conditions import Modality, Pathology
    from common.generate import Request, grid_requests
    from common.generate import generate as run_generate
    from common.mask_branch import has_mask_branch
    from common.model import load_ldm
    from common.prompts import parse_prompt
    from common.weights import base_model_dir

    try:
        asked = [name for name, on in (("--grid", grid), ("--mask", mask), ("--lesion", lesion),
                                       ("--random-masks", random_masks)) if on]  # fmt: skip
        if len(asked) > 1:
            raise ValueError(f"choose one of {', '.join(asked)}")
        masked = bool(mask or lesion or random_masks)
        if grid:
            rows, cols = (
                _parse_modalities(modalities) or list(Modality),
                _parse_pathologies(pathologies) or list(Pathology),
            )
            requests, shape = grid_requests(field_strength, rows, cols), (len(rows), len(cols))
        elif masked:
            requests, shape = [], None  # made below, on the loaded model's slice grid
        elif prompt:
            requests, shape = [Request(parse_prompt(prompt), prompt)] * n, None
        else:
            raise ValueError("give --prompt TEXT or --grid")
        if model is not None:
            check_before_loading(model, skip_verify)
        ldm = load_ldm(model or base_model_dir())
        if masked and not has_mask_branch(ldm.denoiser.unet):
            raise ValueError(
                f"{model or 'the shipped base'} has no mask branch, so it cannot follow a lesion mask; train one "
                "with `fedmri simulate --mask-branch` and release it (docs/masks.md)"
            )
        if masked:
            requests = mask_requests(
                prompt, mask, lesion, n, random_masks, seed, ldm.settings.image_size, ldm.settings.fov_mm
            )
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    ldm.to(device_or_exit(device))
    start = time.perf_counter()
    with Progress(console=console) as bar:
        task = bar.add_task(f"sampling ({sampler}, {steps} steps)", total=len(requests))
        run_generate(
            ldm,
            requests,
            out,
            seed,
            steps,
            guidance,
            sampler,
            shape,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    console.print(
        f"{len(requests)} images in {time.perf_counter() - start:.1f} s -> {out}/samples.nii.gz, samples.json, grid.png"
    )


def mask_requests(
    prompt: str | None,
    mask: Path | None,
    lesion: str | None,
    n: int,
    random_masks: int,
    seed: int,
    image_size: int,
    fov_mm: float,
) -> list:
    """Requests that follow a lesion mask: every slice of `mask` (with the prompt's conditions),
    `n` draws of `lesion`, or `random_masks` random draws, from the public prior (sites/lesion_prior.py),
    on the model's slice grid (`image_size` pixels over `fov_mm`).

    The pathology is the lesion's; a prompt that names another one is refused. The slice
    position is the prompt's, or mid-brain (0.55)."""
    from common.conditions import Conditions, Pathology
    from common.generate import Request, read_mask_slices
    from common.prompts import describe, parse_prompt
    from sites.lesion_prior import LesionRequest, lesion_mask, parse_request, random_request

    asked = parse_prompt(prompt) if prompt else Conditions()
    position = asked.slice_position if asked.slice_position is not None else 0.55
    if mask is not None:
        if asked.pathology not in (Pathology.glioma, Pathology.ms):
            raise ValueError(
                f"--mask {mask}: say in --prompt which lesion it outlines (glioma or MS), e.g. 'FLAIR, 3T, glioma'"
            )
        return [
            Request(asked, prompt or "", m, f"{mask.name} slice {i}")
            for i, m in enumerate(read_mask_slices(mask, image_size))
        ]
    rng = np.random.default_rng(seed)
    if lesion:
        wanted: list[LesionRequest] = [parse_request(lesion, position)] * n
    else:
        focal = (
            [asked.pathology]
            if asked.pathology in (Pathology.glioma, Pathology.ms)
            else [Pathology.glioma, Pathology.ms]
        )
        wanted = [random_request(focal[int(rng.integers(len(focal)))], rng, position) for _ in range(random_masks)]
    requests = []
    for want in wanted:
        if asked.pathology is not None and asked.pathology is not want.pathology:
            raise ValueError(f"the prompt says {asked.pathology.value} but the lesion is {want.pathology.value}")
        conditions = replace(asked, pathology=want.pathology, slice_position=want.slice_position)
        requests.append(
            Request(conditions, describe(conditions), lesion_mask(want, rng, image_size, fov_mm), want.describe())
        )
    return requests


@app.command(rich_help_panel=MODEL_PANEL)
def vocabulary() -> None:
    """Print the prompt vocabulary (synonyms for modality, pathology, field strength, timing)."""
    from common.prompts import vocabulary as words

    for part in words().split("; "):
        console.print(part)
