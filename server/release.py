"""`fedmri release RUN_DIR --out RELEASE`: the federated model with its privacy account and model card.

Everything comes from what the server legitimately holds: the final model, and for each site its
signed ledger entries (q, σ, steps, C, δ, N, digests) and the accountant it reported. Each
site's account is computed from its signed chain, which continues the parent release's chain when
the run started from one; every round a site reported training must be covered by a signed
entry. No site data is read. Site YAMLs, when the run's config names readable ones, only
describe the sites in the model card; that text is the consortium's declaration, not data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.branches import branches
from common.model import load_ldm, save_ldm
from common.privacy import Segment, epsilon
from common.protocol import SPENDING, RunRecord, Status
from common.release import CONSORTIUM_KEY, SiteAccount, directory_digest, parent_reference, write_manifest
from common.signed_entries import new_key_pair, spent_segments
from common.weights import NAME as SHIPPED_NAME
from common.weights import base_model_dir
from server.checkpoint import Checkpoint, load_latest


class RunDirError(Exception):
    """The run directory cannot be released as it is; the message says why."""


@dataclass
class SiteRecord:
    """One site's reported terms over the run, and its signed ledger chain."""

    site_id: str
    accountant: str = ""
    entries: list[dict[str, Any]] = field(default_factory=list)
    trained_rounds: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (round, segment) reported
    reported_epsilon: float = 0.0  # the site's cumulative ledger ε (may include earlier runs)


def gather_sites(records: list[RunRecord], chains: dict[str, list[dict[str, Any]]]) -> dict[str, SiteRecord]:
    """Every site of the chains (this run's and its parent's) with what it reported in this run's rounds."""
    sites = {site_id: SiteRecord(site_id, entries=chain) for site_id, chain in chains.items()}
    for record in records:
        for site_id, reply in record.sites.items():
            if reply.status == Status.ERROR or site_id not in sites:
                continue
            site = sites[site_id]
            site.accountant = reply.accountant.value if reply.accountant else site.accountant
            site.reported_epsilon = reply.metrics.get("epsilon", site.reported_epsilon)
            if reply.metrics.get("trained") == 1.0:
                segment = {k: reply.metrics[m] for k, m in (("sample_rate", "sample-rate"),
                           ("noise_multiplier", "noise-multiplier"), ("steps", "steps"))}  # fmt: skip
                site.trained_rounds.append((record.round, segment))
    return sites


def site_account(site: SiteRecord) -> SiteAccount:
    """The site's account from its signed chain: every spend in it, at the chain's δ and C."""
    entries = site.entries
    spending = [e for e in entries if e["status"] in SPENDING and e["segment"]]
    signed = spent_segments(entries)
    for server_round, reported in site.trained_rounds:
        if not any(e["server_round"] == server_round and e["segment"] == reported for e in spending):
            raise RunDirError(
                f"site {site.site_id}: reported training in round {server_round} ({reported}) that no signed ledger "
                "entry it sent covers"
            )
    for name in ("delta", "max_grad_norm"):
        values = {e[name] for e in (spending or entries)}
        if len(values) > 1:
            raise RunDirError(f"site {site.site_id}: {name} changed in its signed ledger ({sorted(values)})")
    delta = entries[-1]["delta"]
    # The release states ε by the method `fedmri verify` recomputes it with (dp-accounting's PLD, or
    # RDP for an RDP site), so claim and check agree to 0.1 %. A site's own ledger uses Opacus's PRV,
    # which lies up to about 1 % above the PLD value (both are upper bounds).
    accountant = "rdp" if site.accountant == "rdp" else "pld"
    segments = [Segment(s["sample_rate"], s["noise_multiplier"], int(s["steps"])) for s in signed]
    eps = epsilon(segments, delta, accountant)
    return SiteAccount(
        site_id=site.site_id,
        num_subjects=min((int(e["num_subjects"]) for e in spending), default=int(entries[-1]["num_subjects"])),
        delta=delta,
        max_grad_norm=spending[-1]["max_grad_norm"] if spending else 0.0,
        segments=signed,
        accountant=accountant,
        epsilon=eps,
        epsilon_rdp=eps if accountant == "rdp" else epsilon(segments, delta, "rdp"),
        entries=entries,
    )


def _final_checkpoint(run_dir: Path) -> Checkpoint:
    """The last checkpoint: its records and signed chains are what the release accounts for."""
    checkpoint = load_latest(run_dir)
    if checkpoint is None:
        raise RunDirError(f"{run_dir}/checkpoints: no valid round checkpoint")
    if "records" not in checkpoint.info or "chains" not in checkpoint.info:
        raise RunDirError(f"{run_dir}: checkpoints made by an older fedmri (no signed ledger chains); re-run it")
    return checkpoint


def _site_descriptions(run_config: dict[str, Any]) -> dict[str, str]:
    """Declared coverage of each site whose YAML the run names and this machine can read."""
    from sites.config import SiteConfigError, load_site

    described = {}
    for yaml_path in filter(None, str(run_config.get("sites", "")).split(",")):
        try:
            site = load_site(yaml_path)
        except (OSError, SiteConfigError, ValueError):
            continue
        if site.synthetic is not None:
            spec = site.synthetic
            pathologies = ", ".join(p.value for p, w in spec.pathology_mix.items() if w > 0)
            modalities = ", ".join(m.value for m in spec.modalities)
            described[site.site_id] = f"synthetic hospital, {spec.field_strength:g} T, {modalities}; {pathologies}"
    return described


def model_card(
    accounts: list[SiteAccount],
    records: list[RunRecord],
    client_level: dict[str, Any] | None,
    base_model: dict[str, str],
    descriptions: dict[str, str],
    reported: dict[str, SiteRecord],
    mask_branch: bool = False,
    source_branch: bool = False,
) -> str:
    rounds = records[-1].round
    lines = [
        "# fedmri release: a federated, differentially private brain-MRI slice generator",
        "",
        "A conditional latent diffusion model (64 × 64 axial slices) fine-tuned with Flower across "
        f"{len(accounts)} sites for {rounds} rounds, with patient-level DP-SGD at every site. Base model: "
        f"`{base_model['name']}` (directory sha256 `{base_model['sha256'][:16]}…`).",
        "",
        "## Data (described, not included)",
        "",
        "No image, latent or per-subject statistic left any site. Each site trained on its own subjects; "
        "only weight updates and the scalar terms of its privacy account travelled. Subjects a site held out "
        "for evaluation (`data.holdout_fraction`) were never trained on and are not counted here.",
        "",
        "| site | training subjects | declared coverage |",
        "| --- | ---: | --- |",
    ]
    for a in accounts:
        lines.append(f"| {a.site_id} | {a.num_subjects} | {descriptions.get(a.site_id, 'not declared')} |")
    lines += [
        "",
        "Conditions the model accepts: modality (T1w, T1ce, T2w, FLAIR, PDw), pathology (healthy, glioma, "
        "multiple sclerosis, dementia), field strength (0.3–3 T), TR/TE/TI, slice position, or a free-text "
        "prompt. Combinations no site holds can be requested; they are extrapolations.",
    ]
    if mask_branch:
        lines += [
            "",
            "**Mask branch.** The model also follows a lesion mask (glioma core, oedema and enhancing rim, or "
            "an MS plaque): its UNet takes 4 mask channels beside the latents (common/mask_branch.py), trained "
            "with the sites' lesion masks under the same patient-level DP-SGD, ledger and account as every "
            "other tensor. No mask left any site.",
        ]
    if source_branch:
        lines += [
            "",
            "**Source branch (missing-sequence synthesis).** The model also generates a contrast a subject lacks "
            "from the subject's acquired contrasts (`fedmri translate`): its UNet takes one source slot per "
            "modality beside the latents (common/source_branch.py). The branch came with the base (its "
            "provenance.json says what public data it learnt from) and was fine-tuned at the sites on their "
            "subjects' paired contrasts, within each subject, under the same patient-level DP-SGD, ledger and "
            "account as every other tensor. No scan left any site.",
        ]
    lines += [
        "",
        "## Privacy, site by site",
        "",
        "The privacy unit is the subject (patient): every subject's data at a site was sampled, clipped "
        "and noised together, so the guarantee covers everything one patient contributed.",
        "",
        "| site | ε | δ | accountant | ε (RDP) | DP-SGD steps | noise σ | clip C |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for a in accounts:
        sigmas = sorted({round(s["noise_multiplier"], 3) for s in a.segments})
        steps = sum(int(s["steps"]) for s in a.segments)
        lines.append(
            f"| {a.site_id} | {a.epsilon:.2f} | {a.delta:.1e} | {a.accountant} | {a.epsilon_rdp:.2f} | {steps} | "
            f"{', '.join(map(str, sigmas)) or '-'} | {a.max_grad_norm:g} |"
        )
    lines.append("")
    for a in accounts:
        if a.segments:
            lines.append(
                f"- **{a.site_id}**: any one patient of {a.site_id} changes the probability of any outcome of this "
                f"release by at most a factor e^{a.epsilon:.2f} ≈ {math.exp(min(a.epsilon, 700)):.3g}, except with "
                f"probability δ = {a.delta:.1e}."
            )
        else:
            lines.append(
                f"- **{a.site_id}**: took part but trained in no round; this release does not depend on its patients."
            )
        if reported[a.site_id].reported_epsilon > a.epsilon * 1.05 + 1e-9:
            lines.append(
                f"  Its own ledger shows ε = {reported[a.site_id].reported_epsilon:.2f} in total, including spending "
                "outside this run; that spending is not part of this release."
            )
    if client_level:
        lines += [
            "",
            f"Client level (server-side clipping and noise, protecting a whole site's participation): ε = "
            f"{client_level['epsilon']:.2f} at δ = {client_level['delta']:.1e} over {client_level['releases']} "
            "noisy aggregates.",
        ]
    lines += [
        "",
        "Check every number yourself, without trusting fedmri's training code: `fedmri verify RELEASE` rehashes "
        "every file against `privacy.json` and recomputes each ε from its segments with Google's `dp-accounting`.",
        "",
        "## How to generate",
        "",
        "```bash",
        "fedmri verify RELEASE",
        'fedmri generate --model RELEASE --prompt "axial FLAIR at 0.3T with a glioblastoma" -n 8 --out OUT',
        "fedmri generate --model RELEASE --grid --field 0.3 --out OUT",
        "```",
        "",
        "```python",
        "from diffusers import AutoencoderKL, UNet2DConditionModel",
        "from common.conditioning import ConditionEncoder  # fedmri's diffusers ModelMixin",
        'vae = AutoencoderKL.from_pretrained(RELEASE, subfolder="vae")',
        'unet = UNet2DConditionModel.from_pretrained(RELEASE, subfolder="unet")',
        'encoder = ConditionEncoder.from_pretrained(RELEASE, subfolder="condition_encoder")',
        "```",
        "",
        "## Limitations",
        "",
        "- 64 × 64 single slices, not volumes; not for diagnosis.",
        "- A short DP fine-tune: contrast follows the prompted modality, but pathology is weakly or not "
        "rendered, and combinations no site holds are extrapolations.",
        "- ε bounds what an adversary can learn about one patient from this release; it does not bound "
        "what the public base model's own training data reveal.",
        "- Synthetic sites, where declared, are physics simulations of real anatomy, not patients.",
        "",
    ]
    return "\n".join(lines)


def consortium_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The consortium's release-signing key (`fedmri certs` writes one); created, and said so, if absent."""
    if path.exists():
        key: Any = serialization.load_ssh_private_key(path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise RunDirError(f"{path}: expected an ECDSA key, got {type(key).__name__}")
        return key
    key = new_key_pair(path, path.parent / CONSORTIUM_KEY)
    print(f"[fedmri] created the consortium's release-signing key {path} (public half: {path.parent / CONSORTIUM_KEY})")
    return key


def build_release(run_dir: Path, out: Path, key_path: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the release directory `out` from a finished run; returns it and its manifest.

    The account comes from the run's final checkpoint, which holds the round records and every
    site's signed ledger chain in the same atomic write as the tensors (so a crash can never
    leave weights with fewer accounted rounds). `key_path` (default RUN_DIR/keys/consortium.key)
    signs privacy.json."""
    run_dir = Path(run_dir)
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out}: exists and is not empty; choose a new release directory")
    model_dir = run_dir / "model"
    if not (model_dir / "fedmri.json").exists():
        raise RunDirError(f"{model_dir}: no final model; the run did not finish")
    checkpoint = _final_checkpoint(run_dir)
    records = [RunRecord.from_json(r) for r in checkpoint.info["records"]]
    run_config = dict(checkpoint.info["run_config"])
    if not records or checkpoint.server_round != int(run_config["num-server-rounds"]):
        raise RunDirError(
            f"{run_dir}: the last checkpoint is of round {checkpoint.server_round} of {run_config['num-server-rounds']}; "
            "finish the run (--resume) before releasing it"
        )
    reported = gather_sites(records, checkpoint.info["chains"])
    accounts = [site_account(site) for site in sorted(reported.values(), key=lambda s: s.site_id)]
    if not any(a.segments for a in accounts):
        raise RunDirError(f"{run_dir}: no site trained in any round; nothing to release")
    base = str(run_config.get("base-model", "shipped"))
    base_dir = base_model_dir() if base == "shipped" else Path(base)
    base_model = {"name": SHIPPED_NAME if base == "shipped" else base_dir.name, "sha256": directory_digest(base_dir)}
    client_level: dict[str, Any] | None = dict(records[-1].client_level) if records[-1].client_level else None
    if client_level:  # the same method as the verifier's: dp-accounting PLD
        parts = [Segment(x["sample_rate"], x["noise_multiplier"], int(x["steps"])) for x in client_level["segments"]]
        client_level = {**client_level, "epsilon": epsilon(parts, client_level["delta"], "pld")}
    key = consortium_key(key_path or run_dir / "keys" / "consortium.key")

    ldm = load_ldm(model_dir)
    save_ldm(ldm, out)
    has = branches(ldm.denoiser.unet)
    card = model_card(accounts, records, client_level, base_model, _site_descriptions(run_config), reported,
                      has.mask, has.sources)  # fmt: skip
    (out / "README.md").write_text(card)
    manifest = write_manifest(out, accounts, client_level, base_model, parent_reference(base_dir), key)
    return out, manifest
