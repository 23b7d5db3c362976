"""`fedmri sites audit`: does a release account for everything this site's ledger spent for it?

`fedmri verify` proves that a release's entries are ones the site signed, unedited and
unbroken. Only the site can tell whether the server left its *latest* entries out: this
compares the release with the site's own ledger, the authority on what it spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from common.protocol import SPENDING
from common.release import MANIFEST
from common.signed_entries import spent_segments


@dataclass
class Audit:
    site_id: str
    runs: list[int] = field(default_factory=list)  # the runs whose entries the release carries
    spends_in_release: int = 0
    other_runs: list[int] = field(default_factory=list)  # runs this site spent in that the release does not name
    problems: list[str] = field(default_factory=list)


def audit_release(site_id: str, ledger_path: Path, release: Path) -> Audit:
    """Every entry of the release's chain for `site_id` must be in the ledger, as one contiguous
    stretch of it, and every spend the ledger holds for those runs must be in the release."""
    result = Audit(site_id)
    manifest = json.loads((release / MANIFEST).read_text())
    claimed = next((s for s in manifest.get("sites", []) if s.get("site_id") == site_id), None)
    ledger = json.loads(ledger_path.read_text())["entries"] if ledger_path.exists() else []
    entries = [] if claimed is None else claimed["entries"]
    if not entries:  # a release this site took part in that carries none of its entries under-counts it
        where = "does not list this site" if claimed is None else "lists this site with no signed entries"
        result.problems.append(f"the release {where}: if this site trained for it, its spend is missing")
        return result
    position = {e["hash"]: i for i, e in enumerate(ledger)}
    foreign = [e for e in entries if position.get(e.get("hash")) is None or ledger[position[e["hash"]]] != e]
    if foreign:
        result.problems.append(f"{len(foreign)} entries in the release are not in this site's ledger, byte for byte")
        return result
    indices = [position[e["hash"]] for e in entries]
    if indices and indices != list(range(indices[0], indices[0] + len(indices))):
        result.problems.append("the release's entries are not one contiguous stretch of this site's ledger")
    result.runs = sorted({e["run_id"] for e in entries})
    result.spends_in_release = len(spent_segments(entries))
    held = {e["hash"] for e in entries}
    result.other_runs = sorted({e["run_id"] for e in ledger if e["status"] in SPENDING} - set(result.runs))
    for entry in ledger:
        if entry["run_id"] in result.runs and entry["status"] in SPENDING and entry["hash"] not in held:
            result.problems.append(
                f"run {entry['run_id']} round {entry['server_round']}: this site spent "
                f"(q {entry['segment']['sample_rate']:.3g}, σ {entry['segment']['noise_multiplier']:.3g}, "
                f"{entry['segment']['steps']} steps) and the release leaves it out"
            )
    return result
