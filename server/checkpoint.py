"""Round checkpoints: global tensors + state, written atomically and verified by hash on load."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.atomic import fsync_folder, sha256_file

log = logging.getLogger("fedmri.server")


@dataclass
class Checkpoint:
    server_round: int
    tensors: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # strategy, round records, sites' signed chains, ...


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write run_dir/checkpoints/round-NNNN/ via a temporary folder renamed into place."""
    root = run_dir / "checkpoints"
    final = root / f"round-{checkpoint.server_round:04d}"
    tmp = root / f".tmp-round-{checkpoint.server_round:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in checkpoint.tensors.items()}, str(tmp / "global.safetensors"))
    files = {"global.safetensors": sha256_file(tmp / "global.safetensors")}
    if checkpoint.strategy_state:
        save_file({k: v.contiguous() for k, v in checkpoint.strategy_state.items()}, str(tmp / "strategy.safetensors"))
        files["strategy.safetensors"] = sha256_file(tmp / "strategy.safetensors")
    state = {"server_round": checkpoint.server_round, "info": checkpoint.info, "sha256": files}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    fsync_folder(tmp, with_files=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_folder(root)  # the renamed folder, with its records and chains, survives a power cut
    return final


class CheckpointError(ValueError):
    pass


def load_checkpoint(folder: Path) -> Checkpoint:
    """Load one checkpoint folder; CheckpointError if a file is missing or its hash differs."""
    try:
        state = json.loads((folder / "state.json").read_text())
        for name, digest in state["sha256"].items():
            if sha256_file(folder / name) != digest:
                raise CheckpointError(f"{folder / name}: sha256 differs from state.json (truncated or corrupted)")
        tensors = load_file(str(folder / "global.safetensors"))
        strategy = load_file(str(folder / "strategy.safetensors")) if "strategy.safetensors" in state["sha256"] else {}
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    return Checkpoint(int(state["server_round"]), tensors, strategy, state["info"])


def load_latest(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged newer ones are refused with a log message."""
    folders = sorted((run_dir / "checkpoints").glob("round-*"), reverse=True)
    for folder in folders:
        try:
            return load_checkpoint(folder)
        except CheckpointError as err:
            log.error("refusing checkpoint: %s; falling back to the previous one", err)
    return None
