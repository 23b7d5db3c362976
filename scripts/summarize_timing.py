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
    }
    for line in lines[1:]:
        fields = dict(re.findall(r"(\w+)=(\d+)", line))
        if line.startswith("demo"):
            result["demo"] = {
                "rc": int(fields["rc"]),
                "wall_s": int(fields["wall"]),
                "terminal_lines": int(fields["lines"]),
            }
        elif line.startswith("ci"):
            log = (out / f"chain-{line.split()[0]}.log").read_text()
            summary = re.findall(r"=+ (.*(?:passed|failed).*) in ([\d.]+)s", log)
            run = {"rc": int(fields["rc"]), "wall_s": int(fields["wall"])}
            if summary:
                run |= {"pytest": summary[-1][0], "pytest_s": float(summary[-1][1])}
            result["ci"].append(run)
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2))
