"""`fedmri evaluate` (a release, scored by the sites on their held-out subjects) and `fedmri bench`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.cli_helpers import (
    DEVICE_HELP,
    EVALUATE_PANEL,
    SITES_DIR,
    HospitalSites,
    check_before_loading,
    console,
    device_or_exit,
)
from common.run_config import RunConfig

app = typer.Typer(rich_markup_mode="markdown")
_DEFAULTS = RunConfig()  # `evaluate` takes its defaults from the federation's run config


@app.command(rich_help_panel=EVALUATE_PANEL)
def evaluate(
    model: Annotated[Path, typer.Option(help="The release to evaluate (verified first).")],
    out: Annotated[Path, typer.Option(help="Folder for the tables (CSV + Markdown), evaluation.png and .json.")] = Path(
        "runs/evaluation"
    ),
    scenario: Annotated[
        str, typer.Option(help="Scenario whose hospitals evaluate (one virtual SuperNode each).")
    ] = "demo",
    sites_dir: HospitalSites = SITES_DIR,
    samples: Annotated[
        int, typer.Option(help="Generated slices per (modality, pathology) at each site.")
    ] = _DEFAULTS.eval_samples,
    grid_samples: Annotated[
        int, typer.Option(help="Generated slices per modality x pathology x field combination.")
    ] = _DEFAULTS.eval_grid_samples,
    steps: Annotated[int, typer.Option(help="DPM-Solver++ steps per sample.")] = _DEFAULTS.eval_steps,
    min_subjects: Annotated[
        int, typer.Option(help="Skip conditions with fewer held-out subjects at a site.")
    ] = _DEFAULTS.eval_min_subjects,
    seed: Annotated[int, typer.Option(help="Seed of the generated samples.")] = _DEFAULTS.seed,
    device: Annotated[
        str, typer.Option(help=f"Where each site generates: {DEVICE_HELP} Default: each site YAML's `device:`.")
    ] = _DEFAULTS.device,
    public_sites: Annotated[
        Path | None,
        typer.Option(
            help="For a model with the source branch: also score the translation pairs no site holds, on the public "
            "reference sites under this folder (made there if missing; e.g. runs/sites)."
        ),
    ] = None,
) -> None:
    """Federated evaluation of a release: each site scores it on its **held-out** subjects.

    Every site (Flower Simulation Engine, the same ClientApp as in deployment) generates from the
    prompts of its held-out slices and returns only aggregates: Fréchet distance in the shipped
    evaluator's feature space (with the training-vs-held-out floor), MS-SSIM diversity, condition
    adherence (modality, pathology, field strength; also on real slices, the ceiling), the
    memorization audit (its closest-pairs PNGs stay at the site, in .fedmri-eval/) and few-shot
    downstream utility. The server adds adherence over every modality x pathology x field
    combination, marking those no site holds. For a model with the source branch, each site also
    scores missing-sequence synthesis (PSNR, SSIM and a copy baseline per source set and target;
    evaluation_translation.*), and with --public-sites the server scores the pairs no site holds on
    public reference sites (evaluation_translation_unseen.*). Writes evaluation_*.csv/.md,
    evaluation.png and evaluation.json to --out.
    """
    import json
    import time

    from rich.table import Table

    from simulation.engine import run_simulation
    from sites import scenarios
    from sites.cli import make_scenario_sites

    check_before_loading(model, skip_verify=False)
    if device:
        device_or_exit(device)
    try:
        hospitals = scenarios.create(scenario).hospitals
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    yaml_paths = make_scenario_sites(hospitals, sites_dir)
    public = make_scenario_sites(scenarios.reference_sites(), public_sites) if public_sites else []
    run = RunConfig(
        task="evaluate", eval_model=str(model.resolve()), eval_samples=samples, eval_grid_samples=grid_samples,
        eval_steps=steps, eval_min_subjects=min_subjects, seed=seed, run_dir=str(out.resolve()),
        min_train_nodes=len(yaml_paths), sites=",".join(str(p.resolve()) for p in yaml_paths), device=device,
        eval_public_sites=",".join(str(p.resolve()) for p in public),
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
    for name in ("evaluation_translation", "evaluation_translation_unseen"):
        if (out / f"{name}.md").exists():
            console.print(f"{name}.md:\n" + (out / f"{name}.md").read_text())
    console.print(
        f"done in {time.perf_counter() - start:.0f} s: {out}/evaluation_sites.csv/.md, evaluation_adherence.csv/.md, "
        f"evaluation_utility.csv/.md, evaluation.png; closest-pair PNGs stay with each site in .fedmri-eval/"
    )


@app.command(rich_help_panel=EVALUATE_PANEL)
def bench(
    quick: Annotated[
        bool, typer.Option(help="Fewer repeats, steps and sites (docs/bench.md gives its last measured time).")
    ] = False,
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

    Keys: dp_step_over_plain_step (per mode, with peak memory),
    dp_step_over_plain_step_with_multiplicity, multiplicity_signal, upload_bytes_per_round,
    federation_overhead, calibration (σ search: bisection against the secant search sites use),
    fresh_process_rounds (a deployed round's cost besides its steps, rounds 1 and 2),
    sampler_speedup, scale (5/20/50 many-small sites; 5 with --quick), machine, stage_wall_s.
    Every figure is a ratio or a measurement within this run, same model and batch.
    Progress goes to stderr, so `fedmri bench --quick > bench.json` keeps the JSON clean.
    """
    import contextlib
    import json

    from simulation.bench import BenchSizes, run_bench

    err = Console(stderr=True)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        where = device_or_exit(device).type
    with contextlib.redirect_stdout(sys.stderr):  # progress bars of site making etc. stay off the JSON
        result = run_bench(
            BenchSizes.quick() if quick else BenchSizes(),
            work_dir,
            progress=lambda stage: err.print(f"bench: {stage}"),
            device=where,
        )
    print(json.dumps(result, indent=2), file=stdout)
