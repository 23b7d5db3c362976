"""A site runs only the fedmri installed at the site, never code that the server ships.

In deployment, `flwr run` sends the SuperNode a bundle (FAB): a zip of the project, including
client/trainer.py, client/policy.py and client/ledger.py. Left alone, flwr 1.41 installs it
under $FLWR_HOME/apps/ and imports the ClientApp from there. The hospital would then run
whatever privacy code the server sent, e.g. a trainer edited to add no noise.

`fedmri node start` runs `flwr-clientapp` (see server/deploy.py: trusted_clientapp_env) as
`main` below. Before Flower installs the bundle, `main` compares it with the fedmri installed
here (`check_bundle`). If any compared file differs, the run is refused: the error is logged
and sent back to the server as the reply, and nothing from the bundle is installed or
imported. If the bundle matches, the ClientApp is still imported from the installed fedmri,
not from the installed bundle.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import tomllib

PACKAGES = ("client", "common", "server", "sites", "simulation")  # every file under these is compared
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".pyd", ".so", ".pth")  # ... and every such file anywhere
CONFIG = "pyproject.toml"  # compared as parsed TOML: Flower rewrites it into the bundle
FLOWER_MANIFEST = ".info/"  # the bundle's own hash list, which Flower checks and drops on install
FLOWER_VERSION = "1.41."  # the flwr whose ClientApp runtime `guard` hooks into (pyproject pins 1.41.0)
SHOWN = 12  # differences named in the refusal; the rest are counted


class UntrustedBundleError(RuntimeError):
    """The server's bundle is not the fedmri installed at this site."""


def installed_root() -> Path:
    """The folder holding the installed fedmri packages and its pyproject.toml (`pip install -e .`)."""
    return Path(__file__).resolve().parents[1]


def _compared(name: str) -> bool:
    return name == CONFIG or name.split("/")[0] in PACKAGES or name.lower().endswith(CODE_SUFFIXES)


def _flower_config(data: bytes) -> dict[str, Any]:
    """pyproject.toml as the bundle carries it: parsed, without [tool.flwr.federations] (Flower drops it)."""
    config = tomllib.loads(data.decode("utf-8"))
    config.get("tool", {}).get("flwr", {}).pop("federations", None)
    return config


def _excluded_by_flower(path: PurePosixPath) -> bool:
    """Files Flower never puts in a bundle (FAB_EXCLUDE_PATTERNS): tests and bytecode caches."""
    return "__pycache__" in path.parts or path.name.startswith("test_") or path.name.endswith("_test.py")


def check_bundle(fab: bytes, root: Path) -> list[str]:
    """The differences between a bundle (FAB zip bytes) and the fedmri installed at `root`; [] if none.

    Compared byte for byte: every file under client/, common/, server/, sites/, simulation/,
    and every Python-loadable file (.py, .pyc, .so, ...) anywhere in the bundle. A compared
    file that is not installed here differs, and so does an installed .py of those packages
    that the bundle lacks. pyproject.toml is compared as parsed TOML. Other files (README.md,
    LICENSE) are neither compared nor read.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        return ["the bundle is not a zip archive"]
    differences: list[str] = []
    seen: set[str] = set()
    with archive:
        for info in archive.infolist():
            name = info.filename
            if info.is_dir() or name.startswith(FLOWER_MANIFEST):
                continue
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts or "\\" in name:
                differences.append(f"{name}: a path outside the app")
                continue
            if name in seen:
                differences.append(f"{name}: more than once in the bundle")
                continue
            seen.add(name)
            if not _compared(name):
                continue
            installed = root / name
            if not installed.is_file():
                differences.append(f"{name}: not in the fedmri installed here")
                continue
            data = archive.read(info)
            if name == CONFIG:
                try:
                    same = _flower_config(data) == _flower_config(installed.read_bytes())
                except (tomllib.TOMLDecodeError, UnicodeDecodeError):
                    same = False
            else:
                same = data == installed.read_bytes()
            if not same:
                differences.append(f"{name}: differs from the installed file")
    for package in PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            relative = PurePosixPath(file.relative_to(root).as_posix())
            if not _excluded_by_flower(relative) and str(relative) not in seen:
                differences.append(f"{relative}: installed here, missing from the bundle")
    if CONFIG not in seen:
        differences.append(f"{CONFIG}: missing from the bundle")
    return sorted(differences)


def refusal(differences: list[str], root: Path) -> str:
    """The one-paragraph refusal logged at the site and sent back to the server."""
    shown = "; ".join(differences[:SHOWN])
    more = f"; and {len(differences) - SHOWN} more" if len(differences) > SHOWN else ""
    return (
        f"fedmri refused this run: the server's bundle is not the fedmri installed at this site ({root}), "
        f"and only the installed code runs here. {len(differences)} difference(s): {shown}{more}. "
        "Run the same fedmri release at the consortium and at every site."
    )


def guard(runtime: ModuleType, root: Path) -> None:
    """Hook flwr's ClientApp runtime (flwr.supernode.runtime.run_clientapp) at its two module-level names.

    install_from_fab: refuse (raise) a bundle that differs, before anything is unpacked.
    get_load_client_app_fn: load the ClientApp named in the installed pyproject.toml from the
    installed fedmri (root on sys.path), not from $FLWR_HOME/apps.
    """
    install: Callable[..., Any] = runtime.install_from_fab
    loader: Callable[..., Any] = runtime.get_load_client_app_fn
    log = logging.getLogger("flwr")

    def install_from_fab(fab_file: bytes, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(fab_file, bytes):
            differences = ["the bundle was not handed over as bytes"]
        else:
            differences = check_bundle(fab_file, root)
        if differences:
            message = refusal(differences, root)
            log.error(message)
            raise UntrustedBundleError(message)
        log.info("fedmri: the bundle (sha256 %s) matches the fedmri installed here", hashlib.sha256(fab_file).hexdigest()[:16])  # fmt: skip
        return install(fab_file, *args, **kwargs)

    def get_load_client_app_fn(default_app_ref: str, app_path: str | None, multi_app: bool) -> Any:
        del app_path  # Flower's choice, the installed bundle; this site's is its installed fedmri
        return loader(default_app_ref=default_app_ref, app_path=str(root), multi_app=multi_app)

    runtime.install_from_fab = install_from_fab  # type: ignore[attr-defined]
    runtime.get_load_client_app_fn = get_load_client_app_fn  # type: ignore[attr-defined]


GUARDED_NODE = "FEDMRI_GUARDED_NODE"


def main() -> int:
    """`flwr-clientapp` for `fedmri node start`: Flower's ClientApp process, guarded."""
    from importlib.metadata import version

    flower = version("flwr")
    if not flower.startswith(FLOWER_VERSION):
        print(
            f"fedmri: refusing to start a ClientApp: the code guard hooks into flwr {FLOWER_VERSION}x, found flwr {flower}",
            file=sys.stderr,
        )
        return 2
    root = installed_root()
    if not (root / CONFIG).is_file():
        print(
            f"fedmri: refusing to start a ClientApp: no {CONFIG} in {root}; install fedmri with `pip install -e .`",
            file=sys.stderr,
        )
        return 2
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    guard(run_clientapp, root)
    os.environ[GUARDED_NODE] = "1"  # client/app.py: a deployed site's YAML comes only from its node config
    sys.argv[0] = "flwr-clientapp"
    flwr_clientapp()
    return 0
