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
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from client.identity import adopt_node_key
from server.certs import make_certs
from server.deploy import (
    PROJECT_DIR,
    flower_env,
    register_command,
    run_command,
    superlink_command,
    supernode_command,
    trusted_clientapp_env,
    write_flwr_config,
)
from simulation.cli import app
from sites.config import load_site

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
    # On by default: the node's ClientApps are started by the guarded flwr-clientapp (client/trusted_code.py).
    assert "a run whose bundle differs from it is refused" in " ".join(result.output.split())
    wrapper = tmp_path / "home" / "trusted-bin" / "flwr-clientapp"
    assert "client.trusted_code" in wrapper.read_text() and os.access(wrapper, os.X_OK)


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


class Cluster:
    """Real Flower processes on 127.0.0.1, each in its own process group, stopped by pid."""

    def __init__(self, tmp_path: Path, site_ids: list[str]) -> None:
        self.tmp = tmp_path
        self.certs = make_certs(tmp_path / "certs", site_ids, ["127.0.0.1", "localhost"])
        self.processes: dict[str, subprocess.Popen] = {}
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cli_env = self.env("cli")
        write_flwr_config(tmp_path / "cli-home", self.address, self.certs.ca_cert)

    def env(self, name: str) -> dict[str, str]:
        env = flower_env(self.tmp / f"{name}-home")
        env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
        return env

    def start(self, command: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "a") as log:
            process = subprocess.Popen(
                command, env=env or self.env(name), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def start_superlink(self) -> None:
        link = self.start(superlink_command(self.tmp / "certs", "127.0.0.1", self.port, self.tmp / "state.db"), "superlink")  # fmt: skip
        _wait_for_port(self.port, link, self.tmp / "superlink.log")

    def register(self, site: str) -> None:
        done = subprocess.run(
            register_command(self.certs.node_keys[site][1]),
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def start_node(self, site_yaml: Path, key_of: str, name: str) -> subprocess.Popen:
        """flower-supernode as `fedmri node start` runs it: only the installed fedmri runs in its ClientApps,
        and the node key signs the site's ledger."""
        adopt_node_key(load_site(site_yaml).home_dir, self.certs.node_keys[key_of][0])
        command = supernode_command(site_yaml, self.address, self.certs.ca_cert, self.certs.node_keys[key_of][0], _free_port())  # fmt: skip
        return self.start(command, name, trusted_clientapp_env(self.env(name), self.tmp / f"{name}-home"))

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.kill(name)


def _wait_for_rounds(metrics: Path, rounds: int, run: subprocess.Popen, seconds: float = 900) -> None:
    deadline = time.time() + seconds
    while not (metrics.exists() and metrics.read_text().count("\n") >= rounds):
        assert run.poll() is None, "the federation ended early"
        assert time.time() < deadline, f"round {rounds} never completed"
        time.sleep(0.2)


@pytest.mark.slow
def test_tls_federation_with_node_authentication_and_a_killed_node(
    private_sites: Path, tiny_base: Path, tmp_path: Path, ledger_of
) -> None:
    """TLS everywhere, two registered hospitals and one unregistered key; a node killed in round 2
    is left out, rejoins with its ledger, and the run's signed release verifies with the certs' keys.

    (One cluster for both stories: each real-process federation costs minutes on 2 cores.)"""
    sites = private_sites
    cluster = Cluster(tmp_path, ["tiny-a", "tiny-b", "intruder"])
    try:
        cluster.start_superlink()
        for site in ("tiny-a", "tiny-b"):  # the consortium admits the two hospitals, not the intruder
            cluster.register(site)
            cluster.start_node(sites / f"{site}.yaml", site, site)
        rogue = yaml.safe_load((sites / "tiny-a.yaml").read_text()) | {"home": str(tmp_path / "intruder-home")}
        (sites / "intruder.yaml").write_text(yaml.safe_dump(rogue))  # a plausible site, an unregistered key
        intruder = cluster.start_node(sites / "intruder.yaml", "intruder", "intruder")
        out = tmp_path / "run"
        overrides = (
            # The timeout is generous so that no round's outcome depends on the machine's load: round 1
            # (fresh ClientApp processes importing torch) must never time out, and round 2 waits
            # for the killed node long enough for it to come back (2 missed 30 s heartbeats) by round 3.
            f"num-server-rounds=4 local-steps=2 batch-size=2 min-train-nodes=1 round-timeout=150.0 "
            f"base-model='{tiny_base}' run-dir='{out}'"
        )
        with open(tmp_path / "run.log", "w") as log:
            run = subprocess.Popen(run_command(overrides), env=cluster.cli_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        cluster.processes["run"] = run
        metrics = out / "metrics.jsonl"
        _wait_for_rounds(metrics, 1, run)
        cluster.kill("tiny-b", signal.SIGKILL)  # as round 2 goes out: no goodbye, no reply
        _wait_for_rounds(metrics, 2, run)
        # The hospital restarts its node. Until the SuperLink has marked the crashed node offline
        # (2 missed heartbeats) it refuses to activate it again (Flower exit code 305, process status 1): retry, as
        # `fedmri node start` does.
        activated = cluster.log("superlink").count("Activated node_id=")
        deadline = time.time() + 180
        while cluster.log("superlink").count("Activated node_id=") == activated:
            refusals = cluster.log("tiny-b").count("Failed to activate SuperNode")
            node = cluster.start_node(sites / "tiny-b.yaml", "tiny-b", "tiny-b")
            while node.poll() is None and cluster.log("superlink").count("Activated node_id=") == activated:
                time.sleep(0.5)
            if node.poll() is not None:  # refused: status 1, and Flower's code 305 in its log
                assert node.returncode != 0
                assert cluster.log("tiny-b").count("Failed to activate SuperNode") == refusals + 1
                assert time.time() < deadline, cluster.log("tiny-b")[-3000:]
                time.sleep(1)
        assert run.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-4000:]

        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["round"] for r in records] == [1, 2, 3, 4]
        assert records[0]["accepted"] == 2 and sorted(records[0]["sites"]) == ["tiny-a", "tiny-b"]

        # The unknown key was refused. Admitted, it would have been sampled too (fraction-train 1.0)
        # and made 3 replies in round 1; its log shows the refusal.
        intruder_log = cluster.log("intruder")
        assert "Failed to activate SuperNode" in intruder_log, intruder_log[-3000:]
        assert intruder.poll() is None or intruder.returncode != 0
        link_log = cluster.log("superlink")
        assert "No SuperNode found with the given public key" in link_log  # refused by key, not by TLS
        assert link_log.count("Activated node_id=") == 3  # tiny-a, tiny-b, and tiny-b again
        assert records[1]["accepted"] == 1 and records[1]["sites"]["tiny-a"]["status"] == "trained"
        assert records[1]["sites"].get("tiny-b", {}).get("status") in (None, "error")
        rejoined = [r["round"] for r in records[2:] if r["sites"].get("tiny-b", {}).get("status") == "trained"]
        # Back in round 3 or 4: reactivation waits for 2 missed heartbeats (30 s each) after the kill,
        # while round 2 waits up to 150 s for the dead node's reply.
        assert rejoined, [(r["round"], r["wall_s"], sorted(r["sites"])) for r in records]

        ledger = ledger_of(sites / "tiny-b.yaml")  # parses: never torn
        trained = [e for e in ledger["entries"] if e["status"] == "trained"]
        assert trained[0]["server_round"] == 1 and trained[-1]["server_round"] == rejoined[-1]
        assert trained[-1]["epsilon"] > trained[0]["epsilon"]  # spending continued from the ledger
        assert records[-1]["sites"]["tiny-b"]["epsilon"] == pytest.approx(trained[-1]["epsilon"])

        # The federated model becomes a release signed with the consortium's key from `fedmri certs`,
        # and every site entry verifies with the node keys the consortium registered.
        release = tmp_path / "release"
        key = str(cluster.certs.consortium_key[0])
        assert CliRunner().invoke(app, ["release", str(out), "--out", str(release), "--key", key]).exit_code == 0
        verified = CliRunner().invoke(app, ["verify", str(release), "--keys", str(tmp_path / "certs" / "nodes")])
        assert verified.exit_code == 0 and "every ledger entry and privacy.json verify" in verified.output, (
            verified.output
        )
    finally:
        cluster.stop_all()


@pytest.mark.slow
def test_a_node_refuses_a_bundle_whose_client_code_differs(
    private_sites: Path, tiny_base: Path, tmp_path: Path
) -> None:
    """The server ships fedmri with client/trainer.py edited; the hospital's `fedmri node start` refuses the run."""
    sites = private_sites
    bundle = tmp_path / "bundle"  # the project as the server has it: this checkout, one file edited
    bundle.mkdir()
    for name in ("pyproject.toml", ".gitignore", "README.md"):
        shutil.copy(PROJECT_DIR / name, bundle / name)
    for package in ("client", "common", "server", "sites", "simulation"):
        shutil.copytree(PROJECT_DIR / package, bundle / package, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))  # fmt: skip
    ran = tmp_path / "the-servers-trainer-ran"
    trainer = bundle / "client" / "trainer.py"
    trainer.write_text(
        trainer.read_text() + f"\n__import__('pathlib').Path({str(ran)!r}).touch()  # the server's edit\n"
    )

    cluster = Cluster(tmp_path, ["tiny-a"])
    try:
        cluster.start_superlink()
        cluster.register("tiny-a")
        node = cluster.start(
            [str(BIN / "fedmri"), "node", "start", "--site", str(sites / "tiny-a.yaml"), "--superlink", cluster.address,
             "--root-cert", str(cluster.certs.ca_cert), "--key", str(cluster.certs.node_keys["tiny-a"][0]),
             "--port", str(_free_port()), "--flwr-home", str(tmp_path / "tiny-a-home"), "--retries", "0"],
            "tiny-a",
        )  # fmt: skip
        out = tmp_path / "run"
        overrides = f"num-server-rounds=1 local-steps=2 batch-size=2 min-train-nodes=1 round-timeout=300.0 base-model='{tiny_base}' run-dir='{out}'"  # fmt: skip
        result = subprocess.run(
            run_command(overrides, app=bundle), env=cluster.cli_env, capture_output=True, text=True, timeout=900
        )
        streamed = result.stdout + result.stderr
        node_log = cluster.log("tiny-a")

        assert not ran.exists(), "the server's edited client/trainer.py ran at the site"
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records[0]["accepted"] == 0, records
        [site] = records[0]["sites"].values()  # the refusal is the site's reply
        assert site["status"] == "error" and "fedmri refused this run" in site["notes"][0], site
        assert "client/trainer.py: differs from the installed file" in site["notes"][0]
        assert "fedmri refused this run" in streamed, streamed[-3000:]
        assert "client/trainer.py: differs from the installed file" in node_log, node_log[-3000:]
        assert node.poll() is None  # the node stays up for a run of the code it has
        assert not load_site(sites / "tiny-a.yaml").ledger_path.exists()  # nothing decided, nothing spent
    finally:
        cluster.stop_all()
