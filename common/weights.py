"""Where the shipped base model lives inside the installed package."""

from __future__ import annotations

from pathlib import Path

BASE_MODEL = Path(__file__).parent / "weights" / "fedmri-base-v1"


def base_model_dir() -> Path:
    """The shipped base model directory; raises FileNotFoundError naming how to rebuild it."""
    if not (BASE_MODEL / "fedmri.json").exists():
        raise FileNotFoundError(
            f"{BASE_MODEL}: shipped base model missing; rebuild it with "
            "`fedmri pretrain --scenario demo --out DIR --fp16` and pass --model DIR"
        )
    return BASE_MODEL
