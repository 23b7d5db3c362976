"""`fedmri` commands for the consortium: package and verify releases; certificates, the SuperLink, `flwr run`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from common.cli_helpers import DEPLOY_PANEL, RELEASE_PANEL, console

app = typer.Typer(rich_markup_mode="markdown")
server_app = typer.Typer(help="The consortium's SuperLink (Flower Deployment Engine).", no_args_is_help=True)
app.add_typer(server_app, name="server", rich_help_panel=DEPLOY_PANEL)

# The SuperLink as `fedmri server start` runs it on this machine: what `server register` and `run` reach by default.
HOST, PORT = "127.0.0.1", 9092
SUPERLINK = f"{HOST}:{PORT}"
CA_CERT = Path("certs/ca.crt")  # `fedmri certs --out certs` wrote it
FLWR_HOME = Path("runs/flwr-home")  # the flwr CLI's home for `server register` and `run`


@app.command(rich_help_panel=RELEASE_PANEL)
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


@app.command(rich_help_panel=RELEASE_PANEL)
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


def run_flower(command: list[str], env: dict[str, str], retries: int = 0) -> None:
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


@app.command(rich_help_panel=DEPLOY_PANEL)
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

    host = host or [HOST, "localhost"]
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
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = HOST,
    port: Annotated[int, typer.Option(help="HTTPS port for the Fleet and Control APIs.")] = PORT,
) -> None:
    """Run flower-superlink with TLS and SuperNode authentication (foreground; Ctrl-C stops it)."""
    from server.deploy import flower_env, superlink_command

    state.mkdir(parents=True, exist_ok=True)
    run_flower(superlink_command(certs_dir, host, port, state / "state.db"), flower_env(state / "flwr-home"))


@server_app.command("register")
def server_register(
    public_key: Annotated[Path, typer.Argument(help="A site's nodes/<site>.pub.")],
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the SuperLink.")] = SUPERLINK,
    root_cert: Annotated[Path, typer.Option(help="The consortium's ca.crt.")] = CA_CERT,
    flwr_home: Annotated[Path, typer.Option(help="FLWR_HOME for the flwr CLI.")] = FLWR_HOME,
) -> None:
    """Admit one site's SuperNode by registering its public key (only registered keys may connect)."""
    from server.deploy import flower_env, register_command, write_flwr_config

    write_flwr_config(flwr_home, superlink, root_cert)
    run_flower(register_command(public_key), flower_env(flwr_home))


@app.command("run", rich_help_panel=DEPLOY_PANEL)
def run_federation(
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the consortium's SuperLink.")] = SUPERLINK,
    root_cert: Annotated[Path, typer.Option(help="The consortium's ca.crt.")] = CA_CERT,
    run_config: Annotated[
        str, typer.Option(help="Overrides, e.g. \"num-server-rounds=3 run-dir='/abs/run'\" (see pyproject.toml).")
    ] = "",
    flwr_home: Annotated[Path, typer.Option(help="FLWR_HOME for the flwr CLI.")] = FLWR_HOME,
) -> None:
    """Run the federation on a SuperLink: `flwr run . fedmri --stream` with the SuperLink configured."""
    from server.deploy import flower_env, run_command, write_flwr_config

    write_flwr_config(flwr_home, superlink, root_cert)
    run_flower(run_command(run_config), flower_env(flwr_home))
