"""`flwr run .` with --run-config overrides, against a real flower-superlink (simulation runtime)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulation.engine import PROJECT_DIR

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_flwr_run_with_run_config_overrides(private_sites: Path, tiny_base: Path, tmp_path: Path, ledger_of) -> None:
    sites = private_sites  # private copies: fresh ledgers
    home, port = tmp_path / "flwr-home", free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    # The machine has no index to install app dependencies from: they are installed already.
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    superlink_log = open(tmp_path / "superlink.log", "w")  # noqa: SIM115 (closed in finally)
    superlink = subprocess.Popen(
        [BIN / "flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
         "--database", str(home / "state.db")],
        env=env, stdout=superlink_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert superlink.poll() is None, (tmp_path / "superlink.log").read_text()
            time.sleep(0.5)
        out = tmp_path / "run"
        overrides = (
            f"num-server-rounds=1 local-steps=2 batch-size=2 min-train-nodes=2 base-model='{tiny_base}' "
            f"sites='{sites / 'tiny-a.yaml'},{sites / 'tiny-b.yaml'}' run-dir='{out}'"
        )
        result = subprocess.run(
            [BIN / "flwr", "run", str(PROJECT_DIR), "test", "--stream", "--federation-config", "num-supernodes=2",
             "--run-config", overrides],
            env=env, capture_output=True, text=True, timeout=480,
        )  # fmt: skip
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-4000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [1]  # num-server-rounds=1 overrode the default 3
        assert records[0]["accepted"] == 2, log[-4000:]
        assert (out / "model" / "fedmri.json").exists()
        for site in ("tiny-a", "tiny-b"):  # each node found its own site: its own ledger has the round
            ledger = ledger_of(sites / f"{site}.yaml")
            assert [e["server_round"] for e in ledger["entries"] if e["status"] == "trained"] == [1]
    finally:
        os.killpg(superlink.pid, signal.SIGTERM)
        try:
            superlink.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(superlink.pid, signal.SIGKILL)
            superlink.wait()
        superlink_log.close()
