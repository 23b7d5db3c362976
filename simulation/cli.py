"""The `fedmri` command (the root app assembling every part) and the federation on this machine: simulate, demo."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from client import cli as client_cli
from common import cli as model_cli
from common import cli_evaluator, cli_translate
from common.cli_helpers import (
    DEVICE_HELP,
    FEDERATION_PANEL,
    SITES_DIR,
    SITES_PANEL,
    HospitalSites,
    console,
    device_or_exit,
)
from common.logs import VERBOSE, quiet_known_warnings
from common.protocol import read_records
from common.run_config import RunConfig
from server import cli as server_cli
from simulation import cli_evaluate
from sites.cli import app as sites_app

app = typer.Typer(
    help="fedmri: federated, differentially private latent diffusion for brain MRI.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
)
federation = typer.Typer(rich_markup_mode="markdown")  # this module's commands


@app.callback()
def _quiet_unless_verbose(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Show every third-party warning and Flower's log in the terminal. Without it, the warnings "
            "fedmri has understood are hidden (common/logs.py says why each is safe) and Flower's log goes to "
            "the run directory's flower.log.",
        ),
    ] = False,
) -> None:
    if verbose:
        os.environ[VERBOSE] = "1"  # inherited by Ray's workers and Flower's ClientApp processes
    quiet_known_warnings()


_DEFAULTS = RunConfig()  # the federation's defaults: `simulate` and `demo` take theirs from here

# The demo is a short run on 2 CPU cores: per sampled subject it averages fewer slices and noise
# draws than RunConfig's K and M (client/trainer.py), and takes fewer steps per round. At the
# same ε the sites then calibrate a smaller σ, so the signal over the run, √steps/σ, falls only
# 8 % (60 -> 42 steps; docs/generator.md). Its other settings are RunConfig's.
DEMO_SLICES_PER_SUBJECT = 2
DEMO_NOISE_DRAWS = 1
DEMO_LOCAL_STEPS = 14


@federation.command(rich_help_panel=FEDERATION_PANEL)
def simulate(
    out: Annotated[Path, typer.Option(help="Run directory: metrics.jsonl, plots, checkpoints, model/.")],
    scenario: Annotated[
        str, typer.Option(help="Scenario whose hospitals federate (one virtual SuperNode each).")
    ] = "demo",
    sites_dir: HospitalSites = SITES_DIR,
    site: Annotated[
        list[Path] | None,
        typer.Option(
            "--site",
            help="A site YAML to federate instead of the scenario's synthetic hospitals (repeat it for each "
            "hospital), e.g. one written by `fedmri sites import`.",
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = _DEFAULTS.num_server_rounds,
    local_steps: Annotated[int, typer.Option(help="Proposed DP-SGD steps per site per round.")] = _DEFAULTS.local_steps,
    batch_size: Annotated[int, typer.Option(help="Proposed expected subjects per step.")] = _DEFAULTS.batch_size,
    learning_rate: Annotated[float, typer.Option(help="Proposed local learning rate.")] = _DEFAULTS.learning_rate,
    mode: Annotated[
        str, typer.Option(help="Fine-tuning mode: full, attention, lora or conditioning (the condition encoder only).")
    ] = _DEFAULTS.finetune_mode,
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam.")] = _DEFAULTS.strategy,
    base_model: Annotated[str, typer.Option(help="'shipped' or a model directory.")] = _DEFAULTS.base_model,
    resume: Annotated[bool, typer.Option(help="Continue from the last valid checkpoint in --out.")] = _DEFAULTS.resume,
    min_train_nodes: Annotated[
        int, typer.Option(help="Sites needed for a round to count.")
    ] = _DEFAULTS.min_train_nodes,
    client_dp: Annotated[
        str, typer.Option(help="Client-level DP at the server: off, or fixed (clip each site's update, add noise).")
    ] = _DEFAULTS.client_dp,
    client_dp_noise: Annotated[
        float, typer.Option(help="Client-level noise multiplier σ.")
    ] = _DEFAULTS.client_dp_noise,
    client_dp_clip: Annotated[
        float, typer.Option(help="Client-level clipping norm C of a site's update.")
    ] = _DEFAULTS.client_dp_clip,
    slices_per_subject: Annotated[
        int, typer.Option(help="K: slices averaged inside each sampled subject's clipped gradient.")
    ] = _DEFAULTS.slices_per_subject,
    noise_draws: Annotated[
        int, typer.Option(help="M: noise/timestep draws per slice, likewise.")
    ] = _DEFAULTS.noise_draws,
    mask_branch: Annotated[
        bool,
        typer.Option(
            help="Add the lesion-mask branch to the base and train it with the sites' lesion masks (docs/masks.md)."
        ),
    ] = _DEFAULTS.mask_branch,
    device: Annotated[
        str, typer.Option(help=f"Every simulated site's device: {DEVICE_HELP} Default: each site YAML's `device:`.")
    ] = _DEFAULTS.device,
) -> None:
    """Simulate the federation on this machine with Flower's Simulation Engine.

    Uses the same ServerApp and ClientApp as a real deployment; each site trains with
    patient-level DP-SGD under its own privacy policy and ledger.
    """
    import time

    from simulation.engine import run_simulation
    from sites import scenarios
    from sites.cli import make_scenario_sites

    try:
        hospitals = scenarios.create(scenario).hospitals
        run = RunConfig(
            num_server_rounds=rounds, local_steps=local_steps, batch_size=batch_size, learning_rate=learning_rate,
            finetune_mode=mode, strategy=strategy, base_model=base_model, resume=resume, min_train_nodes=min_train_nodes,
            run_dir=str(out.resolve()), sites="", client_dp=client_dp, client_dp_noise=client_dp_noise,
            client_dp_clip=client_dp_clip, device=device, slices_per_subject=slices_per_subject, noise_draws=noise_draws,
            mask_branch=mask_branch,
        )  # fmt: skip
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    if device:
        device_or_exit(device)
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
    yaml_paths = _given_sites(site) if site else make_scenario_sites(hospitals, sites_dir)
    run = dataclasses.replace(run, sites=",".join(str(p.resolve()) for p in yaml_paths))
    console.print(f"simulating {len(yaml_paths)} sites x {rounds} rounds ({mode}, {strategy}) -> {out}")
    start = time.perf_counter()
    run_simulation(run, len(yaml_paths))
    records = read_records((out / "metrics.jsonl").read_text()) if (out / "metrics.jsonl").exists() else []
    if not records or records[-1].round != rounds or not (out / "model" / "fedmri.json").exists():
        console.print(f"[red]error:[/red] the simulation did not complete {rounds} rounds; see the log above")
        raise typer.Exit(1)
    if sum(r.accepted for r in records) == 0:
        console.print("[red]error:[/red] no site update was aggregated in any round; see the log above")
        raise typer.Exit(1)
    keys = _collect_site_keys(yaml_paths, out / "keys")
    console.print(
        f"done in {time.perf_counter() - start:.0f} s: {out}/model, {out}/sigma.png, {out}/epsilon.png, {out}/metrics.jsonl; "
        f"the sites' public keys (for `fedmri verify --keys`): {keys}"
    )


def _given_sites(paths: list[Path]) -> list[Path]:
    """The --site YAMLs, each checked as its client will load it; an error names the file."""
    from sites.config import SiteConfigError, load_site

    ids: dict[str, Path] = {}
    for path in paths:
        try:
            site_id = load_site(path).site_id
        except (OSError, SiteConfigError) as err:
            console.print(f"[red]error:[/red] --site: {err}")  # the error names the file
            raise typer.Exit(2) from None
        if site_id in ids:
            console.print(f"[red]error:[/red] --site {path}: site id {site_id!r} is also {ids[site_id]}'s")
            raise typer.Exit(2)
        ids[site_id] = path
    return paths


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


@federation.command(rich_help_panel=FEDERATION_PANEL)
def demo(
    out: Annotated[Path, typer.Option(help="Everything the demo writes goes here.")] = Path("runs/demo"),
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = _DEFAULTS.num_server_rounds,
    local_steps: Annotated[
        int, typer.Option(help=f"DP-SGD steps per site per round (the run config's is {_DEFAULTS.local_steps}).")
    ] = DEMO_LOCAL_STEPS,
    slices_per_subject: Annotated[
        int,
        typer.Option(
            help=f"K: slices per sampled subject (fewer than the run config's {_DEFAULTS.slices_per_subject}, "
            "for 2 CPU cores)."
        ),
    ] = DEMO_SLICES_PER_SUBJECT,
    noise_draws: Annotated[
        int, typer.Option(help=f"M: noise draws per slice (the run config's is {_DEFAULTS.noise_draws}).")
    ] = DEMO_NOISE_DRAWS,
    mode: Annotated[
        str, typer.Option(help="Fine-tuning mode: full, attention, lora or conditioning.")
    ] = _DEFAULTS.finetune_mode,
    learning_rate: Annotated[float, typer.Option(help="Local learning rate (Adam).")] = _DEFAULTS.learning_rate,
) -> None:
    """The main job: demo hospitals -> federated DP fine-tuning -> release -> verify -> grid.

    Makes the three demo hospitals, fine-tunes the shipped base across them with patient-level
    DP-SGD (each site: ε ≤ 8, δ ≤ 1e-5), packages the result as a privacy-accounted release,
    verifies it independently, and generates a modality x pathology grid at 0.3 T from the
    verified release, which includes combinations no site holds (e.g. FLAIR with glioma at 0.3 T).
    Each demo starts a fresh federation: it removes its previous run, release and the synthetic
    sites' ledgers under --out, and says so.
    """
    import shutil
    import time

    start = time.perf_counter()
    sites_dir, run_dir, release_dir = out / "sites", out / "federation", out / "release"
    grid_dir = out / "grid-0.3T"
    for stale in (run_dir, release_dir, grid_dir, sites_dir / ".fedmri-home"):
        if stale.exists():
            console.print(f"demo: starting fresh, removing the previous demo's {stale}")
            shutil.rmtree(stale)
    # simulate makes the demo hospitals (or reuses them). Every option the demo does not set is
    # the command's default (RunConfig's, generate's).
    simulate(out=run_dir, scenario="demo", sites_dir=sites_dir, rounds=rounds, local_steps=local_steps,
             learning_rate=learning_rate, mode=mode, slices_per_subject=slices_per_subject, noise_draws=noise_draws)  # fmt: skip
    server_cli.release(run_dir=run_dir, out=release_dir)
    server_cli.verify(release_dir=release_dir, keys=run_dir / "keys")
    base_grid_dir = out / "grid-0.3T-base"
    for model, grid_out in ((release_dir, grid_dir), (None, base_grid_dir)):  # same prompts and seeds
        model_cli.generate(out=grid_out, model=model, grid=True, field_strength=0.3)
    change = _release_vs_base(grid_dir, base_grid_dir, out / "release_vs_base.json")
    last = read_records((run_dir / "metrics.jsonl").read_text())[-1]
    sigmas = ", ".join(
        f"{site} {r.metrics.get('noise-multiplier', float('nan')):.2f}" for site, r in sorted(last.sites.items())
    )
    # Each site's ε is in verify's table above: recomputed from the signed ledgers, not re-typed here.
    console.print(f"fedmri demo: {last.round} rounds in {time.perf_counter() - start:.0f} s; last σ: {sigmas}")
    console.print(
        f"release vs shipped base, same 20 prompts and seeds: mean |pixel change| {change['mean_abs_change']:.4f}, "
        f"max {change['max_abs_change']:.3f} (pixels in [0, 1]) -> {out / 'release_vs_base.json'}"
    )
    console.print(f"release (verified): {release_dir}  (model card: {release_dir / 'README.md'})")
    console.print(f"grid (0.3 T, every modality x pathology, from the release): {grid_dir / 'grid.png'}")
    console.print(f"plots: {run_dir / 'sigma.png'}, {run_dir / 'epsilon.png'}; sites and contact sheets: {sites_dir}")
    console.print(f"full logs: {run_dir / 'flower.log'}, {run_dir / 'ray-workers'}")
    console.print(
        f"evaluate it at the sites (about 5 min): fedmri evaluate --model {release_dir} --scenario demo "
        f"--sites {sites_dir} --out {out / 'evaluation'}"
    )


# `fedmri --help` shows the panels in the order of these parts.
app.add_typer(sites_app, name="sites", rich_help_panel=SITES_PANEL)
for part in (
    model_cli.app,
    cli_translate.app,
    cli_evaluator.app,
    federation,
    server_cli.app,
    client_cli.app,
    cli_evaluate.app,
):
    app.add_typer(part)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
