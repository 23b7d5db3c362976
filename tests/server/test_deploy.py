"""Deployment on 127.0.0.1: a real SuperLink and SuperNodes, TLS on every link, node authentication."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from server.certs import make_certs
from server.deploy import (
    flower_env,
    register_command,
    run_command,
    superlink_command,
    supernode_command,
    write_flwr_config,
)
from simulation.cli import app

BIN = Path(sys.executable).parent


def test_certs_are_what_flower_reads_and_never_overwritten(tmp_path: Path) -> None:
    files = make_certs(tmp_path / "certs", ["hospital-a"], ["127.0.0.1", "localhost"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    link = x509.load_pem_x509_certificate(files.superlink_cert.read_bytes())
    assert link.issuer == ca.subject
    ca.public_key().verify(link.signature, link.tbs_certificate_bytes, ec.ECDSA(link.signature_hash_algorithm))
    names = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    private, public = files.node_keys["hospital-a"]
    load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode parses
    load_ssh_public_key(public.read_bytes())  # what `flwr supernode register` parses
    assert oct(private.stat().st_mode & 0o777) == "0o600" and oct(files.ca_key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError, match="never overwrites"):
        make_certs(tmp_path / "certs", ["hospital-a"], ["127.0.0.1"])


def test_every_wrapper_prints_the_exact_flower_command(tmp_path: Path) -> None:
    make_certs(tmp_path / "certs", ["hospital-a"], ["127.0.0.1"])
    site = Path(__file__).resolve().parents[2] / "sites" / "hospitals" / "demo" / "hospital-a.yaml"
    result = CliRunner().invoke(
        app,
        ["node", "start", "--site", str(site), "--superlink", "127.0.0.1:1", "--root-cert",
         str(tmp_path / "certs" / "ca.crt"), "--key", str(tmp_path / "certs" / "nodes" / "hospital-a.key"),
         "--flwr-home", str(tmp_path / "home")],
        env={"PATH": ""},  # no flower-supernode on PATH: the wrapper still shows what it would run
    )  # fmt: skip
    assert "running: flower-supernode --superlink 127.0.0.1:1 --root-certificates" in " ".join(result.output.split())
    assert "--auth-supernode-private-key" in result.output and "site-config=" in result.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"port {port} never opened; {log.read_text()[-3000:]}")


@pytest.mark.slow
def test_tls_federation_with_node_authentication(tiny_sites: Path, tiny_base: Path, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["tiny-a", "tiny-b", "intruder"], ["127.0.0.1", "localhost"])
    sites = tmp_path / "sites"
    for name in ("tiny-a", "tiny-b"):  # private copies: fresh ledgers
        shutil.copytree(tiny_sites / name, sites / name)
        shutil.copy(tiny_sites / f"{name}.yaml", sites / f"{name}.yaml")
    processes: list[tuple[subprocess.Popen, Path]] = []

    def start(command: list[str], name: str) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        env = flower_env(tmp_path / f"{name}-home")
        env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
        with open(log, "w") as handle:
            process = subprocess.Popen(
                command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        processes.append((process, log))
        return process

    port = _free_port()
    cli_env = flower_env(tmp_path / "cli-home")
    cli_env["PATH"] = f"{BIN}{os.pathsep}{cli_env['PATH']}"
    try:
        link = start(superlink_command(tmp_path / "certs", "127.0.0.1", port, tmp_path / "state.db"), "superlink")
        _wait_for_port(port, link, tmp_path / "superlink.log")
        address = f"127.0.0.1:{port}"
        write_flwr_config(tmp_path / "cli-home", address, certs.ca_cert)
        for site in ("tiny-a", "tiny-b"):  # the consortium admits the two hospitals, not the intruder
            done = subprocess.run(register_command(certs.node_keys[site][1]), env=cli_env, capture_output=True, text=True, timeout=60)  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
        for site in ("tiny-a", "tiny-b"):
            start(supernode_command(sites / f"{site}.yaml", address, certs.ca_cert, certs.node_keys[site][0], _free_port()), site)  # fmt: skip
        intruder = start(
            supernode_command(sites / "tiny-a.yaml", address, certs.ca_cert, certs.node_keys["intruder"][0], _free_port()),
            "intruder",
        )  # fmt: skip

        out = tmp_path / "run"
        overrides = f"num-server-rounds=2 local-steps=2 batch-size=2 min-train-nodes=2 base-model='{tiny_base}' run-dir='{out}'"  # fmt: skip
        result = subprocess.run(run_command(overrides), env=cli_env, capture_output=True, text=True, timeout=480)
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-4000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [1, 2]
        assert all(sorted(r["sites"]) == ["tiny-a", "tiny-b"] and r["accepted"] == 2 for r in records), records

        # The unknown key was refused. Admitted, it would have been sampled too (fraction-train 1.0)
        # and made 3 replies per round; its log shows the refusal.
        intruder_log = (tmp_path / "intruder.log").read_text()
        assert "Failed to activate SuperNode" in intruder_log, intruder_log[-3000:]
        assert intruder.poll() is None or intruder.returncode != 0
        link_log = (tmp_path / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in link_log  # refused by key, not by TLS
        assert link_log.count("Activated node_id=") == 2

        # The federated model becomes a release that verifies.
        release = tmp_path / "release"
        assert CliRunner().invoke(app, ["release", str(out), "--out", str(release)]).exit_code == 0
        verified = CliRunner().invoke(app, ["verify", str(release)])
        assert verified.exit_code == 0, verified.output
    finally:
        for process, _ in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process, _ in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
