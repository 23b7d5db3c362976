"""The exact Flower commands behind `fedmri server start`, `fedmri node start` and `fedmri run`.

Plain functions that return argv lists (and write the `flwr` CLI's config), so that tests and
the README can show, and run, precisely what a wrapper runs. flwr 1.41 serves the Fleet and
Control APIs of a SuperLink over HTTPS on one port.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]  # the Flower App (holds pyproject.toml)
FEDERATION = "fedmri"  # the [superlink.<name>] entry `fedmri run` writes


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: their own FLWR_HOME, no runtime `uv sync` (no index here)."""
    return {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


CLIENTAPP_COMMAND = "flwr-clientapp"  # what flwr 1.41's SuperExec runs, by bare name, for each ClientApp
GUARDED_CLIENTAPP = "import sys; from client.trusted_code import main; sys.exit(main())"


def trusted_clientapp_env(env: dict[str, str], flwr_home: Path) -> dict[str, str]:
    """`env` for a flower-supernode whose ClientApps run only the fedmri installed here.

    flower-supernode starts flower-superexec, which starts each ClientApp as the bare command
    `flwr-clientapp` (SubprocessExecutor.launch). This writes <flwr_home>/trusted-bin/flwr-clientapp,
    which runs client/trusted_code.py's `main` with this Python, and puts it first on PATH.
    `main` refuses a bundle whose code differs from this installation, and imports the ClientApp
    from this installation. `-P`: the working directory is not put on sys.path.
    """
    bin_dir = (flwr_home / "trusted-bin").resolve()
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / CLIENTAPP_COMMAND
    script.write_text(
        "#!/bin/sh\n# Written by `fedmri node start`: the ClientApp runs only the fedmri installed here.\n"
        f'exec {shlex.quote(sys.executable)} -P -c {shlex.quote(GUARDED_CLIENTAPP)} "$@"\n'
    )
    script.chmod(0o755)
    guarded = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    if shutil.which(CLIENTAPP_COMMAND, path=guarded["PATH"]) != str(script):
        raise ValueError(
            f"{script} would not be the `{CLIENTAPP_COMMAND}` on PATH (is there a '{os.pathsep}' in {bin_dir}?)"
        )
    return guarded


def superlink_command(certs: Path, host: str, port: int, database: Path) -> list[str]:
    """flower-superlink with TLS (the consortium CA's certificate) and SuperNode authentication."""
    return [
        "flower-superlink",
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "superlink.crt"),
        "--ssl-keyfile", str(certs / "superlink.key"),
        "--enable-supernode-auth",
        "--host", host,
        "--port", str(port),
        "--database", str(database),
    ]  # fmt: skip


def supernode_command(site_yaml: Path, superlink: str, root_cert: Path, private_key: Path, port: int) -> list[str]:
    """flower-supernode for one site: TLS to the SuperLink, the site's key, its site YAML as node_config."""
    return [
        "flower-supernode",
        "--superlink", superlink,
        "--root-certificates", str(root_cert),
        "--auth-supernode-private-key", str(private_key),
        "--node-config", f"site-config='{site_yaml.resolve()}'",
        "--port", str(port),
    ]  # fmt: skip


def write_flwr_config(flwr_home: Path, superlink: str, root_cert: Path) -> Path:
    """$FLWR_HOME/config.toml naming the consortium SuperLink as federation `fedmri`."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "{superlink}"\nroot-certificates = "{root_cert.resolve()}"\n'
    )
    return path


def register_command(public_key: Path) -> list[str]:
    """Admit one site's SuperNode: register its public key through the Control API."""
    return ["flwr", "supernode", "register", str(public_key.resolve()), FEDERATION]


def run_command(run_config: str, app: Path = PROJECT_DIR) -> list[str]:
    """Start the federation (the ServerApp) on the consortium SuperLink and stream its log."""
    command = ["flwr", "run", str(app), FEDERATION, "--stream"]
    return [*command, "--run-config", run_config] if run_config else command


def shown(command: list[str]) -> str:
    return shlex.join(command)
