"""fedmri ServerApp: Flower glue only. The round loop is server/federation.py."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.logs import quiet_known_warnings
from common.run_config import RunConfig
from server.evaluation import run_evaluation
from server.federation import run_federation, save_final_model
from server.plots import plot_run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_known_warnings()
    logging.basicConfig(level=logging.INFO, format="[fedmri] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else every SuperLink poll is logged
    run = RunConfig.from_flower(dict(context.run_config))
    if run.task == "evaluate":
        written = run_evaluation(grid, run)
        print(f"[fedmri] evaluation written: {', '.join(str(p) for p in written)}", flush=True)
        return
    tensors = run_federation(grid, run)
    model = save_final_model(run, tensors)
    plots = plot_run(Path(run.run_dir))
    print(f"[fedmri] federated model: {model}; plots: {', '.join(str(p) for p in plots)}", flush=True)
