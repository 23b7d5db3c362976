"""The `fedmri` command: one entry point for sites, training, release and deployment."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.console import Console

from sites.cli import app as sites_app

if TYPE_CHECKING:
    from common.evaluator import LabelledSlices
    from sites.bids import SiteSlices

app = typer.Typer(
    help="fedmri: federated, differentially private latent diffusion for brain MRI.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
)
app.add_typer(sites_app, name="sites")
console = Console()

DEVICE_HELP = "cpu, cuda (an error without a GPU) or auto (the GPU when torch sees one)."
Device = Annotated[str, typer.Option(help=DEVICE_HELP)]


def _device(choice: str):
    """--device as a torch device, or exit 2 naming the flag."""
    from common.device import describe, resolve_device

    try:
        device = resolve_device(choice)
    except (ValueError, RuntimeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(f"device: {describe(device)}")
    return device


def read_slices(yaml_paths: list[Path]) -> tuple[np.ndarray, np.ndarray, dict]:
    """All slices of these sites (images [N, H, W], conditions [N, 7]) and a per-site summary."""
    from common.conditions import CONDITION_VECTOR
    from sites.bids import read_site_data
    from sites.config import load_site

    images, conditions, summary = [], [], {}
    for path in yaml_paths:
        cfg = load_site(path)
        data = read_site_data(cfg)
        images.append(data.images)
        conditions.append(np.stack([getattr(data, name) for name in CONDITION_VECTOR], 1))
        summary[cfg.site_id] = data.summary()
    return np.concatenate(images), np.concatenate(conditions), summary


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Model directory to write (diffusers format + provenance.json).")],
    scenario: Annotated[str, typer.Option(help="Scenario whose public sites are the training data.")] = "demo",
    sites_dir: Annotated[
        Path, typer.Option("--sites", help="Where the scenario's sites are (made there if missing).")
    ] = Path("runs/sites"),
    vae_steps: Annotated[int, typer.Option(help="VAE optimisation steps.")] = 1500,
    unet_steps: Annotated[int, typer.Option(help="UNet optimisation steps (upper bound with --max-minutes).")] = 4000,
    batch_size: Annotated[int, typer.Option(help="Slices per step.")] = 32,
    max_minutes: Annotated[float | None, typer.Option(help="Stop the UNet phase after this many minutes.")] = None,
    prediction_type: Annotated[str, typer.Option(help="'epsilon' or 'v_prediction'.")] = "epsilon",
    fp16: Annotated[bool, typer.Option(help="Store weights in float16 (halves the size; training is fp32).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and sampling.")] = 0,
    device: Device = "cpu",
    randomize: Annotated[
        bool, typer.Option(help="Domain randomization of every slice (common/randomize.py), VAE and UNet phases.")
    ] = False,
) -> None:
    """Pretrain the base LDM on a scenario's **public** sites: the VAE, then the UNet with EMA.

    Writes a diffusers-format directory (`vae/`, `unet/`, `condition_encoder/`, `scheduler/`,
    `fedmri.json`) and `provenance.json` (command, config, seed, data summary, steps, wall time,
    sha256 of every file). The federation later fine-tunes this base under DP.
    """
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from common.pretrain import PretrainConfig, slice_table
    from common.pretrain import pretrain as run_pretrain
    from sites import scenarios
    from sites.cli import make_scenario_sites

    public = scenarios.create(scenario).public
    if not public:
        console.print(f"[red]error:[/red] scenario {scenario!r} has no public sites to pretrain on")
        raise typer.Exit(2)
    where = _device(device)
    yaml_paths = make_scenario_sites(public, sites_dir)
    images, conditions, summary = read_slices(yaml_paths)
    cfg = PretrainConfig(
        vae_steps=vae_steps,
        unet_steps=unet_steps,
        batch_size=batch_size,
        max_minutes=max_minutes,
        prediction_type=prediction_type,
        seed=seed,
        randomize=randomize,
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks = {
            "vae": bar.add_task("VAE ", total=vae_steps, loss=0.0),
            "unet": bar.add_task("UNet", total=unet_steps, loss=0.0),
        }

        def progress(phase: str, step: int, total: int, loss: float) -> None:
            if step % 10 == 0 or step == total:
                bar.update(tasks[phase], completed=step, loss=loss)
            if not console.is_terminal and step % 100 == 0:  # logs: a line per 100 steps
                console.print(f"{phase} step {step}/{total} loss {loss:.4f}")

        run_pretrain(
            slice_table(images, conditions), out, cfg, data_summary=summary,
            command="fedmri " + shlex.join(sys.argv[1:]), dtype=torch.float16 if fp16 else torch.float32, progress=progress,
            device=where,
        )  # fmt: skip
    console.print(f"base model written to {out} ({len(images)} public slices)")


def labelled(slices: SiteSlices) -> LabelledSlices:
    """A site's slices with the evaluator's three labels."""
    from common.evaluator import LabelledSlices, field_class

    return LabelledSlices(slices.images, slices.modality, slices.pathology, field_class(slices.field_strength))


@app.command("train-evaluator")
def train_evaluator(
    out: Annotated[Path, typer.Option(help="Evaluator directory to write (evaluator.safetensors + provenance.json).")],
    sites_dir: Annotated[
        Path, typer.Option("--sites", help="Where the public reference sites are (made there if missing).")
    ] = Path("runs/sites"),
    steps: Annotated[int, typer.Option(help="Optimisation steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Slices per step.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and sampling.")] = 0,
    randomize: Annotated[
        bool,
        typer.Option(
            help="Domain randomization (common/randomize.py): intensity curve, gamma, bias, noise, "
            "blur, resolution, skull stripping, crops; for real scans."
        ),
    ] = False,
) -> None:
    """Train fedmri's evaluator on the public **reference** sites (every contrast and pathology at 0.3, 1.5, 3 T).

    One small CNN: its pooled features are the space of the Fréchet distance; its three heads
    classify modality, pathology and field strength (condition adherence). Validation subjects
    (each reference YAML's holdout_fraction, split by subject) are never trained on; their
    accuracy goes into provenance.json with the command, config, data summary and sha256.
    The shipped evaluator (common/weights/fedmri-eval-v2) was made by this command.
    """
    import time

    import numpy as np
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from common.evaluator import Evaluator, EvaluatorConfig, LabelledSlices, accuracy, save_evaluator
    from common.evaluator import train_evaluator as run_training
    from sites.bids import read_site_data, split_subjects
    from sites.cli import make_scenario_sites
    from sites.config import load_site
    from sites.scenarios import reference_sites

    start = time.perf_counter()
    training, validation, summary = [], [], {}
    for path in make_scenario_sites(reference_sites(), sites_dir):
        site = load_site(path)
        data = read_site_data(site)
        fit, held = split_subjects(data, site.site_id, site.data.holdout_fraction)
        training.append(labelled(fit))
        validation.append(labelled(held))
        summary[site.site_id] = {**data.summary(), "training_subjects": len(fit.subjects),
                                 "validation_subjects": len(held.subjects)}  # fmt: skip

    def stack(parts: list) -> LabelledSlices:
        return LabelledSlices(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("images", "modality", "pathology", "field"))
        )

    fit_data, val_data = stack(training), stack(validation)
    cfg = EvaluatorConfig(steps=steps, batch_size=batch_size, seed=seed, randomize=randomize)
    with Progress(TextColumn("evaluator"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
                  TimeElapsedColumn(), console=console) as bar:  # fmt: skip
        task = bar.add_task("train", total=steps, loss=0.0)
        net = run_training(fit_data, cfg, lambda step, total, loss: bar.update(task, completed=step, loss=loss))
    val_accuracy = accuracy(Evaluator(net), val_data)
    save_evaluator(net, cfg, out, {
        "command": "fedmri " + shlex.join(sys.argv[1:]),
        "data": summary,
        "slices": {"training": len(fit_data.images), "validation": len(val_data.images)},
        "validation_accuracy": val_accuracy,
        "wall_time_s": round(time.perf_counter() - start, 1),
    })  # fmt: skip
    console.print(
        f"evaluator written to {out}: validation accuracy (held-out reference subjects) "
        + ", ".join(f"{k} {v:.1%}" for k, v in val_accuracy.items())
    )


evaluator_app = typer.Typer(help="The shipped evaluator (condition adherence, FD features): check it on real scans.")
app.add_typer(evaluator_app, name="evaluator")


@evaluator_app.command("check")
def evaluator_check(
    real: Annotated[
        Path, typer.Option(help="Folder of real NIfTI files named like `sub01_FLAIR.nii.gz` (modality last).")
    ],
    evaluator: Annotated[Path | None, typer.Option(help="Evaluator directory (default: the shipped one).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Print the evaluator's modality confusion on labelled **real** scans, per slice and per file.

    Slices are cut as a site's reader cuts them (64 px, 220 mm). The label is the file name's
    last `_` field; other files (lesion masks) are listed as skipped. Validation only: a folder
    used here must never be used to train or tune the evaluator or the model.
    """
    import json

    import numpy as np
    from rich.table import Table

    from common.conditions import Modality
    from common.evaluator import load_evaluator, modality_accuracy, modality_confusion
    from sites.real_scans import read_real_scans

    try:
        scans = read_real_scans(real)
        model = load_evaluator(evaluator)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    predicted = model.predict(scans.images.astype(np.float32))["modality"]
    names = [m.value for m in Modality]
    per_file = Table(title=f"{real}: {len(scans.files)} files, {len(scans.images)} slices")
    for column in ("file", "labelled", "called (most slices)", "slices right"):
        per_file.add_column(column, overflow="fold")
    files = {}
    for i, name in enumerate(scans.files):
        rows = scans.scan == i
        truth = int(scans.modality[rows][0])
        votes = np.bincount(predicted[rows], minlength=len(names))
        files[name] = {"labelled": names[truth], "called": names[int(votes.argmax())],
                       "slices_right": float((predicted[rows] == truth).mean())}  # fmt: skip
        per_file.add_row(name, names[truth], files[name]["called"], f"{files[name]['slices_right']:.0%}")
    console.print(per_file)
    counts = modality_confusion(scans.modality, predicted)
    confusion = Table(title="modality confusion (slices): row = labelled, column = called")
    confusion.add_column("")
    for name in names:
        confusion.add_column(name, justify="right")
    for i, name in enumerate(names):
        if counts[i].sum():
            confusion.add_row(name, *(str(c) for c in counts[i]))
    console.print(confusion)
    figures = modality_accuracy(scans.modality, predicted)
    console.print(
        f"slice accuracy {figures['modality']:.1%}; with T1w and T1ce as one family {figures['modality_t1_family']:.1%}"
    )
    for name, why in scans.skipped.items():
        console.print(f"skipped {name}: {why}")
    if json_out is not None:
        record = {"folder": str(real), "evaluator": model.provenance.get("files"), **figures,
                  "slices": len(scans.images), "confusion": counts.tolist(), "classes": names, "files": files,
                  "skipped": scans.skipped}  # fmt: skip
        json_out.write_text(json.dumps(record, indent=2))


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Run directory: metrics.jsonl, plots, checkpoints, model/.")],
    scenario: Annotated[
        str, typer.Option(help="Scenario whose hospitals federate (one virtual SuperNode each).")
    ] = "demo",
    sites_dir: Annotated[
        Path, typer.Option("--sites", help="Where the sites are (synthetic ones are made there if missing).")
    ] = Path("runs/sites"),
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    local_steps: Annotated[int, typer.Option(help="Proposed DP-SGD steps per site per round.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Proposed expected subjects per step.")] = 16,
    learning_rate: Annotated[float, typer.Option(help="Proposed local learning rate.")] = 1e-4,
    mode: Annotated[
        str, typer.Option(help="Fine-tuning mode: full, attention, lora or conditioning (the condition encoder only).")
    ] = "attention",
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam.")] = "fedavg",
    base_model: Annotated[str, typer.Option(help="'shipped' or a model directory.")] = "shipped",
    resume: Annotated[bool, typer.Option(help="Continue from the last valid checkpoint in --out.")] = False,
    min_train_nodes: Annotated[int, typer.Option(help="Sites needed for a round to count.")] = 1,
    client_dp: Annotated[
        str, typer.Option(help="Client-level DP at the server: off, or fixed (clip each site's update, add noise).")
    ] = "off",
    client_dp_noise: Annotated[float, typer.Option(help="Client-level noise multiplier σ.")] = 1.0,
    client_dp_clip: Annotated[float, typer.Option(help="Client-level clipping norm C of a site's update.")] = 1.0,
    slices_per_subject: Annotated[
        int | None,
        typer.Option(
            help="K: slices averaged inside each sampled subject's clipped gradient (default: the run config's)."
        ),
    ] = None,
    noise_draws: Annotated[
        int | None, typer.Option(help="M: noise/timestep draws per slice, likewise (default: the run config's).")
    ] = None,
    device: Annotated[
        str, typer.Option(help=f"Every simulated site's device: {DEVICE_HELP} Default: each site YAML's `device:`.")
    ] = "",
) -> None:
    """Simulate the federation on this machine with Flower's Simulation Engine.

    Uses the same ServerApp and ClientApp as a real deployment; each site trains with
    patient-level DP-SGD under its own privacy policy and ledger.
    """
    import json
    import time

    from common.run_config import RunConfig
    from simulation.engine import run_simulation
    from sites import scenarios
    from sites.cli import make_scenario_sites

    try:
        hospitals = scenarios.create(scenario).hospitals
        run = RunConfig(
            num_server_rounds=rounds, local_steps=local_steps, batch_size=batch_size, learning_rate=learning_rate,
            finetune_mode=mode, strategy=strategy, base_model=base_model, resume=resume, min_train_nodes=min_train_nodes,
            run_dir=str(out.resolve()), sites="", client_dp=client_dp, client_dp_noise=client_dp_noise,
            client_dp_clip=client_dp_clip, device=device,
            **{k: v for k, v in (("slices_per_subject", slices_per_subject), ("noise_draws", noise_draws)) if v is not None},
        )  # fmt: skip
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    if device:
        _device(device)
    if not resume and (out / "metrics.jsonl").exists():
        console.print(f"[red]error:[/red] {out} already holds a run; continue it with --resume or choose a new --out")
        raise typer.Exit(2)
    if base_model != "shipped":
        from common.release import ReleaseError, parent_chains

        try:  # a release's account carries forward; an unreleased run's model/ is refused
            parent_chains(Path(base_model))
        except (ValueError, ReleaseError) as err:
            console.print(f"[red]error:[/red] --base-model: {err}")
            raise typer.Exit(2) from None
    yaml_paths = make_scenario_sites(hospitals, sites_dir)
    run = dataclasses.replace(run, sites=",".join(str(p.resolve()) for p in yaml_paths))
    console.print(f"simulating {len(yaml_paths)} sites x {rounds} rounds ({mode}, {strategy}) -> {out}")
    start = time.perf_counter()
    run_simulation(run, len(yaml_paths))
    records = (
        [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if (out / "metrics.jsonl").exists()
        else []
    )
    if not records or records[-1]["round"] != rounds or not (out / "model" / "fedmri.json").exists():
        console.print(f"[red]error:[/red] the simulation did not complete {rounds} rounds; see the log above")
        raise typer.Exit(1)
    if sum(r["accepted"] for r in records) == 0:
        console.print("[red]error:[/red] no site update was aggregated in any round; see the log above")
        raise typer.Exit(1)
    keys = _collect_site_keys(yaml_paths, out / "keys")
    console.print(
        f"done in {time.perf_counter() - start:.0f} s: {out}/model, {out}/sigma.png, {out}/epsilon.png, {out}/metrics.jsonl; "
        f"the sites' public keys (for `fedmri verify --keys`): {keys}"
    )


def _collect_site_keys(yaml_paths: list[Path], keys: Path) -> Path:
    """Copy each simulated site's public key (node.pub in its home) to KEYS/<site_id>.pub.

    In a deployment the consortium has these already: `fedmri certs` wrote them to certs/nodes/."""
    import shutil

    from client.identity import PUBLIC
    from sites.config import load_site

    keys.mkdir(parents=True, exist_ok=True)
    for yaml_path in yaml_paths:
        site = load_site(yaml_path)
        if (site.home_dir / PUBLIC).exists():
            shutil.copyfile(site.home_dir / PUBLIC, keys / f"{site.site_id}.pub")
    return keys


def _parse_modalities(text: str | None) -> list | None:
    from common.conditions import parse_modality

    return [parse_modality(t.strip()) for t in text.split(",")] if text else None


def _parse_pathologies(text: str | None) -> list | None:
    from common.conditions import parse_pathology

    return [parse_pathology(t.strip()) for t in text.split(",")] if text else None


@app.command()
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
    skip_verify: Annotated[
        bool, typer.Option(help="Load a release without verifying its privacy.json first (says so).")
    ] = False,
    device: Device = "cpu",
) -> None:
    """Generate brain MRI slices from a prompt, or a modality x pathology grid (`--grid`).

    A release (a directory with privacy.json) is verified before it is loaded, as by
    `fedmri verify`; generation stops if verification fails.
    """
    import time

    from rich.progress import Progress

    from common.conditions import Modality, Pathology
    from common.generate import Request, grid_requests
    from common.generate import generate as run_generate
    from common.model import load_ldm
    from common.prompts import parse_prompt
    from common.weights import base_model_dir

    try:
        if grid:
            rows, cols = (
                _parse_modalities(modalities) or list(Modality),
                _parse_pathologies(pathologies) or list(Pathology),
            )
            requests, shape = grid_requests(field_strength, rows, cols), (len(rows), len(cols))
        elif prompt:
            requests, shape = [Request(parse_prompt(prompt), prompt)] * n, None
        else:
            raise ValueError("give --prompt TEXT or --grid")
        if model is not None:
            _check_before_loading(model, skip_verify)
        ldm = load_ldm(model or base_model_dir())
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    ldm.to(_device(device))
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


def _release_vs_base(release_grid: Path, base_grid: Path, out: Path) -> dict:
    """Mean and max absolute pixel change between two grids sampled with the same prompts and seeds."""
    import json

    import nibabel as nib

    a = np.asarray(nib.load(release_grid / "samples.nii.gz").dataobj, dtype=np.float64)
    b = np.asarray(nib.load(base_grid / "samples.nii.gz").dataobj, dtype=np.float64)
    diff = np.abs(a - b)
    record = {"mean_abs_change": float(diff.mean()), "max_abs_change": float(diff.max()),
              "release": str(release_grid), "base": str(base_grid)}  # fmt: skip
    out.write_text(json.dumps(record, indent=2))
    return record


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Everything the demo writes goes here.")] = Path("runs/demo"),
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    local_steps: Annotated[int, typer.Option(help="DP-SGD steps per site per round.")] = 20,
    slices_per_subject: Annotated[
        int, typer.Option(help="K: slices per sampled subject (fewer than the run config's 4, for 2 CPU cores).")
    ] = 2,
    noise_draws: Annotated[int, typer.Option(help="M: noise draws per slice (the run config's is 2).")] = 1,
    mode: Annotated[str, typer.Option(help="Fine-tuning mode: full, attention, lora or conditioning.")] = "attention",
    learning_rate: Annotated[float, typer.Option(help="Local learning rate (Adam).")] = 1e-4,
) -> None:
    """The main job: demo hospitals -> federated DP fine-tuning -> release -> verify -> grid.

    Makes the three demo hospitals, fine-tunes the shipped base across them with patient-level
    DP-SGD (each site: ε ≤ 8, δ ≤ 1e-5), packages the result as a privacy-accounted release,
    verifies it independently, and generates a modality x pathology grid at 0.3 T from the
    verified release, which includes combinations no site holds (e.g. FLAIR with glioma at 0.3 T).
    Each demo starts a fresh federation: it removes its previous run, release and the synthetic
    sites' ledgers under --out, and says so.
    """
    import json
    import shutil
    import time

    from rich.table import Table

    from sites import scenarios
    from sites.cli import make_scenario_sites

    start = time.perf_counter()
    sites_dir, run_dir, release_dir = out / "sites", out / "federation", out / "release"
    grid_dir = out / "grid-0.3T"
    for stale in (run_dir, release_dir, grid_dir, sites_dir / ".fedmri-home"):
        if stale.exists():
            console.print(f"demo: starting fresh, removing the previous demo's {stale}")
            shutil.rmtree(stale)
    make_scenario_sites(scenarios.create("demo").hospitals, sites_dir)
    simulate(out=run_dir, scenario="demo", sites_dir=sites_dir, rounds=rounds, local_steps=local_steps, batch_size=16,
             learning_rate=learning_rate, mode=mode, strategy="fedavg", base_model="shipped", resume=False,
             min_train_nodes=1, client_dp="off", client_dp_noise=1.0, client_dp_clip=1.0,
             slices_per_subject=slices_per_subject, noise_draws=noise_draws, device="")  # fmt: skip
    release(run_dir=run_dir, out=release_dir, key=None)
    verify(release_dir=release_dir, keys=run_dir / "keys")
    grid = dict(prompt=None, n=0, grid=True, field_strength=0.3, modalities=None, pathologies=None, steps=25,
                guidance=3.0, sampler="dpm++", seed=0, skip_verify=False, device="cpu")  # fmt: skip
    generate(out=grid_dir, model=release_dir, **grid)  # type: ignore[arg-type]
    generate(out=out / "grid-0.3T-base", model=None, **grid)  # type: ignore[arg-type]
    change = _release_vs_base(grid_dir, out / "grid-0.3T-base", out / "release_vs_base.json")
    manifest = json.loads((release_dir / "privacy.json").read_text())
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    table = Table(title=f"fedmri demo: {last['round']} rounds in {time.perf_counter() - start:.0f} s")
    for column in ("site", "subjects", "ε (PLD)", "ε (RDP)", "δ", "DP steps", "last σ"):
        table.add_column(column)
    for site in manifest["sites"]:
        steps = sum(s["steps"] for s in site["segments"])
        sigma = last["sites"].get(site["site_id"], {}).get("noise-multiplier", float("nan"))
        table.add_row(site["site_id"], str(site["num_subjects"]), f"{site['epsilon']:.2f}", f"{site['epsilon_rdp']:.2f}",
                      f"{site['delta']:.0e}", str(steps), f"{sigma:.2f}")  # fmt: skip
    console.print(table)
    console.print(
        f"release vs shipped base, same 20 prompts and seeds: mean |pixel change| {change['mean_abs_change']:.4f}, "
        f"max {change['max_abs_change']:.3f} (pixels in [0, 1]) -> {out / 'release_vs_base.json'}"
    )
    console.print(f"release (verified): {release_dir}  (model card: {release_dir / 'README.md'})")
    console.print(f"grid (0.3 T, every modality x pathology, from the release): {grid_dir / 'grid.png'}")
    console.print(f"plots: {run_dir / 'sigma.png'}, {run_dir / 'epsilon.png'}\nsites and contact sheets: {sites_dir}")
    console.print(
        f"evaluate it at the sites (about 5 min): fedmri evaluate --model {release_dir} --scenario demo "
        f"--sites {sites_dir} --out {out / 'evaluation'}"
    )


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="The release to evaluate (verified first).")],
    out: Annotated[Path, typer.Option(help="Folder for the tables (CSV + Markdown), evaluation.png and .json.")] = Path(
        "runs/evaluation"
    ),
    scenario: Annotated[
        str, typer.Option(help="Scenario whose hospitals evaluate (one virtual SuperNode each).")
    ] = "demo",
    sites_dir: Annotated[
        Path, typer.Option("--sites", help="Where the sites are (synthetic ones are made there if missing).")
    ] = Path("runs/sites"),
    samples: Annotated[int, typer.Option(help="Generated slices per (modality, pathology) at each site.")] = 16,
    grid_samples: Annotated[
        int, typer.Option(help="Generated slices per modality x pathology x field combination.")
    ] = 8,
    steps: Annotated[int, typer.Option(help="DPM-Solver++ steps per sample.")] = 20,
    min_subjects: Annotated[int, typer.Option(help="Skip conditions with fewer held-out subjects at a site.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the generated samples.")] = 0,
    device: Annotated[
        str, typer.Option(help=f"Where each site generates: {DEVICE_HELP} Default: each site YAML's `device:`.")
    ] = "",
) -> None:
    """Federated evaluation of a release: each site scores it on its **held-out** subjects.

    Every site (Flower Simulation Engine, the same ClientApp as in deployment) generates from the
    prompts of its held-out slices and returns only aggregates: Fréchet distance in the shipped
    evaluator's feature space (with the training-vs-held-out floor), MS-SSIM diversity, condition
    adherence (modality, pathology, field strength; also on real slices, the ceiling), the
    memorization audit (its closest-pairs PNGs stay at the site, in .fedmri-eval/) and few-shot
    downstream utility. The server adds adherence over every modality x pathology x field
    combination, marking those no site holds. Writes evaluation_*.csv/.md, evaluation.png and
    evaluation.json to --out.
    """
    import json
    import time

    from rich.table import Table

    from common.run_config import RunConfig
    from simulation.engine import run_simulation
    from sites import scenarios
    from sites.cli import make_scenario_sites

    _check_before_loading(model, skip_verify=False)
    if device:
        _device(device)
    try:
        hospitals = scenarios.create(scenario).hospitals
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    yaml_paths = make_scenario_sites(hospitals, sites_dir)
    run = RunConfig(
        task="evaluate", eval_model=str(model.resolve()), eval_samples=samples, eval_grid_samples=grid_samples,
        eval_steps=steps, eval_min_subjects=min_subjects, seed=seed, run_dir=str(out.resolve()),
        min_train_nodes=len(yaml_paths), sites=",".join(str(p.resolve()) for p in yaml_paths), device=device,
    )  # fmt: skip
    (out / "evaluation.json").unlink(missing_ok=True)
    console.print(f"evaluating {model} at {len(yaml_paths)} sites ({scenario}) -> {out}")
    start = time.perf_counter()
    run_simulation(run, len(yaml_paths))
    if not (out / "evaluation.json").exists():
        console.print("[red]error:[/red] the evaluation did not finish; see the log above")
        raise typer.Exit(1)
    summary = json.loads((out / "evaluation.json").read_text())
    if summary["errors"] or len(summary["sites"]) < len(yaml_paths):
        console.print(f"[red]error:[/red] not every site evaluated: {summary['errors']}")
        raise typer.Exit(1)
    table = Table(title=f"condition adherence of {model.name} (evaluator classifiers, {grid_samples} per combination)")
    for column in ("combinations", "modality", "pathology", "field strength"):
        table.add_column(column)
    adherence = summary["adherence"]
    for part in ("all", "held", "unseen"):
        if f"{part}_modality" in adherence:
            table.add_row(part, *(f"{adherence[f'{part}_{h}']:.0%}" for h in ("modality", "pathology", "field")))
    console.print(table)
    console.print((out / "evaluation_utility.md").read_text())
    console.print(
        f"done in {time.perf_counter() - start:.0f} s: {out}/evaluation_sites.csv/.md, evaluation_adherence.csv/.md, "
        f"evaluation_utility.csv/.md, evaluation.png; closest-pair PNGs stay with each site in .fedmri-eval/"
    )


def _check_before_loading(model: Path, skip_verify: bool) -> None:
    """Verify a release before anything of it is loaded; say plainly when no check happens."""
    from common.release import MANIFEST, ReleaseError, verify_release

    if not (model / MANIFEST).exists():
        console.print(f"[yellow]note:[/yellow] {model} is not a release (no {MANIFEST}): no privacy account to verify")
        return
    if skip_verify:
        console.print(f"[yellow]warning:[/yellow] --skip-verify: {model} is loaded WITHOUT checking its privacy.json")
        return
    try:
        checked = verify_release(model)
    except ReleaseError as err:
        console.print(f"[red]error:[/red] {err}\nrefusing to load an unverified release (--skip-verify overrides)")
        raise typer.Exit(1) from None
    console.print(f"verified {model}: {checked.files} files, {len(checked.sites)} site accounts")


@app.command()
def release(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (fedmri simulate --out, or run-dir).")],
    out: Annotated[Path, typer.Option(help="New release directory.")],
    key: Annotated[
        Path | None,
        typer.Option(
            help="The consortium's signing key (`fedmri certs` wrote consortium.key). Default: "
            "RUN_DIR/keys/consortium.key, created if missing."
        ),
    ] = None,
) -> None:
    """Package a finished federation as a privacy-accounted, signed release.

    Writes a diffusers directory (vae/, unet/, condition_encoder/, scheduler/, safetensors only),
    privacy.json (every site's DP-SGD segments, ε, δ, its signed ledger entries, and the sha256
    of every file), privacy.sig (the consortium's signature over it) and a README.md model card.
    The account comes from the run's last checkpoint. Then check it with
    `fedmri verify OUT --keys DIR`.
    """
    from server.checkpoint import CheckpointError
    from server.release import RunDirError, build_release

    try:
        _, manifest = build_release(run_dir, out, key)
    except (RunDirError, CheckpointError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    for site in manifest["sites"]:
        console.print(
            f"  {site['site_id']}: ε = {site['epsilon']:.2f} at δ = {site['delta']:.1e} ({site['accountant']})"
        )
    console.print(
        f"release: {out} ({len(manifest['files'])} files + privacy.json); check it with `fedmri verify {out}`"
    )


@app.command()
def verify(
    release_dir: Annotated[Path, typer.Argument(metavar="RELEASE", help="A release directory.")],
    keys: Annotated[
        Path | None,
        typer.Option(
            help="Folder of public keys: <site_id>.pub per site and consortium.pub "
            "(`fedmri certs` wrote them to certs/nodes/; a simulation to RUN_DIR/keys/)."
        ),
    ] = None,
) -> None:
    """Check a release without trusting fedmri's training code.

    Rehashes every file against privacy.json (a changed, missing or extra file fails); checks
    each site's hash-chained ledger entries and that the claimed segments are exactly the signed
    ones; with --keys, checks every site's signature on every entry and the consortium's on
    privacy.json; and recomputes every site's ε from its segments with Google's dp-accounting
    (PLD for a PRV claim, dp-accounting's RDP for an RDP claim). A claimed ε below the
    recomputation, or more than 0.1% above it, fails (a release states ε by the
    verifier's own method). Exit code 0 only if everything checks.
    """
    from rich.table import Table

    from common.release import ReleaseError, verify_release

    try:
        checked = verify_release(release_dir, keys)
    except ReleaseError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    table = Table(title=f"{checked.files} files match privacy.json; ε recomputed with dp-accounting")
    for column in ("site", "N", "δ", "steps", "ε claimed", "ε recomputed", "by"):
        table.add_column(column, no_wrap=True)
    for c in [*checked.sites, *([checked.client_level] if checked.client_level else [])]:
        table.add_row(c.site_id, str(c.num_subjects), f"{c.delta:.0e}", str(c.steps), f"{c.claimed:.3f}",
                      f"{c.recomputed:.3f}", "RDP" if c.accountant == "rdp" else "PLD")  # fmt: skip
    console.print(table)
    console.print(f"base model: {checked.base_model.get('name')} (sha256 {checked.base_model.get('sha256', '')[:16]}…)")
    if checked.parent:
        console.print(f"parent release: {checked.parent['name']} (sha256 {checked.parent['sha256'][:16]}…): its "
                      "sites' signed entries continue in this release and compose into the ε above")  # fmt: skip
    if checked.signatures_checked:
        console.print(f"signatures: every ledger entry and privacy.json verify with the keys in {keys}")
    else:
        console.print("[yellow]signatures NOT checked[/yellow] (chains and hashes only): pass --keys DIR")
    console.print("[green]verified[/green]")


server_app = typer.Typer(help="The consortium's SuperLink (Flower Deployment Engine).", no_args_is_help=True)
node_app = typer.Typer(help="A hospital's SuperNode (Flower Deployment Engine).", no_args_is_help=True)
app.add_typer(server_app, name="server")
app.add_typer(node_app, name="node")


def _exec(command: list[str], env: dict[str, str], retries: int = 0) -> None:
    """Print the exact Flower command, run it in the foreground and pass on its exit code.

    With retries, a failed exit restarts it after 15 s (Flower exits with status 1 on any error;
    its own code, e.g. 305 "could not activate", is in its log).
    """
    import subprocess
    import time

    from server.deploy import shown

    console.print(f"[bold]running:[/bold] {shown(command)}", soft_wrap=True)
    for attempt in range(retries + 1):
        try:
            code = subprocess.call(command, env=env)
        except FileNotFoundError:
            console.print(f"[red]error:[/red] {command[0]} not found; install fedmri (it brings flwr) here")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        if code == 0 or attempt == retries:
            break
        console.print(f"{command[0]} failed (exit {code}, see its log above); restart {attempt + 1}/{retries} in 15 s")
        time.sleep(15)
    raise typer.Exit(code)


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="New folder for ca.crt, superlink.crt/.key and nodes/<site>.key/.pub.")],
    site: Annotated[list[str], typer.Option(help="A site id that gets a node key pair (repeat).")],
    host: Annotated[
        list[str] | None,
        typer.Option(help="Host name or IP the SuperLink is reached at (repeat). Default: 127.0.0.1, localhost."),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the certificates.")] = 365,
) -> None:
    """Create the consortium CA, the SuperLink's TLS certificate and one authentication key per site.

    Give each hospital ca.crt and its own nodes/<site>.key; keep ca.key offline. Register every
    nodes/<site>.pub with `fedmri server register`.
    """
    from server.certs import make_certs

    host = host or ["127.0.0.1", "localhost"]
    try:
        files = make_certs(out, site, host, days)
    except (FileExistsError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(f"CA: {files.ca_cert} (private key {files.ca_key}: keep offline)")
    console.print(f"SuperLink: {files.superlink_cert}, {files.superlink_key} for {', '.join(host)}")
    for name, (private, public) in files.node_keys.items():
        console.print(
            f"{name}: give the site {private} and {public} (its home's node.key / node.pub); register {public}"
        )
    console.print(
        f"releases: sign with {files.consortium_key[0]} (`fedmri release --key`); "
        f"verify with `fedmri verify RELEASE --keys {files.consortium_key[1].parent}`"
    )


@server_app.command("start")
def server_start(
    certs_dir: Annotated[Path, typer.Option("--certs", help="The folder `fedmri certs` wrote.")],
    state: Annotated[Path, typer.Option(help="Folder for the SuperLink's database and FLWR_HOME.")] = Path(
        "runs/superlink"
    ),
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTPS port for the Fleet and Control APIs.")] = 9092,
) -> None:
    """Run flower-superlink with TLS and SuperNode authentication (foreground; Ctrl-C stops it)."""
    from server.deploy import flower_env, superlink_command

    state.mkdir(parents=True, exist_ok=True)
    _exec(superlink_command(certs_dir, host, port, state / "state.db"), flower_env(state / "flwr-home"))


@server_app.command("register")
def server_register(
    public_key: Annotated[Path, typer.Argument(help="A site's nodes/<site>.pub.")],
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the SuperLink.")] = "127.0.0.1:9092",
    root_cert: Annotated[Path, typer.Option(help="The consortium's ca.crt.")] = Path("certs/ca.crt"),
    flwr_home: Annotated[Path, typer.Option(help="FLWR_HOME for the flwr CLI.")] = Path("runs/flwr-home"),
) -> None:
    """Admit one site's SuperNode by registering its public key (only registered keys may connect)."""
    from server.deploy import flower_env, register_command, write_flwr_config

    write_flwr_config(flwr_home, superlink, root_cert)
    _exec(register_command(public_key), flower_env(flwr_home))


@node_app.command("start")
def node_start(
    site_yaml: Annotated[Path, typer.Option("--site", help="This hospital's site YAML.")],
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the consortium's SuperLink.")],
    root_cert: Annotated[Path, typer.Option(help="The consortium's ca.crt.")],
    key: Annotated[Path, typer.Option(help="This site's private key, nodes/<site>.key.")],
    port: Annotated[int, typer.Option(help="Local port for this node's ClientApp API.")] = 9094,
    flwr_home: Annotated[Path, typer.Option(help="FLWR_HOME for this node.")] = Path("runs/supernode"),
    retries: Annotated[
        int, typer.Option(help="Restarts after a failure, e.g. refused activation right after a crash.")
    ] = 12,
) -> None:
    """Run flower-supernode for this hospital (foreground; Ctrl-C stops it).

    The site YAML is passed as node_config `site-config`; data, cache and ledger stay here.
    The node key (--key) also signs the site's ledger: it is copied to the site home as
    node.key if the home has none, and a home that signs with another key is an error.
    Only the fedmri installed here runs: a run whose bundle (the code `flwr run` ships) differs
    from it is refused, naming the files (client/trusted_code.py). There is no switch to turn this off.
    After a crash, the SuperLink refuses to reactivate the node until it has missed two
    heartbeats (flower-supernode then fails with Flower exit code 305). A failed node is
    restarted every 15 s, up to --retries times.
    """
    from client.identity import LedgerReset, adopt_node_key
    from client.trusted_code import installed_root
    from server.deploy import flower_env, supernode_command, trusted_clientapp_env
    from sites.config import SiteConfigError, load_site

    try:
        site = load_site(site_yaml)  # fail here, with the field named, rather than in the first round
        console.print(adopt_node_key(site.home_dir, key))  # one key admits the node and signs its ledger
        env = trusted_clientapp_env(flower_env(flwr_home), flwr_home)
    except (OSError, SiteConfigError, ValueError, LedgerReset) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(
        f"Only the fedmri installed at {installed_root()} runs here: a run whose bundle differs from it is refused."
    )
    _exec(supernode_command(site_yaml, superlink, root_cert, key, port), env, retries)


@app.command("run")
def run_federation(
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the consortium's SuperLink.")] = "127.0.0.1:9092",
    root_cert: Annotated[Path, typer.Option(help="The consortium's ca.crt.")] = Path("certs/ca.crt"),
    run_config: Annotated[
        str, typer.Option(help="Overrides, e.g. \"num-server-rounds=3 run-dir='/abs/run'\" (see pyproject.toml).")
    ] = "",
    flwr_home: Annotated[Path, typer.Option(help="FLWR_HOME for the flwr CLI.")] = Path("runs/flwr-home"),
) -> None:
    """Run the federation on a SuperLink: `flwr run . fedmri --stream` with the SuperLink configured."""
    from server.deploy import flower_env, run_command, write_flwr_config

    write_flwr_config(flwr_home, superlink, root_cert)
    _exec(run_command(run_config), flower_env(flwr_home))


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="Fewer repeats, steps and sites: about 2.5 minutes on 2 cores.")] = False,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the bench's sites and runs (default: a new temporary folder). "
            "A re-run there reuses the sites and replaces the runs."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help=f"Where the DP/plain step timings run: {DEVICE_HELP}")] = "cpu",
) -> None:
    """Measure speed, memory, upload size and scale in one run; print one JSON object on stdout.

    Keys: dp_step_over_plain_step (per mode, with peak memory), upload_bytes_per_round,
    federation_overhead, sampler_speedup, scale (5/20/50 many-small sites; 5 with --quick),
    machine. Every figure is a ratio or a measurement within this run, same model and batch.
    Progress goes to stderr, so `fedmri bench --quick > bench.json` keeps the JSON clean.
    """
    import contextlib
    import json

    from simulation.bench import BenchSizes, run_bench

    err = Console(stderr=True)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        where = _device(device).type
    with contextlib.redirect_stdout(sys.stderr):  # progress bars of site making etc. stay off the JSON
        result = run_bench(
            BenchSizes.quick() if quick else BenchSizes(),
            work_dir,
            progress=lambda stage: err.print(f"bench: {stage}"),
            device=where,
        )
    print(json.dumps(result, indent=2), file=stdout)


@app.command()
def vocabulary() -> None:
    """Print the prompt vocabulary (synonyms for modality, pathology, field strength, timing)."""
    from common.prompts import vocabulary as words

    for part in words().split("; "):
        console.print(part)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
