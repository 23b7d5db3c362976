"""Summarize scripts/fresh_clone_timing.sh's logs (OUT/chain*.log) as one JSON object on stdout."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path


def main(out: Path) -> dict:
    lines = (out / "chain.log").read_text().splitlines()
    result: dict = {
        "date": datetime.date.fromtimestamp((out / "chain.log").stat().st_mtime).isoformat(),
        "commit": lines[0].split()[0],
        "machine": {"cores": os.cpu_count(), "cpu": platform.machine(), "python": platform.python_version()},
        "ci": [],
        "speed_probe_s": {},  # scripts/speed_probe.py: higher = a slower machine at that moment
    }
    for line in lines[1:]:
        if line.startswith("probe"):
            _, when, seconds = line.split()
            result["speed_probe_s"][when] = float(seconds)
            continue
        fields = dict(re.findall(r"(\w+)=(\d+)", line))
        if line.startswith("demo"):
            result["demo"] = {
                "rc": int(fields["rc"]),
                "wall_s": int(fields["wall"]),
                "terminal_lines": int(fields["lines"]),
                "phases_s": demo_phases((out / "chain-demo.log").read_text()),
            }
        elif line.startswith("ci"):
            log = (out / f"chain-{line.split()[0]}.log").read_text()
            summary = re.findall(r"=+ (.*(?:passed|failed).*) in ([\d.]+)s", log)
            run = {"rc": int(fields["rc"]), "wall_s": int(fields["wall"])}
            if summary:
                run |= {"pytest": summary[-1][0], "pytest_s": float(summary[-1][1])}
            result["ci"].append(run)
    return result


# Where the demo's time went: the stamp ([seconds since the demo began]) of the first line that
# starts each phase, as scripts/demo.sh prints them.
PHASE_STARTS = {
    "install": "setup: installing",
    "simulation": "simulating ",
    "round 1 done": "round 1/",
    "release": "release: ",
    "first grid sampled": "sampling ",
    "done": "fedmri demo: ",
}


def demo_phases(log: str) -> dict[str, int]:
    stamped = re.findall(r"^\[(\d+)\] (.*)$", log, re.MULTILINE)
    phases = {}
    for phase, start in PHASE_STARTS.items():
        seen = [int(t) for t, text in stamped if start in text]
        if seen:
            phases[phase] = seen[0]
    return phases


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2))
