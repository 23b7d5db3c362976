"""`fedmri release RUN_DIR --out RELEASE`: the federated model with its privacy account and model card.

Everything comes from what the server legitimately holds: the final model, and for each site the
public terms of its account that it reported every round (q, σ, steps, C, δ, N and its
accountant). No site data is read. Site YAMLs, when the run's config names readable ones, only
describe the sites in the model card; that text is the consortium's declaration, not data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.model import load_ldm, save_ldm
from common.privacy import Segment, epsilon
from common.release import SiteAccount, directory_digest, write_manifest
from common.weights import NAME as SHIPPED_NAME
from common.weights import base_model_dir


class RunDirError(Exception):
    """The run directory cannot be released as it is; the message says why."""


@dataclass
class SiteRecord:
    """One site's reported terms, gathered over the run's rounds."""

    site_id: str
    accountant: str = ""
    num_subjects: set[float] = field(default_factory=set)
    delta: set[float] = field(default_factory=set)
    max_grad_norm: set[float] = field(default_factory=set)
    segments: list[dict[str, float]] = field(default_factory=list)
    reported_epsilon: float = 0.0  # the site's cumulative ledger ε (may include earlier runs)


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise RunDirError(f"{path}: missing; {run_dir} is not a fedmri run directory")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise RunDirError(f"{path}: no completed round to release")
    return records


def gather_sites(records: list[dict[str, Any]]) -> dict[str, SiteRecord]:
    """Every site's segments: one per round in which it trained (rejected updates count too)."""
    sites: dict[str, SiteRecord] = {}
    for record in records:
        for site_id, info in record["sites"].items():
            if info["status"] == "error":
                continue
            site = sites.setdefault(site_id, SiteRecord(site_id))
            site.accountant = info.get("accountant") or site.accountant
            site.num_subjects.add(info["num-subjects"])
            site.delta.add(info["delta"])
            site.reported_epsilon = info.get("epsilon", site.reported_epsilon)
            if info.get("trained") == 1.0:
                site.max_grad_norm.add(info["max-grad-norm"])
                site.segments.append(
                    {
                        "sample_rate": info["sample-rate"],
                        "noise_multiplier": info["noise-multiplier"],
                        "steps": int(info["steps"]),
                    }
                )
    return sites


def site_account(site: SiteRecord) -> SiteAccount:
    for name in ("num_subjects", "delta", "max_grad_norm"):
        if len(getattr(site, name)) > 1:
            raise RunDirError(f"site {site.site_id}: {name} changed during the run ({sorted(getattr(site, name))})")
    segments = [Segment(s["sample_rate"], s["noise_multiplier"], int(s["steps"])) for s in site.segments]
    delta = next(iter(site.delta))
    accountant = site.accountant or "prv"
    eps = epsilon(segments, delta, accountant)
    return SiteAccount(
        site_id=site.site_id,
        num_subjects=int(next(iter(site.num_subjects))),
        delta=delta,
        max_grad_norm=next(iter(site.max_grad_norm), 0.0),
        segments=site.segments,
        accountant=accountant,
        epsilon=eps,
        epsilon_rdp=eps if accountant == "rdp" else epsilon(segments, delta, "rdp"),
    )


def _run_config(run_dir: Path) -> dict[str, Any]:
    from server.checkpoint import load_latest

    checkpoint = load_latest(run_dir)
    if checkpoint is None:
        raise RunDirError(f"{run_dir}/checkpoints: no valid round checkpoint")
    return dict(checkpoint.info.get("run_config", {}))


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
    records: list[dict[str, Any]],
    client_level: dict[str, Any] | None,
    base_model: dict[str, str],
    descriptions: dict[str, str],
    reported: dict[str, SiteRecord],
) -> str:
    rounds = records[-1]["round"]
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


def build_release(run_dir: Path, out: Path) -> tuple[Path, dict[str, Any]]:
    """Write the release directory `out` from a finished run; returns it and its manifest."""
    run_dir = Path(run_dir)
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out}: exists and is not empty; choose a new release directory")
    model_dir = run_dir / "model"
    if not (model_dir / "fedmri.json").exists():
        raise RunDirError(f"{model_dir}: no final model; the run did not finish")
    records = read_records(run_dir)
    run_config = _run_config(run_dir)
    reported = gather_sites(records)
    accounts = [site_account(site) for site in sorted(reported.values(), key=lambda s: s.site_id)]
    if not any(a.segments for a in accounts):
        raise RunDirError(f"{run_dir}: no site trained in any round; nothing to release")
    base = str(run_config.get("base-model", "shipped"))
    base_dir = base_model_dir() if base == "shipped" else Path(base)
    base_model = {"name": SHIPPED_NAME if base == "shipped" else base_dir.name, "sha256": directory_digest(base_dir)}
    client_level = records[-1].get("client_level")

    save_ldm(load_ldm(model_dir), out)
    card = model_card(accounts, records, client_level, base_model, _site_descriptions(run_config), reported)
    (out / "README.md").write_text(card)
    manifest = write_manifest(out, accounts, client_level, base_model)
    return out, manifest
