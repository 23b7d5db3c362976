"""fedmri ClientApp: Flower messages in, Flower messages out. The work is in client/round.py."""

from __future__ import annotations

import json
import os

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.evaluate import run_site_evaluation
from client.policy import Proposal
from client.round import run_site_round
from client.trainer import TrainSettings
from client.trusted_code import GUARDED_NODE
from common.evaluator import EvalSettings
from common.finetune import parse_mode
from common.run_config import RunConfig

app = ClientApp()


def site_yaml(context: Context, run: RunConfig) -> str:
    """The site's YAML: node_config 'site-config' (deployment), or partition-id into run config 'sites' (simulation)."""
    if "site-config" in context.node_config:
        return str(context.node_config["site-config"])
    if os.environ.get(GUARDED_NODE):  # a deployed node: never a YAML path chosen by the server's run config
        raise ValueError(
            "this SuperNode has no site-config in its node config; `fedmri node start --site SITE.yaml` sets it"
        )
    if "partition-id" in context.node_config and run.sites:
        sites = run.sites.split(",")
        return sites[int(context.node_config["partition-id"])]
    raise ValueError(
        "this SuperNode has no site: start it with --node-config \"site-config='/path/to/site.yaml'\" "
        f"(node_config keys: {sorted(context.node_config)}; run config 'sites' is {'set' if run.sites else 'empty'})"
    )


def device_override(run: RunConfig) -> str:
    """Run config 'device' (simulation only); a deployed node trains where its YAML says."""
    if run.device and os.environ.get(GUARDED_NODE):
        raise ValueError(
            f"run config 'device' = {run.device!r}: a deployed node trains on its site YAML's `device:`, "
            "not on a device the server chooses"
        )
    return run.device


def proposal_from(config: ConfigRecord) -> Proposal:
    """The server's proposal, read from the round's ConfigRecord."""
    optional = {k: float(config[k]) for k in ("noise-multiplier", "max-grad-norm") if k in config}
    return Proposal(
        server_round=int(config["server-round"]),
        num_rounds=int(config["num-rounds"]),
        local_steps=int(config["local-steps"]),
        batch_size=int(config["batch-size"]),
        learning_rate=float(config["learning-rate"]),
        noise_multiplier=optional.get("noise-multiplier"),
        max_grad_norm=optional.get("max-grad-norm"),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    run = RunConfig.from_flower(dict(context.run_config))
    config = msg.content["config"]
    reply = run_site_round(
        yaml_path=site_yaml(context, run),
        run_id=context.run_id,
        proposal=proposal_from(config),
        global_tensors=msg.content["arrays"].to_torch_state_dict(),
        base_model=str(config["base-model"]),
        mode=parse_mode(str(config["finetune-mode"])),
        lora_rank=int(config["lora-rank"]),
        settings=TrainSettings(
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            slices_per_subject=int(config["slices-per-subject"]),
            noise_draws=int(config["noise-draws"]),
        ),
        ledger_heads=json.loads(str(config.get("ledger-heads", "{}"))),
        device=device_override(run),
        # Sampling and noise come from fresh 256-bit os.urandom keys drawn in the trainer, never shared.
    )
    content = RecordDict(
        {
            "metrics": MetricRecord(reply.metrics),
            "reply": ConfigRecord(
                {
                    "site-id": reply.site_id,
                    "status": reply.status,
                    "notes": reply.notes or [""],
                    "accountant": reply.accountant,
                    "entries": json.dumps(reply.entries),
                }
            ),
        }
    )
    if reply.tensors is not None:
        content["arrays"] = ArrayRecord(reply.tensors)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the sent release on this site's held-out subjects; only aggregates go back."""
    run = RunConfig.from_flower(dict(context.run_config))
    config = msg.content["config"]
    settings = EvalSettings.from_config(config)
    site_id, metrics, _ = run_site_evaluation(
        site_yaml(context, run),
        json.loads(str(config["model-configs"])),
        msg.content["vae"].to_torch_state_dict(),
        msg.content["denoiser"].to_torch_state_dict(),
        settings,
        run_id=context.run_id,
        device=device_override(run),
    )
    content = RecordDict({"metrics": MetricRecord(metrics), "reply": ConfigRecord({"site-id": site_id})})
    return Message(content=content, reply_to=msg)
