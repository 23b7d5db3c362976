"""Round checkpoints: atomic, hash-verified, and a damaged newest one falls back to the previous."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from server.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_latest, save_checkpoint


def _save(run_dir: Path, server_round: int) -> Path:
    tensors = {"w": torch.full((3,), float(server_round))}
    return save_checkpoint(
        run_dir,
        Checkpoint(server_round, tensors, {"m_t/w": torch.ones(3)}, {"site_epsilon": {"a": 1.0 * server_round}}),
    )


def test_round_trip_and_latest(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    latest = load_latest(tmp_path)
    assert latest is not None and latest.server_round == 2
    assert torch.equal(latest.tensors["w"], torch.full((3,), 2.0)) and latest.info["site_epsilon"] == {"a": 2.0}
    assert "m_t/w" in latest.strategy_state


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_refused_and_previous_used(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2) / "global.safetensors"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-1] ^= 0xFF
        newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(newest.parent)
    with caplog.at_level(logging.ERROR, logger="fedmri.server"):
        latest = load_latest(tmp_path)
    assert latest is not None and latest.server_round == 1
    assert "refusing checkpoint" in caplog.text
