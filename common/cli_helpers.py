"""What the `fedmri` command modules share: the console, the help panels, --device, and the release check.

Light at import (typer and rich only): `fedmri --help` loads every command module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    import torch

console = Console()

# The panels of `fedmri --help`, in the order the root app (simulation/cli.py) adds them.
SITES_PANEL = "Sites"
MODEL_PANEL = "Model"
FEDERATION_PANEL = "Federation"
RELEASE_PANEL = "Release"
DEPLOY_PANEL = "Deploy"
EVALUATE_PANEL = "Evaluate & bench"

SITES_DIR = Path("runs/sites")  # where --sites puts the synthetic sites unless told otherwise
# --sites of the commands whose hospitals run as virtual SuperNodes (simulate, evaluate).
HospitalSites = Annotated[
    Path, typer.Option("--sites", help="Where the sites are (synthetic ones are made there if missing).")
]

DEVICE_HELP = "cpu, cuda (an error without a GPU) or auto (the GPU when torch sees one)."
Device = Annotated[str, typer.Option(help=DEVICE_HELP)]


def device_or_exit(choice: str) -> torch.device:
    """--device as a torch device, or exit 2 naming the flag."""
    from common.device import describe, resolve_device

    try:
        device = resolve_device(choice)
    except (ValueError, RuntimeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(f"device: {describe(device)}")
    return device


def check_before_loading(model: Path, skip_verify: bool) -> None:
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
