"""Where the shipped base model lives.

Normally beside this file. A Flower App bundle (FAB, built by `flwr run`) carries code and JSON
but no weight files, so a ServerApp or ClientApp started from a FAB finds only the base's
`provenance.json` here. It then uses the weights of the fedmri installed on that machine, after
checking every file against the sha256 in that provenance: the same bytes, or an error.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from common.atomic import sha256_file

NAME = "fedmri-base-v1"
BASE_MODEL = Path(__file__).parent / "weights" / NAME

log = logging.getLogger("fedmri")


def _matches(directory: Path, files: dict[str, str]) -> bool:
    return all((directory / rel).is_file() and sha256_file(directory / rel) == digest for rel, digest in files.items())


def _installed_copy(name: str = NAME) -> Path | None:
    """common/weights/<name> of the installed fedmri distribution (editable or not), if any."""
    try:
        dist = metadata.distribution("fedmri")
    except metadata.PackageNotFoundError:
        return None
    direct_url = dist.read_text("direct_url.json")
    if direct_url:
        info = json.loads(direct_url)
        if info.get("dir_info", {}).get("editable") and info.get("url", "").startswith("file://"):
            return Path(unquote(urlparse(info["url"]).path)) / "common" / "weights" / name
    return Path(str(dist.locate_file(f"common/weights/{name}")))


def base_model_dir() -> Path:
    """The shipped base model directory; raises FileNotFoundError saying what is missing and how to fix it."""
    return shipped_dir(BASE_MODEL, "`fedmri pretrain --scenario demo --out DIR --fp16` and pass --model DIR")


def shipped_dir(here: Path, rebuild: str) -> Path:
    """`here` (common/weights/<name>), or the installed fedmri's copy when `here` holds only the provenance."""
    name = here.name
    provenance = here / "provenance.json"
    if not provenance.exists():
        raise FileNotFoundError(f"{here}: shipped weights missing; rebuild them with {rebuild}")
    files = json.loads(provenance.read_text())["files"]
    if all((here / rel).is_file() for rel in files):
        return here
    installed = _installed_copy(name)
    if installed is not None and installed != here and _matches(installed, files):
        log.info("shipped %s: weights of the installed fedmri at %s (sha256 match %s)", name, installed, provenance)
        return installed
    raise FileNotFoundError(
        f"{here} has the provenance of {name} but not its weights (a Flower App bundle carries no weight "
        f"files), and no installed fedmri holds files matching its sha256 ({installed}). Install fedmri on "
        "this machine, or set run config base-model to a model directory present on every machine."
    )


def save_network(out: Path, weights: str, state: dict, provenance: dict) -> Path:
    """Write OUT/<weights> (safetensors) and OUT/provenance.json: `provenance`, the machine, the
    time, and the sha256 of the weights, which load_network checks."""
    import platform
    import time

    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out / weights)
    record = {
        **provenance,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {weights: sha256_file(out / weights)},
    }  # fmt: skip
    (out / "provenance.json").write_text(json.dumps(record, indent=2))
    return out


def load_network(directory: Path, weights: str, rebuild: str) -> tuple[dict, dict]:
    """(state dict, provenance) of a directory written by save_network, after checking every file's
    sha256 against its provenance.json; `rebuild` says how to make one."""
    from safetensors.torch import load_file

    provenance_path = directory / "provenance.json"
    if not provenance_path.exists():
        raise FileNotFoundError(f"{provenance_path} missing: no network there; build one with {rebuild}")
    provenance = json.loads(provenance_path.read_text())
    for rel, digest in provenance["files"].items():
        path = directory / rel
        if not path.exists():
            raise FileNotFoundError(f"{path} missing (listed in {provenance_path})")
        if sha256_file(path) != digest:
            raise ValueError(f"{path} does not match the sha256 in {provenance_path}: refusing a changed network")
    return load_file(directory / weights), provenance
