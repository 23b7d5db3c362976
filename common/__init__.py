"""fedmri's core: model, conditioning, objective, sampling, privacy math, protocol, release format.

fedmri is a Flower App whose layout fixes five top-level packages: common, client, server, sites
and simulation. `pip install` puts them into site-packages under those names, which another
distribution may also use. Rather than fail later with a confusing import error (or, worse, run
another project's `client` as fedmri's), importing `common` checks that all five come from the same
fedmri installation and names the stranger when one does not (docs/development.md: "Package names").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGES = ("common", "client", "server", "sites", "simulation")


def _check_siblings() -> None:
    root = Path(__file__).resolve().parent.parent
    strangers = {}
    for name in PACKAGES[1:]:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is None or Path(origin).resolve().parent.parent != root:
            strangers[name] = origin or "not found"
    if strangers:
        found = "; ".join(f"'{name}' from {where}" for name, where in strangers.items())
        raise ImportError(
            f"fedmri's packages must come from one installation ({root}), but: {found}. Another distribution "
            "uses the same top-level name; install fedmri in its own virtual environment "
            "(docs/development.md: Package names)."
        )


_check_siblings()
