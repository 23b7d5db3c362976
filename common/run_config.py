"""The federation's run config ([tool.flwr.app.config] plus --run-config), typed once at the edge."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from common.device import DEVICES
from common.protocol import ClientDP, FinetuneMode, Strategy, Task, parse

# The enum-valued keys: Flower hands them over as strings, read here once.
ENUMS = {"finetune_mode": FinetuneMode, "strategy": Strategy, "client_dp": ClientDP, "task": Task}


@dataclass(frozen=True)
class RunConfig:
    """Every key of [tool.flwr.app.config], with '-' in the TOML for '_' here."""

    num_server_rounds: int = 3
    local_steps: int = 20
    batch_size: int = 16  # expected subjects per DP-SGD step (the site may clamp)
    learning_rate: float = 1e-4
    # Subject multiplicity (client/trainer.py): a sampled subject's clipped gradient is the mean over
    # K of its slices and M noise/timestep draws per slice. Costs no privacy; costs K·M compute.
    slices_per_subject: int = 4  # K
    noise_draws: int = 2  # M
    finetune_mode: FinetuneMode = FinetuneMode.attention
    lora_rank: int = 4
    # Add the lesion-mask branch (common/mask_branch.py) to a base without one, and train it with
    # the sites' lesion masks; a base that has one keeps it whatever this says.
    mask_branch: bool = False
    base_model: str = "shipped"  # "shipped" or a model directory present at every site
    strategy: Strategy = Strategy.fedavg
    proximal_mu: float = 0.01  # FedProx only
    server_learning_rate: float = 0.01  # FedAdam only
    min_train_nodes: int = 1  # a round completes when at least this many sites reply
    max_update_norm: float = 100.0  # L2 bound on (update - global); larger updates are rejected
    round_timeout: float = 1800.0  # seconds to wait for replies
    run_dir: str = "runs/federation"
    resume: bool = False
    sites: str = ""  # simulation: comma-separated site YAMLs, one per virtual SuperNode (partition-id)
    seed: int = 0
    # simulation: the device every virtual SuperNode trains on (cpu, cuda, auto); "" = each site
    # YAML's `device:`. A deployed (guarded) node refuses it: there the YAML decides.
    device: str = ""
    # Optional client-level DP at the server (server/client_dp.py); off by default.
    client_dp: ClientDP = ClientDP.off  # off | fixed (Flower's server-side fixed-clipping wrapper)
    client_dp_noise: float = 1.0  # σ of the noise on the mean of clipped site updates, in units of C/n
    client_dp_clip: float = 1.0  # C: L2 bound on each site's update before averaging
    client_dp_delta: float = 1e-5
    # task = evaluate: send the release at eval-model to every site (server/evaluation.py).
    task: Task = Task.train
    eval_model: str = ""  # a release directory on the server
    eval_samples: int = 16  # generated slices per (modality, pathology) at each site
    eval_steps: int = 20  # DPM-Solver++ steps
    eval_grid_samples: int = 8  # generated slices per grid combination (server, public evaluator)
    eval_min_subjects: int = 2  # conditions with fewer held-out subjects are not reported
    # comma-separated YAMLs of public reference sites on which the server scores the translation
    # pairs no site holds (a model with the source branch only); "" = not scored
    eval_public_sites: str = ""

    def __post_init__(self) -> None:
        for name, kind in ENUMS.items():
            object.__setattr__(self, name, parse(kind, getattr(self, name), f"run config '{name.replace('_', '-')}'"))
        if self.device not in ("", *DEVICES):
            _bad("device", self.device, ["", *DEVICES])
        if self.task == "evaluate" and not self.eval_model:
            raise ValueError("run config 'task' = 'evaluate' needs 'eval-model', a release directory")
        if self.client_dp != "off":
            if self.strategy == "fedadam":
                # Flower adds the noise to the strategy's output; only a plain mean keeps sensitivity C/n.
                raise ValueError("run config 'client-dp' needs strategy fedavg or fedprox (a plain mean), not fedadam")
            if not self.client_dp_noise > 0:
                raise ValueError(
                    f"run config 'client-dp-noise' must be > 0 with client-dp on, got {self.client_dp_noise}"
                )
            if not self.client_dp_clip > 0:
                raise ValueError(f"run config 'client-dp-clip' must be > 0, got {self.client_dp_clip}")
            if not 0 < self.client_dp_delta < 1:
                raise ValueError(f"run config 'client-dp-delta' must lie in (0, 1), got {self.client_dp_delta}")
        for name in (
            "num_server_rounds", "local_steps", "batch_size", "slices_per_subject", "noise_draws", "lora_rank", "min_train_nodes", "eval_samples",
            "eval_steps", "eval_grid_samples", "eval_min_subjects",
        ):  # fmt: skip
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
        """Hyphenated keys and plain values (enum members as their strings), as Flower holds them."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k.replace("_", "-"): v.value if k in ENUMS else v for k, v in values.items()}


def _bad(key: str, value: object, valid: list[str]) -> None:
    raise ValueError(f"run config '{key}' = {value!r}; choose one of: {', '.join(valid)}")
