"""`fedmri certs`: a consortium CA, the SuperLink's TLS certificate, and per-site node keys.

Written with `cryptography` (which Flower already depends on), in the formats flwr 1.41 reads:
- `ca.crt`: the root certificate every SuperNode and `flwr` CLI trusts (`--root-certificates`);
- `superlink.crt` / `superlink.key`: the SuperLink's HTTPS certificate (`--ssl-certfile`,
  `--ssl-keyfile`), valid for the host names and IP addresses given;
- `nodes/<site>.key` / `nodes/<site>.pub`: an ECDSA P-384 key pair in OpenSSH format per site.
  The site keeps `.key` (`flower-supernode --auth-supernode-private-key`, and it signs the
  site's ledger: copy both to the site home as node.key / node.pub); the consortium registers
  `.pub` with `flwr supernode register`. Only registered keys are admitted.
- `consortium.key` / `nodes/consortium.pub`: the pair that signs releases (`fedmri release
  --key`); `fedmri verify --keys nodes/` checks every site's entries and the release with them.

Private keys are written with mode 0600. Nothing is overwritten: an existing file is an error.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertFiles:
    ca_cert: Path
    ca_key: Path
    superlink_cert: Path
    superlink_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # site -> (private, public)
    consortium_key: tuple[Path, Path]  # (private, public): signs releases


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    if path.exists():
        raise FileExistsError(f"{path}: exists; fedmri certs never overwrites keys (choose a new --out)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmri consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_certs(out: Path, sites: list[str], hosts: list[str], days: int = 365) -> CertFiles:
    """Create the CA, the SuperLink certificate for `hosts`, and a node key pair per site."""
    if not sites:
        raise ValueError("give at least one site id for a node key")
    now = datetime.datetime.now(datetime.timezone.utc)
    valid_until = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedmri consortium CA"))
        .issuer_name(_name("fedmri consortium CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(valid_until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    link_key = ec.generate_private_key(ec.SECP384R1())
    link_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(link_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(valid_until)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    node_keys = {}
    if "consortium" in sites:
        raise ValueError("'consortium' names the release-signing key; choose another site id")
    for site in [*sites, "consortium"]:  # the consortium's key signs releases (privacy.sig)
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        private_path = out / ("consortium.key" if site == "consortium" else f"nodes/{site}.key")
        node_keys[site] = (
            _write(private_path, private, private=True),
            _write(out / "nodes" / f"{site}.pub", public + b"\n"),
        )
    return CertFiles(
        ca_cert=_write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
        ca_key=_write(out / "ca.key", _pem_key(ca_key), private=True),
        superlink_cert=_write(out / "superlink.crt", link_cert.public_bytes(serialization.Encoding.PEM)),
        superlink_key=_write(out / "superlink.key", _pem_key(link_key), private=True),
        node_keys={site: paths for site, paths in node_keys.items() if site != "consortium"},
        consortium_key=node_keys["consortium"],
    )
