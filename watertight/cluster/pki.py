"""The local cluster's keys, certificates, tokens and kubeconfigs.

Owns: one CA for the cluster; serving certificates for etcd, the API server and the kubelet;
client certificates for the API server's calls to etcd and to the kubelet; the service-account
signing key; one bearer token per identity (admin, kubelet, controller-manager, scheduler,
kube-proxy, the cluster agent) in the API server's token file; the kubeconfigs. Every private
file is created 0600 before anything is written into it.
Never: reuse a key of another cluster or write a key or a token anywhere but the cluster's pki
directory and the kubeconfigs.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from watertight import tls

VALIDITY_DAYS = 365
CLUSTER_NAME = "watertight-local"
ADMIN_USER = "watertight-admin"


def write_private(path: Path, data: bytes | str) -> None:
    """Create ``path`` 0600 (replacing it) and only then write the secret into it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Identity:
    """A bearer token's user and groups (the API server's --token-auth-file)."""

    user: str
    groups: tuple[str, ...]


class Authority:
    """The cluster's CA: signs the serving and client certificates."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key, self.cert = tls.new_ca(f"{CLUSTER_NAME}-ca", VALIDITY_DAYS)
        write_private(directory / "ca.key", _key_pem(self.key))
        (directory / "ca.crt").write_bytes(_cert_pem(self.cert))

    @property
    def cert_file(self) -> Path:
        return self.directory / "ca.crt"

    def issue(
        self,
        name: str,
        common_name: str,
        organizations: tuple[str, ...] = (),
        dns_names: tuple[str, ...] = (),
        addresses: tuple[str, ...] = (),
        server: bool = False,
        client: bool = False,
    ) -> tuple[Path, Path]:
        """A key and a certificate ``<name>.crt`` / ``<name>.key``; returns their paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        alternatives: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        alternatives += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        if alternatives:
            builder = builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_file, cert_file = self.directory / f"{name}.key", self.directory / f"{name}.crt"
        write_private(key_file, _key_pem(key))
        cert_file.write_bytes(_cert_pem(cert))
        return cert_file, key_file


def service_account_keys(directory: Path) -> tuple[Path, Path]:
    """The key that signs service-account tokens and its public half: (private, public)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = directory / "sa.key", directory / "sa.pub"
    write_private(private, _key_pem(key))
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def token_file(directory: Path, identities: Mapping[str, Identity]) -> dict[str, str]:
    """A fresh token per identity in the API server's token file; returns name -> token."""
    tokens = {name: secrets.token_urlsafe(32) for name in identities}
    lines = [
        f'{tokens[name]},{identity.user},{identity.user},"{",".join(identity.groups)}"'
        for name, identity in identities.items()
    ]
    write_private(directory / "tokens.csv", "\n".join(lines) + "\n")
    return tokens


def kubeconfig(
    path: Path,
    server: str,
    ca_file: Path,
    user: str,
    token: str,
    contexts: Mapping[str, str | None],
    current: str,
) -> None:
    """A kubeconfig with one cluster, one user and ``contexts`` (name -> default namespace)."""
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CLUSTER_NAME,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_file.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": name,
                "context": {"cluster": CLUSTER_NAME, "user": user, **({"namespace": ns} if ns else {})},
            }
            for name, ns in contexts.items()
        ],
        "current-context": current,
        "preferences": {},
    }
    write_private(path, yaml.safe_dump(document, sort_keys=False))
