"""One budget, one writer: real processes racing for one site's budget, and one killed mid-round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from client.ledger import Ledger
from common.privacy import Segment, epsilon

# A site round as its own process (Flower 1.41 runs each message in its own ClientApp process).
# It waits for the go file, so that both processes decide at the same moment.
ROUND = """
import sys, time
from pathlib import Path
from client.round import run_site_round
from common.finetune import FinetuneMode, configure, trainable_tensors
from common.protocol import RoundProposal
from common.model import load_ldm
yaml_path, base, go, steps, run_id = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ldm = load_ldm(Path(base)); configure(ldm.denoiser, FinetuneMode.attention, 2)
tensors = trainable_tensors(ldm.denoiser)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
proposal = RoundProposal(server_round=1, num_rounds=1, local_steps=steps, batch_size=2, learning_rate=1e-3,
                         slices_per_subject=4, noise_draws=2, base_model=base, finetune_mode=FinetuneMode.attention,
                         lora_rank=2)
result = run_site_round(yaml_path, run_id, proposal, tensors)
print("status", result.reply.status.value, flush=True)
"""


def _site(tiny_sites: Path, tmp_path: Path, **privacy: object) -> Path:
    raw = yaml.safe_load((tiny_sites / "tiny-b.yaml").read_text())
    raw["data"]["bids_root"] = str(tiny_sites / "tiny-b")
    raw["data"]["cache_dir"] = str(tiny_sites / ".fedmri-cache" / "tiny-b")
    raw["home"] = str(tmp_path / "home")
    raw["privacy"] = {**raw["privacy"], "ledger_dir": str(tmp_path / "ledger"), "accountant": "rdp", **privacy}
    path = tmp_path / "tiny-b.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(yaml_path: Path, base: Path, go: Path, steps: int, run_id: int) -> subprocess.Popen:
    command = [sys.executable, "-c", ROUND, str(yaml_path), str(base), str(go), str(steps), str(run_id)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_ready(process: subprocess.Popen) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "ready", (
        f"round process failed to start: {line}{process.stderr.read() if process.stderr else ''}"
    )


def test_two_rounds_started_together_never_overspend(tiny_sites: Path, tiny_base: Path, tmp_path: Path) -> None:
    # Two runs each plan one round that spends the whole budget (σ calibrated to ε = 2).
    site = _site(tiny_sites, tmp_path, max_epsilon=2.0, min_noise_multiplier=0.3)
    go = tmp_path / "go"
    processes = [_start(site, tiny_base, go, 2, run_id) for run_id in (1, 2)]
    for process in processes:
        _wait_ready(process)
    go.touch()
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    statuses = [out.split("status ")[-1].strip() for out, _ in outputs]
    ledger = json.loads((tmp_path / "ledger" / "tiny-b.json").read_text())
    entries = ledger["entries"]
    segments = [Segment(**e["segment"]) for e in entries if e["status"] == "trained"]
    # Both released what they trained; together they stay within the budget, because the second
    # decided on the ledger the first had written (it calibrated σ to what was left, or declined).
    assert sorted(statuses) == sorted(e["status"] for e in entries) and statuses.count("trained") == len(segments)
    assert entries[0]["status"] == "trained" and len(entries) == 2
    assert epsilon(segments, ledger["delta"], "rdp") <= 2.0
    if len(segments) == 2:
        assert segments[1].noise_multiplier > segments[0].noise_multiplier


def test_a_round_killed_while_training_leaves_its_spend_reserved(
    tiny_sites: Path, tiny_base: Path, tmp_path: Path
) -> None:
    site = _site(tiny_sites, tmp_path, max_epsilon=8.0)
    go = tmp_path / "go"
    go.touch()
    process = _start(site, tiny_base, go, 100_000, 1)  # trains far longer than this test waits
    _wait_ready(process)
    ledger_file = tmp_path / "ledger" / "tiny-b.json"
    deadline = time.monotonic() + 300
    while not (ledger_file.exists() and "reserved" in ledger_file.read_text()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the round never reserved its spend"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # a crash at the worst moment: mid-training
    process.wait()
    delta = json.loads(ledger_file.read_text())["delta"]
    ledger = Ledger.open(ledger_file, "tiny-b", 3, delta, 1.0, "rdp", tmp_path / "home")  # signed, continues the marker
    assert [e.status for e in ledger.entries] == ["reserved"]
    assert ledger.segments() and ledger.segments()[0].steps == 200  # clamped to max_local_steps, still counted
    with Ledger.locked(ledger_file, wait_s=5.0):  # the kernel dropped the dead process's lock
        pass
