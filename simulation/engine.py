"""Run the fedmri Flower App on Flower's Simulation Engine: one virtual SuperNode per site YAML."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

from common.run_config import RunConfig

PROJECT_DIR = Path(__file__).resolve().parents[1]  # holds pyproject.toml: the Flower App


def concurrent_actors(num_sites: int, cores: int) -> int:
    """How many ClientApp actors run at once: the fewest that finish a round of equal site jobs
    soonest. On `a` actors a round takes ceil(n / a) jobs each, every job slowed by a / cores
    when actors outnumber cores; at most 2 x cores actors, since each holds torch and a model
    (memory grows with actors, not with sites: fedmri bench, scale). 3 sites on 2 cores: 3
    actors (1.5 job-times a round, not 2); 2, 4 or 50 sites on 2 cores: 2."""
    candidates = range(1, max(1, min(num_sites, 2 * cores)) + 1)
    return min(candidates, key=lambda a: (math.ceil(num_sites / a) * max(1.0, a / cores), a))


def backend_config(num_sites: int, cpus_per_client: float, gpus: int, cores: int) -> dict:
    """Ray resources for `concurrent_actors` actors at once. With `gpus` GPUs, each concurrent
    actor gets an equal share of them (num_gpus)."""
    actors = concurrent_actors(num_sites, cores)
    return {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus / actors if gpus else 0.0},
        "init_args": {"num_cpus": max(1, int(actors * cpus_per_client)), **({"num_gpus": gpus} if gpus else {})},
    }


def run_simulation(run: RunConfig, num_sites: int, cpus_per_client: float = 1.0) -> None:
    """Start the Simulation Engine (Ray) with the same ServerApp and ClientApp as deployment.

    The run config is fused exactly as `flwr run . --run-config ...` fuses it: the defaults in
    [tool.flwr.app.config] of pyproject.toml, overridden by `run`. Virtual SuperNode i gets
    node_config partition-id = i, which the ClientApp maps to the i-th YAML in run.sites.
    flwr's public run_simulation() takes no run config, so this calls its internal runner
    (flwr is pinned to 1.41.0 in pyproject.toml).
    """
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from client.app import app as client_app
    from common.logs import flower_to_file, quiet_known_warnings, verbose
    from server.app import app as server_app

    quiet_known_warnings()
    flower_to_file(Path(run.run_dir))

    overrides = run.to_flower()
    fused = get_fused_config_from_dir(PROJECT_DIR, overrides)
    RunConfig.from_flower(dict(fused))  # fail here, not inside Ray, on a bad key
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    flower_run = Run.create_empty(run_id=run_id)
    flower_run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    flower_run.federation_id = NOOP_FEDERATION_ID
    flower_run.override_config = overrides
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=fused)
    backend = backend_config(num_sites, cpus_per_client, gpus_for(run), os.cpu_count() or 1)
    # Ray's session folder for this run alone (short: Ray's sockets live there), so that the
    # ClientApps' logs kept below are this run's even when another simulation runs beside it.
    ray_dir = Path(tempfile.mkdtemp(prefix="fedmri-ray-", dir="/tmp"))
    backend["init_args"]["_temp_dir"] = str(ray_dir)
    if not verbose():  # the ClientApps' output goes to run-dir/ray-workers/, not the terminal
        backend["init_args"]["log_to_driver"] = False
    try:
        _run_simulation(
            num_supernodes=num_sites,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_config=backend,
            server_app_context=context,
            app_dir=str(PROJECT_DIR),
            run=flower_run,
            is_app=True,  # clients fuse the run config from app_dir, as under `flwr run`
            verbose_logging=verbose(),
        )
    finally:
        if not verbose():
            keep_worker_logs(ray_dir, Path(run.run_dir))
        shutil.rmtree(ray_dir, ignore_errors=True)


def keep_worker_logs(ray_dir: Path, run_dir: Path) -> Path:
    """Copy what the ClientApps (Ray workers) printed, from the run's Ray session into run_dir/ray-workers/."""
    session = ray_dir / "session_latest" / "logs"
    out = run_dir / "ray-workers"
    out.mkdir(parents=True, exist_ok=True)
    if not session.is_dir():
        print(f"[fedmri] Ray's session logs were not found at {session}; the ClientApps' output is not kept")
        return out
    for path in session.glob("worker-*"):
        if path.suffix in (".out", ".err") and path.stat().st_size:
            shutil.copy(path, out / path.name)
    return out


def gpus_for(run: RunConfig) -> int:
    """GPUs to hand Ray: every visible one when the run trains on a GPU (run config 'device' cuda or
    auto with a GPU present); none otherwise, and none when each site YAML decides (device "")."""
    import torch

    if run.device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 0
