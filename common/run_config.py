"""The federation's run config ([tool.flwr.app.config] plus --run-config), typed once at the edge."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from common.finetune import FinetuneMode

STRATEGIES = ("fedavg", "fedprox", "fedadam")


@dataclass(frozen=True)
class RunConfig:
    """Every key of [tool.flwr.app.config], with '-' in the TOML for '_' here."""

    num_server_rounds: int = 3
    local_steps: int = 20
    batch_size: int = 16  # expected subjects per DP-SGD step (the site may clamp)
    learning_rate: float = 1e-4
    finetune_mode: str = "attention"
    lora_rank: int = 4
    base_model: str = "shipped"  # "shipped" or a model directory present at every site
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx only
    server_learning_rate: float = 0.01  # FedAdam only
    min_train_nodes: int = 1  # a round completes when at least this many sites reply
    max_update_norm: float = 100.0  # L2 bound on (update - global); larger updates are rejected
    round_timeout: float = 1800.0  # seconds to wait for replies
    run_dir: str = "runs/federation"
    resume: bool = False
    sites: str = ""  # simulation: comma-separated site YAMLs, one per virtual SuperNode (partition-id)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.finetune_mode not in {m.value for m in FinetuneMode}:
            _bad("finetune-mode", self.finetune_mode, [m.value for m in FinetuneMode])
        if self.strategy not in STRATEGIES:
            _bad("strategy", self.strategy, list(STRATEGIES))
        for name in ("num_server_rounds", "local_steps", "batch_size", "lora_rank", "min_train_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"run config '{name.replace('_', '-')}' must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_flower(cls, user_config: dict[str, Any]) -> RunConfig:
        """Build from Flower's run_config (hyphenated keys); an unknown key is an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in user_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                valid = ", ".join(n.replace("_", "-") for n in fields)
                raise ValueError(f"unknown run-config key '{key}'; valid keys: {valid}")
            values[name] = value
        return cls(**values)

    def to_flower(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def _bad(key: str, value: object, valid: list[str]) -> None:
    raise ValueError(f"run config '{key}' = {value!r}; choose one of: {', '.join(valid)}")
