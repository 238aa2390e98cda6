"""The run's CA and PostgreSQL's server certificate (watertight.tls): a real TLS handshake that
verifies as libpq's verify-full does, and the renewal rules `watertight up` relies on."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path

import pytest

from watertight import render, tls


def handshake(tmp_path: Path, server: dict[str, str], ca: dict[str, str], address: str) -> None:
    """A TLS server on ``address`` with ``server``'s certificate; a client that trusts ``ca`` only
    and checks the name it dialled."""
    (tmp_path / "server.crt").write_text(server["cert"])
    (tmp_path / "server.key").write_text(server["key"])
    (tmp_path / "ca.crt").write_text(ca["cert"])
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    listener = socket.create_server((address, 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with served.wrap_socket(conn, server_side=True) as wrapped:
                wrapped.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = ssl.create_default_context(cafile=tmp_path / "ca.crt")
        with socket.create_connection((address, port), timeout=5) as raw:
            with client.wrap_socket(raw, server_hostname=address) as wrapped:
                assert wrapped.recv(2) == b"ok"
    finally:
        listener.close()
        thread.join(timeout=5)


def test_the_server_certificate_verifies_for_every_address_it_names(tmp_path: Path) -> None:
    ca = tls.make_ca()
    server = tls.make_server(ca, ["127.0.1.1", "127.0.2.1"])
    assert server["addresses"] == ["127.0.1.1", "127.0.2.1"]
    handshake(tmp_path, server, ca, "127.0.2.1")


def test_a_client_refuses_another_address_and_another_ca(tmp_path: Path) -> None:
    ca = tls.make_ca()
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        handshake(tmp_path, tls.make_server(ca, ["127.0.1.1"]), ca, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(tmp_path, tls.make_server(tls.make_ca(), ["127.0.0.1"]), ca, "127.0.0.1")


def test_covers_says_when_a_new_server_certificate_is_due() -> None:
    ca = tls.make_ca()
    server = tls.make_server(ca, ["127.0.1.1", "127.0.2.1"])
    assert tls.covers(server, ca, ["127.0.1.1"])
    assert not tls.covers(server, ca, ["127.0.1.1", "127.0.9.1"])
    assert not tls.covers(server, tls.make_ca(), ["127.0.1.1"])
    assert not tls.covers(None, ca, ["127.0.1.1"])
    with pytest.raises(ValueError, match="at least one address"):
        tls.make_server(ca, [])


def test_a_server_certificate_that_is_no_client_certificate_is_made_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """etcd's peers present the run's certificate to each other as clients: one made before
    (server use only) is not good enough any more, and `up` makes it again."""
    ca = tls.make_ca()
    real = tls.x509.ExtendedKeyUsage
    client = tls.ExtendedKeyUsageOID.CLIENT_AUTH
    monkeypatch.setattr(tls.x509, "ExtendedKeyUsage", lambda usages: real([u for u in usages if u != client]))
    old = tls.make_server(ca, ["127.0.1.1"])
    monkeypatch.undo()
    assert not tls.covers(old, ca, ["127.0.1.1"])
    assert tls.covers(tls.make_server(ca, ["127.0.1.1"]), ca, ["127.0.1.1"])
    secrets = {render.SECRET_TLS_CA: ca, render.SECRET_TLS_SERVER: old}
    assert render.complete_secrets(secrets, ["127.0.1.1"])[render.SECRET_TLS_SERVER] != old


def test_the_toolkits_client_certificate_is_made_once_and_again_for_a_new_ca() -> None:
    first = render.complete_secrets({}, ["127.0.1.1"])
    client = first[render.SECRET_TLS_CLIENT]
    assert tls.client_current(client, first[render.SECRET_TLS_CA])
    assert not tls.client_current(client, tls.make_ca())
    assert not tls.client_current(None, first[render.SECRET_TLS_CA])
    assert render.complete_secrets(first, ["127.0.1.1"])[render.SECRET_TLS_CLIENT] == client
    cert = tls.x509.load_pem_x509_certificate(client["cert"].encode())
    usages = cert.extensions.get_extension_for_class(tls.x509.ExtendedKeyUsage).value
    assert list(usages) == [tls.ExtendedKeyUsageOID.CLIENT_AUTH]  # a client, never a server
    renewed = render.complete_secrets({**first, render.SECRET_TLS_CA: tls.make_ca()}, ["127.0.1.1"])
    assert renewed[render.SECRET_TLS_CLIENT] != client


def test_the_toolkits_clients_present_the_client_certificate_beside_the_ca(tmp_path: Path) -> None:
    secrets = render.complete_secrets({}, ["127.0.1.1"])
    ca_file = tmp_path / render.TLS_ROOT_CERT
    ca_file.write_text(secrets[render.SECRET_TLS_CA]["cert"])
    alone = tls.client_context(str(ca_file))
    (tmp_path / render.TLS_CLIENT_CERT).write_text(secrets[render.SECRET_TLS_CLIENT]["cert"])
    (tmp_path / render.TLS_CLIENT_KEY).write_text(secrets[render.SECRET_TLS_CLIENT]["key"])
    paired = tls.client_context(str(ca_file))
    assert paired is not alone  # a new context once the client files are there
    assert tls.client_context(str(ca_file)) is paired  # then cached
    other_key = tmp_path / render.TLS_CLIENT_KEY
    other_key.write_text(tls.make_ca()["key"])  # a key of another pair
    later = other_key.stat().st_mtime_ns + 10**9  # file times are coarser than this test
    os.utime(other_key, ns=(later, later))
    with pytest.raises(ValueError, match="client certificate"):
        tls.client_context(str(ca_file))


def test_secrets_keep_the_ca_and_renew_the_server_certificate_only_when_needed() -> None:
    first = render.complete_secrets({}, ["127.0.1.1"])
    again = render.complete_secrets(first, ["127.0.1.1"])
    assert again == first
    moved = render.complete_secrets(first, ["127.0.1.1", "127.0.5.1"])
    assert moved[render.SECRET_TLS_CA] == first[render.SECRET_TLS_CA]
    assert moved[render.SECRET_TLS_SERVER]["addresses"] == ["127.0.1.1", "127.0.5.1"]
    assert render.SECRET_TLS_CA not in render.complete_secrets({})  # a target without TLS
