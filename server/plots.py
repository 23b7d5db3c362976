"""PNG plots of a run's metrics.jsonl: noise multiplier and cumulative ε per site per round.

Sites send no training loss (it is a raw statistic of the subjects they sampled).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from common.protocol import read_records


def plot_run(run_dir: Path) -> list[Path]:
    """Write run_dir/sigma.png and run_dir/epsilon.png; returns their paths."""
    records = read_records((run_dir / "metrics.jsonl").read_text())
    sites = sorted({site for r in records for site in r.sites})
    written = []
    for key, label, name in (
        ("noise-multiplier", "noise multiplier σ (site's choice)", "sigma.png"),
        ("epsilon", "cumulative ε (site's accountant)", "epsilon.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for site in sites:
            replies = [(r.round, r.sites[site]) for r in records if site in r.sites]
            points = [(n, reply.metrics[key]) for n, reply in replies if key in reply.metrics]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=site)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        written.append(run_dir / name)
    return written
