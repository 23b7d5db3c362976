"""The site's identity in its home: the key that signs its ledger, and the marker that it has trained.

- `node.key` / `node.pub`: an ECDSA P-384 key pair in OpenSSH format. In deployment this is the
  node key `fedmri certs` made for the site (copy `nodes/<site>.key` and `.pub` here); the
  consortium verifies releases with the `.pub`. A site with no key and no history (a simulated
  hospital, or a first start) gets a new pair, and says so.
- `trained.json`: written when the site first reserves a spend, and advanced with every entry:
  how many entries its ledger holds and the hash of the last. A ledger that is missing, shorter,
  or has another entry at that position is a reset or a rollback, and the site refuses to train
  until an administrator says otherwise (`fedmri sites reset-ledger`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.atomic import atomic_write
from common.signed_entries import new_key_pair, public_key_text

log = logging.getLogger("fedmri.client")
KEY, PUBLIC, MARKER = "node.key", "node.pub", "trained.json"


class LedgerReset(RuntimeError):
    """The site's ledger does not continue what the site's marker says it already recorded."""


def load_or_create_key(home: Path) -> ec.EllipticCurvePrivateKey:
    """The site's signing key from home/node.key; a new one only if the site has no history."""
    path = home / KEY
    if path.exists():
        key: Any = serialization.load_ssh_private_key(path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: expected an ECDSA node key (as `fedmri certs` writes), got {type(key).__name__}")
        return key
    if (home / MARKER).exists():
        raise LedgerReset(
            f"{path}: missing, but {home / MARKER} says this site has trained and signed ledger entries; "
            "restore the node key from backup (a new key could not continue the signed ledger)"
        )
    key = new_key_pair(path, home / PUBLIC)
    log.warning("created a signing key for this site at %s (public half: %s)", path, home / PUBLIC)
    return key


def adopt_node_key(home: Path, key_path: Path) -> str:
    """Make the node key that admits this site (`fedmri certs`' nodes/<site>.key) the key that
    signs its ledger: copied into the home if the home has none. Returns what was done; raises
    ValueError if the home already signs with another key (the consortium could not verify)."""
    given: Any = serialization.load_ssh_private_key(key_path.read_bytes(), None)
    if not isinstance(given, ec.EllipticCurvePrivateKey):
        raise ValueError(
            f"{key_path}: expected an ECDSA node key (as `fedmri certs` writes), got {type(given).__name__}"
        )
    if (home / KEY).exists():
        if public_key_text(load_or_create_key(home).public_key()) != public_key_text(given.public_key()):
            raise ValueError(
                f"{home / KEY} signs this site's ledger but is not {key_path}, the key this node authenticates "
                "with; releases would not verify with the consortium's copy of your public key. Use one key pair."
            )
        return f"the ledger is signed with {home / KEY}, the node key"
    if (home / MARKER).exists():
        load_or_create_key(home)  # raises: the site has signed entries with a key that is gone
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_path.read_bytes())
    (home / PUBLIC).write_text(public_key_text(given.public_key()) + "\n")
    return f"copied {key_path} to {home / KEY}: it now signs this site's ledger"


@dataclass(frozen=True)
class Marker:
    site_id: str
    ledger: str
    entries: int
    head: str
    # While a reservation is re-signed as trained (same place, new hash), the marker names both
    # versions, so a crash between the ledger write and the marker write is not taken for a rollback.
    settling: str = ""


def read_marker(home: Path) -> Marker | None:
    path = home / MARKER
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return Marker(raw["site_id"], raw["ledger"], int(raw["entries"]), raw["head"], raw.get("settling", ""))


def write_marker(home: Path, marker: Marker) -> None:
    atomic_write(home / MARKER, json.dumps(marker.__dict__, indent=1))


def check_continues(home: Path, ledger_path: Path, hashes: list[str]) -> None:
    """Raise LedgerReset unless the ledger (its entry hashes) continues what the marker recorded."""
    marker = read_marker(home)
    if marker is None:
        return
    how = (
        f"restore {ledger_path} from backup; or, if your privacy officer decides that this site starts a new "
        f"budget, run `fedmri sites reset-ledger SITE.yaml --confirm <site id>`"
    )
    if not hashes:
        raise LedgerReset(
            f"{ledger_path}: missing or empty, but {home / MARKER} records that this site has trained "
            f"({marker.entries} signed entries, ledger {marker.ledger}); starting again at ε = 0 would be a silent "
            f"reset. {how}"
        )
    if len(hashes) < marker.entries or hashes[marker.entries - 1] not in {marker.head, marker.settling} - {""}:
        raise LedgerReset(
            f"{ledger_path}: holds {len(hashes)} entries that do not continue the {marker.entries} recorded in "
            f"{home / MARKER} (an older or another ledger). {how}"
        )


def reset(home: Path) -> Path | None:
    """Set the marker aside (kept, renamed with the time) so the site may start a fresh ledger."""
    path = home / MARKER
    if not path.exists():
        return None
    kept = path.with_name(f"{MARKER}.reset-{time.strftime('%Y%m%dT%H%M%S')}")
    path.rename(kept)
    return kept
