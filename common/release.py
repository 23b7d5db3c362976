"""The release format: a diffusers directory plus `privacy.json`, and its independent verification.

`privacy.json` (format_version 2) states, for every site, the DP-SGD segments that produced the
released weights, the ε they compose to, and the site's signed, hash-chained ledger entries those
segments come from (common/signed_entries.py); the sha256 of every other file in the release; and
the parent release, when the run started from one (its sites' chains continue in this one).
`privacy.sig` is the consortium's signature over `privacy.json`.

`verify_release` trusts none of the claimed numbers: it rehashes every file, checks every chain
(and, given the public keys, every signature), checks that the claimed segments are exactly the
signed ones, and recomputes every ε with Google's `dp-accounting`, independently of the Opacus
accountants used in training (PLD for a PRV or PLD claim; dp-accounting's RDP for an RDP claim).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from common.atomic import sha256_file
from common.protocol import SPENDING
from common.signed_entries import chain_problems, load_public_key, spent_segments

FORMAT_VERSION = 2
MANIFEST = "privacy.json"
SIGNATURE = "privacy.sig"  # the consortium's ECDSA signature over privacy.json (hex DER)
CONSORTIUM_KEY = "consortium.pub"  # in `verify --keys DIR`, beside one <site_id>.pub per site
UNRELEASED = "UNRELEASED.txt"  # in a run's model/ folder: not a release, so no base for a new run
# A claim is made with the verifier's own method, so the two agree up to the accountants'
# discretisation: within 0.1 % either way.
TOLERANCE_ABOVE = 1e-3
TOLERANCE_BELOW = 1e-3

SITE_KEYS = (
    "site_id", "num_subjects", "delta", "max_grad_norm", "segments", "accountant", "epsilon", "epsilon_rdp",
    "entries",
)  # fmt: skip
TOP_KEYS = ("format_version", "privacy_unit", "sites", "client_level", "epsilon_max", "base_model", "parent", "files")
SEGMENT_KEYS = ("sample_rate", "noise_multiplier", "steps")


class ReleaseError(Exception):
    """A release that fails verification; `problems` lists every cause found."""

    def __init__(self, release: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{release}: verification FAILED\n" + "\n".join(f"  - {p}" for p in problems))


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (POSIX relative paths), except the manifest itself."""
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() not in (MANIFEST, SIGNATURE)
    }


def directory_digest(root: Path) -> str:
    """One sha256 for a model directory: of the sorted lines '<relative path> <sha256>' of its files."""
    lines = "".join(f"{rel} {digest}\n" for rel, digest in file_hashes(root).items() if rel != "provenance.json")
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class SiteAccount:
    """One site's patient-level account for the released weights."""

    site_id: str
    num_subjects: int
    delta: float
    max_grad_norm: float
    segments: list[dict[str, float]]  # {"sample_rate", "noise_multiplier", "steps"}
    accountant: str
    epsilon: float
    epsilon_rdp: float
    entries: list[dict[str, Any]]  # the site's signed ledger chain the segments come from


def write_manifest(
    release: Path,
    sites: Sequence[SiteAccount],
    client_level: dict[str, Any] | None,
    base_model: dict[str, str],
    parent: dict[str, str] | None,
    key: ec.EllipticCurvePrivateKey,
) -> dict[str, Any]:
    """Write release/privacy.json over the files already in `release`, and privacy.sig (signed with
    the consortium's `key`); returns the manifest."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "privacy_unit": "subject",
        "sites": [{key: getattr(site, key) for key in SITE_KEYS} for site in sites],
        "client_level": client_level,
        "epsilon_max": max((site.epsilon for site in sites), default=0.0),
        "base_model": base_model,
        "parent": parent,
        "files": file_hashes(release),
    }
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    (release / MANIFEST).write_bytes(data)
    (release / SIGNATURE).write_text(key.sign(data, ec.ECDSA(hashes.SHA384())).hex() + "\n")
    return manifest


def merge_chain(held: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`held` extended by the entries of `new` that follow it; ValueError if `new` does not continue it."""
    if not held:
        return list(new)
    hashes = [e.get("hash") for e in new]
    if held[-1]["hash"] in hashes:
        return [*held, *new[hashes.index(held[-1]["hash"]) + 1 :]]
    if new and new[0].get("prev") == held[-1]["hash"]:
        return [*held, *new]
    raise ValueError(
        f"the site's ledger entries do not continue the {len(held)} the server holds (was its ledger reset?)"
    )


def parent_chains(base: Path) -> dict[str, list[dict[str, Any]]]:
    """The signed chains a run starting from `base` carries forward: those of base's privacy.json.

    A fedmri run's unreleased model/ (UNRELEASED.txt) is refused: its account is only in its run
    directory, and a run built on it would release weights without it. Any other base (the shipped
    model, or one pretrained on public data) has no account to carry."""
    if (base / MANIFEST).exists():
        verify_release(base)  # hashes and chains; a base that fails is no base
        manifest = json.loads((base / MANIFEST).read_text())
        return {site["site_id"]: site["entries"] for site in manifest["sites"]}
    if (base / UNRELEASED).exists():
        raise ValueError(
            f"{base}: the unreleased model of a fedmri run ({(base / UNRELEASED).read_text().strip()}); release it "
            "with `fedmri release` and start the new run from the release, so its privacy account carries forward"
        )
    return {}


def parent_reference(base: Path) -> dict[str, str] | None:
    """How a release names its parent release (None when the base is not a release)."""
    if not (base / MANIFEST).exists():
        return None
    return {"name": base.name, "sha256": directory_digest(base), "manifest_sha256": sha256_file(base / MANIFEST)}


def independent_epsilon(segments: Sequence[dict[str, float]], delta: float, accountant: str) -> float:
    """ε recomputed with dp-accounting (no Opacus): PLD for prv/pld claims, RDP for rdp claims."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    active = [s for s in segments if s["steps"] > 0]
    if not active:
        return 0.0
    if any(s["noise_multiplier"] == 0 for s in active):
        return math.inf
    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP logs each order it skips as a warning
    acc: Any = rdp_privacy_accountant.RdpAccountant() if accountant == "rdp" else pld_privacy_accountant.PLDAccountant()
    for s in active:
        step = dp_event.PoissonSampledDpEvent(s["sample_rate"], dp_event.GaussianDpEvent(s["noise_multiplier"]))
        acc.compose(dp_event.SelfComposedDpEvent(step, int(s["steps"])))
    return float(acc.get_epsilon(delta))


@dataclass
class SiteCheck:
    site_id: str
    num_subjects: int
    delta: float
    claimed: float
    recomputed: float
    accountant: str
    steps: int
    entries: int = 0


@dataclass
class Verification:
    sites: list[SiteCheck] = field(default_factory=list)
    client_level: SiteCheck | None = None
    files: int = 0
    base_model: dict[str, str] = field(default_factory=dict)
    parent: dict[str, str] | None = None
    signatures_checked: bool = False


def _check_epsilon(label: str, claimed: float, recomputed: float, independent: str) -> str | None:
    if math.isnan(claimed):
        return f"{label}: claimed ε is NaN"
    if math.isinf(recomputed):
        return None if math.isinf(claimed) else f"{label}: a segment has noise_multiplier 0, so ε = ∞, not {claimed}"
    if claimed < recomputed * (1 - TOLERANCE_BELOW):
        return f"{label}: claimed ε {claimed:.4f} is BELOW the recomputed {recomputed:.4f} ({independent})"
    if claimed > recomputed * (1 + TOLERANCE_ABOVE):
        return (
            f"{label}: claimed ε {claimed:.4f} is more than 0.1% above the recomputed {recomputed:.4f} ({independent})"
        )
    return None


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and not math.isnan(value)


def _schema_problems(manifest: Any) -> list[str]:
    if not isinstance(manifest, dict):
        return ["privacy.json: not a JSON object"]
    problems = [f"privacy.json: missing key '{k}'" for k in TOP_KEYS if k not in manifest]
    problems += [f"privacy.json: unknown key '{k}'" for k in manifest if k not in TOP_KEYS]
    if problems:
        return problems
    if manifest["format_version"] != FORMAT_VERSION:
        problems.append(f"privacy.json: format_version {manifest['format_version']!r}, expected {FORMAT_VERSION}")
    if manifest["privacy_unit"] != "subject":
        problems.append(f"privacy.json: privacy_unit {manifest['privacy_unit']!r}, expected 'subject'")
    if not isinstance(manifest["files"], dict) or not all(isinstance(v, str) for v in manifest["files"].values()):
        problems.append("privacy.json: 'files' must map relative paths to sha256 strings")
    if not _number(manifest["epsilon_max"]):
        problems.append(f"privacy.json: epsilon_max is not a number ({manifest['epsilon_max']!r})")
    if not isinstance(manifest["sites"], list) or not manifest["sites"]:
        return [*problems, "privacy.json: 'sites' must be a non-empty list"]
    for i, site in enumerate(manifest["sites"]):
        where = f"privacy.json: sites[{i}]"
        if not isinstance(site, dict) or set(site) != set(SITE_KEYS):
            problems.append(f"{where}: keys must be exactly {', '.join(SITE_KEYS)}")
            continue
        where = f"privacy.json: site {site['site_id']}"
        bad = [k for k in ("num_subjects", "delta", "max_grad_norm", "epsilon", "epsilon_rdp") if not _number(site[k])]
        problems += [f"{where}: {k} is not a number ({site[k]!r})" for k in bad]
        if not bad and not 0 < site["delta"] < 1:
            problems.append(f"{where}: delta {site['delta']} is not in (0, 1)")
        if site["accountant"] not in ("prv", "rdp", "pld"):
            problems.append(f"{where}: accountant {site['accountant']!r} is not prv, rdp or pld")
        if not isinstance(site["entries"], list):
            problems.append(f"{where}: entries is not a list")
        if not isinstance(site["segments"], list):
            problems.append(f"{where}: segments is not a list")
            continue
        for j, seg in enumerate(site["segments"]):
            if not isinstance(seg, dict) or set(seg) != set(SEGMENT_KEYS):
                problems.append(f"{where}: segments[{j}] keys must be exactly {', '.join(SEGMENT_KEYS)}")
            elif not all(_number(v) for v in seg.values()) or not (
                0 < seg["sample_rate"] <= 1 and seg["noise_multiplier"] >= 0 and seg["steps"] >= 0
            ):
                problems.append(f"{where}: segments[{j}] values out of range {seg}")
    return problems


def _site_problems(site: dict[str, Any], key: ec.EllipticCurvePublicKey | None) -> list[str]:
    """The claimed account against the site's signed chain: every entry, and exactly its segments."""
    label = f"site {site['site_id']}"
    entries = site["entries"]
    problems = [f"{label}: signed ledger {p}" for p in chain_problems(entries, site["site_id"], key)]
    if problems:
        return problems
    signed = spent_segments(entries)
    if [{k: float(v) for k, v in s.items()} for s in site["segments"]] != [
        {k: float(v) for k, v in s.items()} for s in signed
    ]:
        problems.append(
            f"{label}: the claimed segments ({len(site['segments'])}) are not exactly the {len(signed)} the site "
            "signed (a segment removed, added or altered)"
        )
    spending = [e for e in entries if e["status"] in SPENDING and e["segment"]]
    if any(e["delta"] != site["delta"] for e in entries):
        problems.append(f"{label}: claimed delta {site['delta']} is not the δ of its signed entries")
    if spending and any(e["max_grad_norm"] != site["max_grad_norm"] for e in spending):
        problems.append(f"{label}: claimed max_grad_norm {site['max_grad_norm']} is not the C of its signed entries")
    if spending and site["num_subjects"] != min(e["num_subjects"] for e in spending):
        problems.append(f"{label}: claimed num_subjects {site['num_subjects']} is not the smallest signed N")
    return problems


def _keys(keys: Path, site_ids: list[str]) -> tuple[dict[str, ec.EllipticCurvePublicKey], list[str]]:
    found, problems = {}, []
    for site_id in site_ids:
        path = keys / f"{site_id}.pub"
        if not path.is_file():
            problems.append(f"site {site_id}: no public key {path}")
            continue
        try:
            found[site_id] = load_public_key(path.read_bytes())
        except ValueError as err:
            problems.append(f"{path}: not a public key ({err})")
    return found, problems


def verify_release(release: Path, keys: Path | None = None) -> Verification:
    """Check files, chains, segments and every ε (and, given `keys`, every signature).

    Raises ReleaseError listing every problem found."""
    path = release / MANIFEST
    if not path.is_file():
        raise ReleaseError(release, [f"no {MANIFEST}: not a fedmri release"])
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReleaseError(release, [f"privacy.json is not valid JSON ({err})"]) from None
    problems = _schema_problems(manifest)
    if problems:
        raise ReleaseError(release, problems)

    public: dict[str, ec.EllipticCurvePublicKey] = {}
    if keys is not None:
        public, problems = _keys(keys, [s["site_id"] for s in manifest["sites"]])
        consortium = keys / CONSORTIUM_KEY
        if not (release / SIGNATURE).is_file():
            problems.append(f"no {SIGNATURE}: the release is not signed by the consortium")
        elif not consortium.is_file():
            problems.append(f"no consortium public key {consortium}")
        else:
            try:
                load_public_key(consortium.read_bytes()).verify(
                    bytes.fromhex((release / SIGNATURE).read_text().strip()),
                    path.read_bytes(),
                    ec.ECDSA(hashes.SHA384()),
                )
            except (InvalidSignature, ValueError):
                problems.append(f"{SIGNATURE}: the consortium's signature over privacy.json does not verify")

    actual, claimed_files = file_hashes(release), manifest["files"]
    problems += [f"missing file: {rel}" for rel in sorted(set(claimed_files) - set(actual))]
    problems += [f"extra file not in the manifest: {rel}" for rel in sorted(set(actual) - set(claimed_files))]
    problems += [
        f"changed file (sha256 mismatch): {rel}"
        for rel in sorted(set(actual) & set(claimed_files))
        if actual[rel] != claimed_files[rel]
    ]

    result = Verification(files=len(actual), base_model=dict(manifest["base_model"] or {}), parent=manifest["parent"])
    result.signatures_checked = keys is not None
    for site in manifest["sites"]:
        label = f"site {site['site_id']}"
        if keys is None or site["site_id"] in public:
            problems += _site_problems(site, public.get(site["site_id"]))
        independent = "dp-accounting RDP" if site["accountant"] == "rdp" else "dp-accounting PLD"
        recomputed = independent_epsilon(site["segments"], site["delta"], site["accountant"])
        problems += [p for p in [_check_epsilon(label, site["epsilon"], recomputed, independent)] if p]
        if not math.isinf(recomputed) and site["epsilon_rdp"] < recomputed * (1 - TOLERANCE_BELOW):
            problems.append(f"{label}: epsilon_rdp {site['epsilon_rdp']:.4f} is below the recomputed {recomputed:.4f}")
        if site["num_subjects"] > 0 and site["delta"] >= 1 / site["num_subjects"]:
            problems.append(f"{label}: delta {site['delta']} >= 1/num_subjects gives no meaningful guarantee")
        steps = int(sum(s["steps"] for s in site["segments"]))
        result.sites.append(
            SiteCheck(
                site["site_id"],
                site["num_subjects"],
                site["delta"],
                site["epsilon"],
                recomputed,
                site["accountant"],
                steps,
                len(site["entries"]),
            )
        )
    if manifest["epsilon_max"] != max(s["epsilon"] for s in manifest["sites"]):
        problems.append(f"epsilon_max {manifest['epsilon_max']} is not the largest site ε")

    client = manifest["client_level"]
    if client is not None:
        try:
            recomputed = independent_epsilon(client["segments"], client["delta"], "pld")
            message = _check_epsilon("client level", client["epsilon"], recomputed, "dp-accounting PLD")
            problems += [message] if message else []
            steps = int(sum(s["steps"] for s in client["segments"]))
            result.client_level = SiteCheck(
                "client level", client["num_clients"], client["delta"], client["epsilon"], recomputed, "prv", steps
            )
        except (KeyError, TypeError) as err:
            problems.append(f"privacy.json: client_level is malformed ({err!r})")
    if problems:
        raise ReleaseError(release, problems)
    return result
