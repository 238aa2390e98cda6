"""TLS on the HTTP hop between sites: a gateway sends a cell's requests (PANs, CVV2s in their
bodies) to the app server of the site that leads the cell, which is often the other center.

An app server listens twice: in clear on its port, for its own site's gateway, and with TLS 1.3 on
``tls.port``, for the gateway of the other center, which verifies the certificate against the run's
CA for the address it dialled (what a browser checks; what libpq's ``verify-full`` checks). Inside
one site the hop stays in clear: it costs a TLS session per request hop otherwise (README,
security).

Owns: the ``tls`` settings of a listener, and the server's and the client's ``SSLContext``.
Never: accept TLS below 1.3, or a certificate its CA did not sign; log a key.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated

import msgspec


class TlsListen(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A TLS listener beside the server's clear one (same host): its port, and the PEM files of
    the certificate it presents and of its key (relative to the settings file when not absolute)."""

    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    cert_file: str
    key_file: str

    def resolve(self, here: Path) -> None:
        """Make the file names absolute against ``here`` (the settings file's directory)."""
        self.cert_file = str(here / self.cert_file)
        self.key_file = str(here / self.key_file)


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.3 only, presenting ``cert_file``; ValueError naming the file when it is unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    for path in (cert_file, key_file):
        if not Path(path).is_file():
            raise ValueError(f"tls: {path}: no such file")
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as error:
        raise ValueError(
            f"tls: {cert_file} / {key_file}: not a usable certificate and key: {error}"
        ) from None
    return context


def client_context(ca_file: str) -> ssl.SSLContext:
    """Verifies the server against ``ca_file`` for the host (name or address) dialled, TLS 1.3
    only; ValueError naming the file when it is unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if not Path(ca_file).is_file():
        raise ValueError(f"tls: CA file {ca_file}: no such file")
    try:
        context.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as error:
        raise ValueError(f"tls: CA file {ca_file}: not a usable certificate: {error}") from None
    return context
