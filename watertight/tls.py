"""The run's certificate authority and the server certificate PostgreSQL presents on every link
between sites (issue 16: application to PostgreSQL, replication, pg_rewind and the probes, each
client checking the server as libpq's ``verify-full`` does).

``watertight up`` makes them once per run directory and keeps them in the run's secrets (0600):
one CA (ECDSA P-256, ten years) and one server certificate signed by it whose subject alternative
names are every site address of the topology (a member is reached by its site's address); a
topology whose addresses the certificate does not name gets a new one. Clients get the CA's
certificate only.

Owns: making and checking these PEM documents. Never: write a file (the runtime writes them, 0600
from the first byte), or log a key.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import ssl
from collections.abc import Iterable, Mapping
from typing import Any

from cardcore.platform import tls as hop_tls
from cardcore.platform.upstream import is_tls
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825  # what browsers and most CAs still accept for a server certificate
CA_NAME = "watertight run CA"
SERVER_NAME = "watertight postgresql"
CLIENT_NAME = "watertight toolkit"
# beside the run's CA file (tls-ca.crt): the toolkit's client certificate and key, which every
# client verifying with that CA presents (etcd asks for one)
CLIENT_CERT_BESIDE_CA = "tls-client.crt"
CLIENT_KEY_BESIDE_CA = "tls-client.key"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def new_ca(common_name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA key and certificate (ECDSA P-256), valid ``days`` from now: the run's CA
    here, the local Kubernetes cluster's in watertight.cluster.pki."""
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_ca() -> dict[str, str]:
    """A new CA for a run: ``{"cert": PEM, "key": PEM}``."""
    key, cert = new_ca(CA_NAME, CA_DAYS)
    return {"cert": _pem_cert(cert), "key": _pem_key(key)}


def _issue(
    ca: Mapping[str, str],
    common_name: str,
    usages: list[x509.ObjectIdentifier],
    names: list[x509.GeneralName] | None = None,
) -> dict[str, str]:
    """A certificate and its new key, signed by ``ca`` (ECDSA P-256, SERVER_DAYS), for the
    extended key ``usages``, with ``names`` as its subject alternative names when given."""
    ca_cert = x509.load_pem_x509_certificate(ca["cert"].encode("ascii"))
    ca_key = serialization.load_pem_private_key(ca["key"].encode("ascii"), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the run's CA key is not an ECDSA key")
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return {"cert": _pem_cert(cert), "key": _pem_key(key)}


def make_client(ca: Mapping[str, str]) -> dict[str, str]:
    """The toolkit's client certificate, signed by ``ca`` (clientAuth only, no address): what the
    probes, runbooks, the runtime's readiness checks and Prometheus present to etcd, which admits
    no client without one the run's CA signed. ``{"cert": PEM, "key": PEM}``."""
    return _issue(ca, CLIENT_NAME, [ExtendedKeyUsageOID.CLIENT_AUTH])


def _signed_and_current(pem: str, ca: Mapping[str, str]) -> x509.Certificate | None:
    """The certificate when ``ca`` signed it and it is valid 30 more days, else None."""
    cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    ca_cert = x509.load_pem_x509_certificate(ca["cert"].encode("ascii"))
    try:  # the issuer's name, then the signature
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return None
    if cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < datetime.timedelta(days=30):
        return None
    return cert


def client_current(client: Mapping[str, Any] | None, ca: Mapping[str, str]) -> bool:
    """Whether ``client`` (from make_client) was signed by ``ca`` and is valid 30 more days."""
    if not client or not client.get("cert"):
        return False
    return _signed_and_current(str(client["cert"]), ca) is not None


def _names(addresses: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for address in sorted(set(addresses)):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    return names


def make_server(ca: Mapping[str, str], addresses: Iterable[str]) -> dict[str, Any]:
    """A server certificate signed by ``ca`` for ``addresses`` (IP addresses or host names):
    ``{"cert": PEM, "key": PEM, "addresses": [...]}``. It serves as a client certificate too:
    etcd's peers present it to each other (--peer-client-cert-auth), Patroni to etcd."""
    wanted = sorted(set(addresses))
    if not wanted:
        raise ValueError("a server certificate needs at least one address")
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return {**_issue(ca, SERVER_NAME, usages, _names(wanted)), "addresses": wanted}


def covers(server: Mapping[str, Any] | None, ca: Mapping[str, str], addresses: Iterable[str]) -> bool:
    """Whether ``server`` was signed by ``ca``, names every one of ``addresses``, is valid for at
    least 30 more days and serves as a client certificate too (one made before etcd spoke TLS
    did not: it is made again)."""
    if not server or not server.get("cert"):
        return False
    cert = _signed_and_current(str(server["cert"]), ca)
    if cert is None:
        return False
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return False
    named = {str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}
    return set(addresses) <= named


@functools.lru_cache(maxsize=8)
def _client_context(
    ca_file: str, version: tuple[tuple[int, int], ...], client: tuple[str, str] | None
) -> ssl.SSLContext:
    context = hop_tls.client_context(ca_file)
    if client is not None:
        try:
            context.load_cert_chain(*client)
        except (ssl.SSLError, OSError) as error:
            raise ValueError(f"tls: client certificate {client[0]}: not usable: {error}") from None
    return context


def _version(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_ino


def client_context(ca_file: str) -> ssl.SSLContext:
    """What the toolkit's own HTTP clients (probes, runbooks, the runtime's readiness checks)
    verify an ``https://`` server of the topology with: the run's CA only, for the name or
    address dialled, as the gateways verify the app servers (cardcore.platform.tls). It presents
    the toolkit's client certificate when one lies beside the CA file (``tls-client.crt`` and
    ``.key``, which the runtime writes with the CA): etcd admits no client without one. Made once
    per version of the files (a probe runs several times a second; a new run in the same
    directory has a new CA)."""
    cert = os.path.join(os.path.dirname(ca_file), CLIENT_CERT_BESIDE_CA)
    key = os.path.join(os.path.dirname(ca_file), CLIENT_KEY_BESIDE_CA)
    if os.path.exists(cert) and os.path.exists(key):
        return _client_context(ca_file, (_version(ca_file), _version(cert), _version(key)), (cert, key))
    return _client_context(ca_file, (_version(ca_file),), None)


def context_for(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The context ``urllib`` verifies ``url`` with: the run's CA for an ``https://`` URL when
    there is one, else the default (a URL in clear needs none)."""
    if ca_file is None or not is_tls(url):
        return None
    try:
        return client_context(ca_file)
    except (OSError, ValueError):  # no usable CA file (yet): the default store refuses the server
        return None
