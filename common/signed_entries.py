"""Signed, hash-chained ledger entries: the format a site writes and `fedmri verify --keys` reads.

Each entry of a site's privacy ledger is a flat JSON object. Its *body* is every field but `hash`
and `signature`; `hash` is the sha256 of the body's canonical JSON, and `signature` is the site's
ECDSA P-384 signature (SHA-384, DER, hex) over the same bytes, made with its node key (the key
pair `fedmri certs` writes, or the one a simulated site creates in its home). `prev` is the hash
of the entry before it, so removing, reordering or editing an entry breaks the chain.

An entry covers the run, round, status, DP-SGD segment (q, σ, steps), N, δ, C, the digest of the
global tensors the site received and the digest of the update it sent.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.protocol import SPENDING

BODY_KEYS = (
    "site_id", "run_id", "server_round", "status", "segment", "num_subjects", "delta", "max_grad_norm",
    "epsilon", "epsilon_rdp", "notes", "time", "global_digest", "update_digest", "prev",
)  # fmt: skip
# SPENDING: the statuses whose segment composes into ε. A round's spend is written as "reserved"
# before training starts and re-signed as "trained" (same segment, plus the update's digest) after it.


def canonical(body: Mapping[str, Any]) -> bytes:
    """The bytes that are hashed and signed: the body's keys sorted, no whitespace (ε = ∞ is `Infinity`)."""
    return json.dumps({k: body[k] for k in BODY_KEYS}, sort_keys=True, separators=(",", ":")).encode()


def body_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def sign(body: Mapping[str, Any], key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """The entry: body plus its hash and the site's signature."""
    data = canonical(body)
    signature = key.sign(data, ec.ECDSA(hashes.SHA384()))
    return {**{k: body[k] for k in BODY_KEYS}, "hash": hashlib.sha256(data).hexdigest(), "signature": signature.hex()}


def load_public_key(pem_or_ssh: bytes) -> ec.EllipticCurvePublicKey:
    """A site's public key from its OpenSSH `.pub` (what `fedmri certs` writes) or a PEM file."""
    key: Any
    try:
        key = serialization.load_ssh_public_key(pem_or_ssh)
    except ValueError:
        key = serialization.load_pem_public_key(pem_or_ssh)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"expected an ECDSA public key, got {type(key).__name__}")
    return key


def new_key_pair(private_path: Path, public_path: Path) -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-384 key pair in OpenSSH format (as `fedmri certs` writes): the private half
    created with mode 0600 (never over an existing file), the public half beside it."""
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_text(public_key_text(key.public_key()) + "\n")
    return key


def public_key_text(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def entry_problems(entry: Any, key: ec.EllipticCurvePublicKey | None) -> list[str]:
    """Why `entry` is not a well-formed, correctly hashed (and, given `key`, correctly signed) entry."""
    if not isinstance(entry, dict) or set(entry) != {*BODY_KEYS, "hash", "signature"}:
        return ["keys must be exactly " + ", ".join((*BODY_KEYS, "hash", "signature"))]
    try:
        data = canonical(entry)
    except (TypeError, ValueError) as err:
        return [f"not canonical JSON ({err})"]
    if hashlib.sha256(data).hexdigest() != entry["hash"]:
        return ["hash does not match the entry's contents (edited after signing)"]
    if key is not None:
        try:
            key.verify(bytes.fromhex(entry["signature"]), data, ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError, TypeError):
            return ["signature does not verify with the site's public key"]
    return []


def chain_problems(entries: Sequence[dict[str, Any]], site_id: str, key: ec.EllipticCurvePublicKey | None) -> list[str]:
    """Every entry well formed, signed by `key`, of `site_id`, and each one's `prev` the hash before it."""
    problems = []
    for i, entry in enumerate(entries):
        problems += [f"entry {i}: {p}" for p in entry_problems(entry, key)]
        if problems:
            return problems  # later checks would only repeat the cause
        if entry["site_id"] != site_id:
            problems.append(f"entry {i}: belongs to site {entry['site_id']!r}")
        if i and entry["prev"] != entries[i - 1]["hash"]:
            problems.append(f"entry {i}: chain broken (prev is not the hash of entry {i - 1}: an entry was removed)")
        segment = entry["segment"]
        if entry["status"] in SPENDING and not (
            isinstance(segment, dict)
            and all(isinstance(segment.get(k), int | float) for k in ("sample_rate", "noise_multiplier", "steps"))
            and all(math.isfinite(v) for v in segment.values())
        ):
            problems.append(f"entry {i}: a spending entry needs a finite segment (got {segment!r})")
    return problems


def spent_segments(entries: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """The DP-SGD segments the chain spends: one per spending entry with steps > 0."""
    return [
        {k: e["segment"][k] for k in ("sample_rate", "noise_multiplier", "steps")}
        for e in entries
        if e["status"] in SPENDING and e["segment"] and e["segment"]["steps"] > 0
    ]


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
