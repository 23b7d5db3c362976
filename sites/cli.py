"""`fedmri sites ...`: make synthetic hospitals and summarize any site's data."""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from sites import scenarios
from sites.config import SiteConfig, SiteConfigError, load_site
from sites.make import make_site, write_site_yaml

app = typer.Typer(help="Synthetic hospitals and site data.", no_args_is_help=True, rich_markup_mode="markdown")
console = Console()


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def make_scenario_sites(
    sites: list[SiteConfig], out: Path, workers: int = 2, contact_sheets: bool = True, subjects: int | None = None
) -> list[Path]:
    """Make each synthetic site under `out` (skipping unchanged ones); return their YAML paths."""
    from sites.contact_sheet import render_contact_sheet

    out.mkdir(parents=True, exist_ok=True)
    yaml_paths = []
    with _progress() as progress:
        for site in sites:
            if subjects is not None and site.synthetic is not None:
                site = dataclasses.replace(site, synthetic=dataclasses.replace(site.synthetic, num_subjects=subjects))
            spec = site.synthetic
            assert spec is not None
            task = progress.add_task(f"{site.site_id:>14} ({spec.field_strength:g} T)", total=spec.num_subjects)
            made = make_site(site, out, workers=workers, progress=functools.partial(progress.advance, task))
            if not made:
                progress.update(task, description=f"{site.site_id:>14} (unchanged, reused)")
            yaml_paths.append(write_site_yaml(site, out))
            sheet = out / f"{site.site_id}_contact_sheet.png"
            if contact_sheets and (made or not sheet.exists()):
                render_contact_sheet(
                    out / site.site_id,
                    sheet,
                    title=f"{site.site_id}: {spec.field_strength:g} T, {spec.num_subjects} subjects",
                )
    return yaml_paths


@app.command("make")
def make(
    out: Annotated[
        Path, typer.Option("--out", help="Folder that receives one BIDS dataset and one site YAML per hospital.")
    ],
    scenario: Annotated[str, typer.Option(help=f"Named set of hospitals: {', '.join(scenarios.SCENARIOS)}.")] = "demo",
    site: Annotated[
        list[Path] | None, typer.Option("--site", help="Make only these hospital YAML files (instead of a scenario).")
    ] = None,
    public: Annotated[bool, typer.Option(help="Also make the scenario's public pretraining sets.")] = True,
    subjects: Annotated[
        int | None, typer.Option(help="Override every site's number of subjects (quick trials).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes generating subjects in parallel.")] = 2,
) -> None:
    """Generate synthetic hospitals as BIDS datasets from the MNI152 template and MR physics.

    Each hospital gets `OUT/SITE_ID/` (BIDS: scans, sidecars, participants.tsv, ground truth
    under derivatives/), `OUT/SITE_ID.yaml` (the file its client reads) and
    `OUT/SITE_ID_contact_sheet.png`. Output is deterministic for the seeds in the YAML files,
    and sites whose definition has not changed are reused, not rebuilt.
    """
    start = time.perf_counter()
    try:
        if site:
            chosen = [load_site(p) for p in site]
        else:
            sc = scenarios.create(scenario)
            chosen = sc.all_sites if public else sc.hospitals
    except (SiteConfigError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    paths = make_scenario_sites(chosen, out, workers=workers, subjects=subjects)
    console.print(f"made {len(paths)} sites in {time.perf_counter() - start:.0f} s under {out}")
    summarize(paths)


def summarize(yaml_paths: list[Path]) -> None:
    """Read every site through the client's BIDS reader and print one table."""
    from sites.bids import SiteDataError, read_site_data

    table = Table(title="sites, as their clients will read them")
    for column in ("site", "field", "subjects", "pathologies", "modalities (slices)", "skipped"):
        table.add_column(column)
    skipped: list[str] = []  # every file a site's reader dropped, with its reason
    with _progress() as progress:
        for path in yaml_paths:
            cfg = load_site(path)
            task = progress.add_task(f"reading {cfg.site_id}", total=None)

            def shown(done: int, total: int, t: TaskID = task) -> None:
                progress.update(t, completed=done, total=total)

            try:
                data = read_site_data(cfg, progress=shown)
            except SiteDataError as err:
                table.add_row(cfg.site_id, "-", "-", "-", "-", f"[red]{err}[/red]")
                continue
            s = data.summary()
            table.add_row(
                cfg.site_id,
                ", ".join(f"{b:g} T" for b in s["field_strengths"]),
                str(s["subjects"]),
                ", ".join(f"{k} {v}" for k, v in s["pathologies"].items()),
                ", ".join(f"{k} ({v})" for k, v in s["modalities"].items()),
                str(len(s["skipped"])),
            )
            skipped += [f"{cfg.site_id}: {entry['file']}: {entry['reason']}" for entry in s["skipped"]]
    console.print(table)
    if skipped:
        console.print(f"skipped files ({len(skipped)}), each with its reason:")
        for line in skipped:
            console.print(f"  {line}", markup=False, highlight=False)


@app.command("summary")
def summary(
    site_yaml: Annotated[list[Path], typer.Argument(help="Site YAML files (or folders holding them).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")] = False,
) -> None:
    """Check and summarize sites exactly as their clients will read them."""
    paths = [p for item in site_yaml for p in (sorted(item.glob("*.yaml")) if item.is_dir() else [item])]
    try:
        if as_json:
            from sites.bids import read_site_data

            out = {site.site_id: read_site_data(site).summary() for site in map(load_site, paths)}
            print(json.dumps(out, indent=2))
        else:
            summarize(paths)
    except (SiteConfigError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None


@app.command("import")
def import_(
    dataset: Annotated[
        str,
        typer.Argument(
            metavar="DATASET", help="ixi, brats (2021 or 2023 naming), fets, oasis3, fastmri-brain or m4raw."
        ),
    ],
    src: Annotated[
        Path, typer.Argument(metavar="SRC", help="The dataset as downloaded and extracted (never modified).")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder that receives one BIDS site and one site YAML per hospital.")
    ],
    copy: Annotated[
        bool,
        typer.Option(
            "--copy/--link",
            help="Copy the dataset's NIfTI files into the sites, or link to them (symlinks, the default). "
            "HDF5 datasets are always converted to NIfTI and written.",
        ),
    ] = False,
    assume: Annotated[
        list[str] | None,
        typer.Option(
            "--assume",
            metavar="KEY=VALUE",
            help="State a value the dataset does not give: field=TESLA (or field=unknown to leave it out), "
            "pathology=LABEL. Recorded in the sidecars and the site's README. Repeatable.",
        ),
    ] = None,
    partitioning: Annotated[
        Path | None, typer.Option(help="fets: the partitioning CSV (default: SRC/partitioning_1.csv).")
    ] = None,
    clinical: Annotated[
        Path | None, typer.Option(help="oasis3: the CDR spreadsheet OASIS3_UDSb4_cdr.csv (default: found under SRC).")
    ] = None,
) -> None:
    """Write a public MRI dataset as fedmri sites: one BIDS folder and one site YAML per hospital.

    DATASET is ixi, brats, fets, oasis3, fastmri-brain or m4raw; SRC is the extracted download.
    Sidecars hold only what the dataset states (field strength from its scanner table or
    ISMRMRD header, TR/TE/TI in seconds where known); pathology comes from its own labels. A
    value it does not state is an error until you state it with `--assume`. HDF5 datasets
    (fastmri-brain, m4raw) are imported from their stored magnitude image, `reconstruction_rss`.
    Each site's README says how every value was obtained and what was left out, and why.
    Layouts, licences and recipes: docs/datasets.md.
    """
    from sites.importers import CONVERTED, import_dataset
    from sites.importers.site_writer import DatasetImportError, Options, parse_assumptions

    words = ["fedmri", "sites", "import", dataset, str(src), "--out", str(out), "--copy" if copy else "--link"]
    words += [w for a in assume or [] for w in ("--assume", a)]
    words += [w for name, value in (("--partitioning", partitioning), ("--clinical", clinical)) if value for w in (name, str(value))]  # fmt: skip
    command = shlex.join(words)  # as given, so the site README's copy can be run again
    try:
        options = Options(out, copy, parse_assumptions(assume or []))
        if dataset in CONVERTED:
            mode = "converted from HDF5 (reconstruction_rss) and written as NIfTI"
        else:
            mode = "copied" if copy else "linked (symlinks to SRC)"
        console.print(f"importing {dataset} from {src} into {out}; image data {mode}")
        paths = import_dataset(dataset, src, options, command, console.print, partitioning, clinical)
    except DatasetImportError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(f"wrote {len(paths)} sites: {', '.join(str(p) for p in paths)}")
    console.print(f"check them as their clients will read them: fedmri sites summary {out}")


@app.command("reset-ledger")
def reset_ledger(
    site_yaml: Annotated[Path, typer.Argument(metavar="SITE_YAML", help="The site's YAML file.")],
    confirm: Annotated[str, typer.Option(help="The site id, typed out: this restarts the site's budget at ε = 0.")],
) -> None:
    """Let a site that has trained before start a fresh privacy ledger (its budget restarts at 0).

    A site refuses to train when its ledger is missing, shorter than, or different from what its
    marker (`trained.json` in the site home, beside node.key) recorded. Restore the ledger from
    backup if you can. Run this only when the site's privacy officer has decided that a new
    budget begins: the marker is kept (renamed with the date) and the old ledger, if present, is
    set aside beside it, never deleted.
    """
    from client.identity import reset
    from sites.config import SiteConfigError, load_site

    try:
        site = load_site(site_yaml)
    except SiteConfigError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    if confirm != site.site_id:
        console.print(f"[red]error:[/red] --confirm must be the site id {site.site_id!r} (got {confirm!r})")
        raise typer.Exit(2)
    kept = reset(site.home_dir)
    if kept is None:
        console.print(f"{site.site_id}: no marker in {site.home_dir}; the site has never trained, nothing to reset")
        return
    if site.ledger_path.exists():
        aside = site.ledger_path.with_name(f"{site.ledger_path.name}.{kept.name.rsplit('.', 1)[-1]}")
        site.ledger_path.rename(aside)
        console.print(f"old ledger set aside: {aside}")
    console.print(f"{site.site_id}: marker kept as {kept}; the next round starts a fresh ledger at ε = 0")


@app.command("audit")
def audit(
    site_yaml: Annotated[Path, typer.Argument(metavar="SITE_YAML", help="The site's YAML file.")],
    release: Annotated[Path, typer.Argument(metavar="RELEASE", help="A fedmri release directory.")],
) -> None:
    """Check a release against this site's own ledger: did it leave out any spend?

    `fedmri verify` proves that a release's entries were signed by the site, unedited and
    unbroken. Only the site can see whether the server dropped its latest entries. This checks
    that every entry the release carries for this site is in the site's ledger, byte for byte
    and in one unbroken stretch, and that every spend the ledger holds for the runs the release
    names is in the release. Exit code 0 only if it does.
    """
    from client.audit import audit_release
    from sites.config import SiteConfigError, load_site

    try:
        site = load_site(site_yaml)
        result = audit_release(site.site_id, site.ledger_path, release)
    except (OSError, SiteConfigError, ValueError, KeyError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    if result.problems:
        console.print(f"[red]{site.site_id}: the release does not account for this site's ledger[/red]")
        for problem in result.problems:
            console.print(f"  - {problem}")
        raise typer.Exit(1)
    runs = ", ".join(map(str, result.runs)) or "none"
    if result.other_runs:  # only the site knows whether one of these also fed this release
        others = ", ".join(map(str, result.other_runs))
        console.print(f"[yellow]note:[/yellow] this site also spent in runs {others}, which the release does not name")
    console.print(
        f"{site.site_id}: the release accounts for every spend of this site in runs {runs} "
        f"({result.spends_in_release} segments, all in the site's ledger)"
    )
