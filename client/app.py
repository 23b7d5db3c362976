"""fedmri ClientApp: Flower messages in, Flower messages out. The work is in client/round.py."""

from __future__ import annotations

import os

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.evaluate import run_site_evaluation
from client.round import run_site_round
from client.trusted_code import GUARDED_NODE
from common.logs import quiet_known_warnings
from common.protocol import EvalReply, EvalRequest, RoundProposal
from common.run_config import RunConfig

quiet_known_warnings()  # in every ClientApp process and Ray worker (common/logs.py says why each is safe)
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    run = RunConfig.from_flower(dict(context.run_config))
    result = run_site_round(
        yaml_path=site_yaml(context, run),
        run_id=context.run_id,
        proposal=RoundProposal.from_record(msg.content["config"]),
        global_tensors=msg.content["arrays"].to_torch_state_dict(),
        device=device_override(run),
        # Sampling and noise come from fresh 256-bit os.urandom keys drawn in the trainer, never shared.
    )
    reply, metrics = result.reply.to_record()
    content = RecordDict({"metrics": MetricRecord(metrics), "reply": ConfigRecord(reply)})
    if result.tensors is not None:
        content["arrays"] = ArrayRecord(result.tensors)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the sent release on this site's held-out subjects; only aggregates go back."""
    run = RunConfig.from_flower(dict(context.run_config))
    request = EvalRequest.from_record(msg.content["config"])
    site_id, metrics, _ = run_site_evaluation(
        site_yaml(context, run),
        request,
        msg.content["vae"].to_torch_state_dict(),
        msg.content["denoiser"].to_torch_state_dict(),
        run_id=context.run_id,
        device=device_override(run),
    )
    reply, values = EvalReply(site_id, metrics).to_record()
    content = RecordDict({"metrics": MetricRecord(values), "reply": ConfigRecord(reply)})
    return Message(content=content, reply_to=msg)
