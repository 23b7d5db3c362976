"""`fedmri node start`: a hospital's side of a deployment, its SuperNode."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from common.cli_helpers import DEPLOY_PANEL, console

app = typer.Typer(rich_markup_mode="markdown")
node_app = typer.Typer(help="A hospital's SuperNode (Flower Deployment Engine).", no_args_is_help=True)
app.add_typer(node_app, name="node", rich_help_panel=DEPLOY_PANEL)


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
    from server.cli import run_flower
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
    run_flower(supernode_command(site_yaml, superlink, root_cert, key, port), env, retries)
