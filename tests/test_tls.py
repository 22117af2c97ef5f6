"""lotcast/tls.py and lotcast/exposure.py without services: the one-machine CA and server
certificate (names, signature, file modes, reuse vs. renewal), real TLS handshakes against the
server context, the reloader's handling of renewed and half-written pairs, and what `up` decides
from its listen address."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lotcast import tls
from lotcast.config import Settings
from lotcast.exposure import phone_hint, plan_exposure, wants_tls
from lotcast.service import node_url
from lotcast.tls import CertificateReloader, CertSource, ensure_dev_certificate

NAMES = ["localhost", "127.0.0.1", "192.0.2.10", "laptop.local"]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_dev_certificate_names_signature_and_modes(tmp_path: Path) -> None:
    dev = ensure_dev_certificate(tmp_path, NAMES)
    assert dev.source is CertSource.CREATED
    ca, leaf = _cert(dev.ca_path), _cert(dev.cert_path)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "laptop.local"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("192.0.2.10")]
    assert tls.signed_by(leaf, ca)
    assert leaf.issuer == ca.subject and ca.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=398)  # what Apple platforms accept
    directory = tmp_path / tls.TLS_DIR
    assert _mode(directory) == 0o700
    assert _mode(directory / tls.CA_KEY) == 0o600
    assert _mode(dev.key_path) == 0o600
    assert _mode(dev.cert_path) == 0o644 and _mode(dev.ca_path) == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "ca.key", "server.crt",
                                                          "server.key"]


def test_reused_while_valid_reissued_for_new_names_ca_kept(tmp_path: Path) -> None:
    first = ensure_dev_certificate(tmp_path, NAMES)
    ca_serial, leaf_serial = _cert(first.ca_path).serial_number, _cert(first.cert_path).serial_number
    leaf_bytes = first.cert_path.read_bytes()

    again = ensure_dev_certificate(tmp_path, NAMES[:2])  # a subset of what it covers
    assert again.source is CertSource.REUSED
    assert again.cert_path.read_bytes() == leaf_bytes

    moved = ensure_dev_certificate(tmp_path, [*NAMES, "198.51.100.7"])  # a new Wi-Fi address
    assert moved.source is CertSource.ISSUED
    assert _cert(moved.ca_path).serial_number == ca_serial  # the phone's trust still holds
    leaf = _cert(moved.cert_path)
    assert leaf.serial_number != leaf_serial
    assert "198.51.100.7" in tls.certificate_names(leaf)
    assert tls.signed_by(leaf, _cert(moved.ca_path))
    assert _mode(moved.key_path) == 0o600


def test_renewed_near_expiry_and_new_ca_when_the_ca_expires(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    first = ensure_dev_certificate(tmp_path, NAMES, now=now)
    ca_serial = _cert(first.ca_path).serial_number
    leaf_serial = _cert(first.cert_path).serial_number
    soon = now + tls.SERVER_LIFETIME - tls.RENEW_BEFORE + datetime.timedelta(days=1)
    renewed = ensure_dev_certificate(tmp_path, NAMES, now=soon)
    assert renewed.source is CertSource.ISSUED
    assert _cert(renewed.ca_path).serial_number == ca_serial
    assert _cert(renewed.cert_path).serial_number != leaf_serial
    assert _cert(renewed.cert_path).not_valid_after_utc > soon + tls.RENEW_BEFORE

    later = now + tls.CA_LIFETIME
    fresh = ensure_dev_certificate(tmp_path, NAMES, now=later)
    assert fresh.source is CertSource.CREATED
    assert _cert(fresh.ca_path).serial_number != ca_serial
    assert tls.signed_by(_cert(fresh.cert_path), _cert(fresh.ca_path))


def test_broken_or_foreign_files_are_replaced(tmp_path: Path) -> None:
    first = ensure_dev_certificate(tmp_path, NAMES)
    # A server key that does not match its certificate: a new pair from the same CA.
    other = ensure_dev_certificate(tmp_path / "other", NAMES)
    shutil.copyfile(other.key_path, first.key_path)
    fixed = ensure_dev_certificate(tmp_path, NAMES)
    assert fixed.source is CertSource.ISSUED
    key = serialization.load_pem_private_key(fixed.key_path.read_bytes(), None)
    assert key.public_key() == _cert(fixed.cert_path).public_key()
    # A server certificate signed by another CA: issued again by ours.
    shutil.copyfile(other.cert_path, first.cert_path)
    shutil.copyfile(other.key_path, first.key_path)
    assert ensure_dev_certificate(tmp_path, NAMES).source is CertSource.ISSUED
    assert tls.signed_by(_cert(first.cert_path), _cert(first.ca_path))
    # An unreadable CA key: a new CA.
    (tmp_path / tls.TLS_DIR / tls.CA_KEY).write_text("garbage")
    assert ensure_dev_certificate(tmp_path, NAMES).source is CertSource.CREATED


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
               server_name: str) -> x509.Certificate:
    """A real TLS handshake over a loopback socket; the certificate the client was given."""
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                s.recv(1)
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=5)
        with client_ctx.wrap_socket(raw, server_hostname=server_name) as s:
            der = s.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der)
    finally:
        thread.join(timeout=5)
        listener.close()


def test_clients_trusting_the_ca_verify_every_name_and_nothing_else(tmp_path: Path) -> None:
    dev = ensure_dev_certificate(tmp_path, NAMES)
    server = tls.server_context(dev.cert_path, dev.key_path)
    client = tls.client_context(dev.ca_path)
    for name in NAMES:
        got = _handshake(server, client, name)
        assert got.serial_number == _cert(dev.cert_path).serial_number
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(server, client, "192.0.2.99")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"self-signed|unable to get local"):
        _handshake(server, tls.client_context(ensure_dev_certificate(tmp_path / "x", NAMES).ca_path),
                   "127.0.0.1")


def _install(pair: tls.DevCertificate, cert: Path, key: Path) -> None:
    """Replace the served files the way a renewal does (rename over, never in place)."""
    for src, dst in ((pair.cert_path, cert), (pair.key_path, key)):
        tmp = dst.with_suffix(".new")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def test_reloader_loads_a_renewed_pair_and_keeps_serving_through_a_half_written_one(
    tmp_path: Path,
) -> None:
    old = ensure_dev_certificate(tmp_path / "old", NAMES)
    new = tls.DevCertificate(old.ca_path, tmp_path / "n.crt", tmp_path / "n.key", (), CertSource.ISSUED)
    ca_key = serialization.load_pem_private_key((old.ca_path.parent / tls.CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, tls.ec.EllipticCurvePrivateKey)
    cert, key = tls.issue_server_certificate(_cert(old.ca_path), ca_key, NAMES)
    new.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    new.key_path.write_bytes(tls._key_pem(key))

    served_cert, served_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copyfile(old.cert_path, served_cert)
    shutil.copyfile(old.key_path, served_key)
    ctx = tls.server_context(served_cert, served_key)
    reloader = CertificateReloader(ctx, served_cert, served_key, interval=0.05)
    client = tls.client_context(old.ca_path)
    old_serial = _cert(old.cert_path).serial_number
    assert reloader.check() is False
    assert _handshake(ctx, client, "127.0.0.1").serial_number == old_serial

    # Renewal caught half way: the new certificate is there, its key is not yet.
    tmp = served_cert.with_suffix(".new")
    shutil.copyfile(new.cert_path, tmp)
    os.replace(tmp, served_cert)
    assert reloader.check() is False
    assert reloader.failures == 1 and reloader.reloads == 0
    assert _handshake(ctx, client, "127.0.0.1").serial_number == old_serial
    assert reloader.check() is False  # unchanged since the failure: not retried

    tmp = served_key.with_suffix(".new")
    shutil.copyfile(new.key_path, tmp)
    os.replace(tmp, served_key)
    assert reloader.check() is True
    assert reloader.reloads == 1 and reloader.serial == cert.serial_number
    assert _handshake(ctx, client, "localhost").serial_number == cert.serial_number

    # A pair that vanished (Secret being rewritten) is not an error: nothing changes.
    served_key.unlink()
    assert reloader.check() is False
    assert _handshake(ctx, client, "localhost").serial_number == cert.serial_number


async def test_reloader_task_polls_and_closes(tmp_path: Path) -> None:
    import asyncio

    a = ensure_dev_certificate(tmp_path / "a", NAMES)
    b = ensure_dev_certificate(tmp_path / "b", NAMES)
    served_cert, served_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copyfile(a.cert_path, served_cert)
    shutil.copyfile(a.key_path, served_key)
    reloader = CertificateReloader(tls.server_context(served_cert, served_key), served_cert,
                                   served_key, interval=0.02)
    reloader.start()
    try:
        _install(b, served_cert, served_key)
        for _ in range(250):
            if reloader.reloads:
                break
            await asyncio.sleep(0.02)
        assert reloader.serial == _cert(b.cert_path).serial_number
    finally:
        await reloader.close()
    assert reloader._task is None


# --- what `up` decides --------------------------------------------------------------------


@pytest.mark.parametrize(("host", "flag", "cert", "want"), [
    ("127.0.0.1", False, None, False),
    ("localhost", False, None, False),
    ("::1", False, None, False),
    ("127.0.0.1", True, None, True),
    ("127.0.0.1", False, "c.pem", True),
    ("0.0.0.0", False, None, True),
    ("192.0.2.10", False, None, True),
    ("laptop.example.com", False, None, True),
])
def test_tls_is_automatic_off_loopback(host: str, flag: bool, cert: str | None, want: bool) -> None:
    assert wants_tls(host, flag, cert) is want


def test_plan_exposure(tmp_path: Path) -> None:
    plain = plan_exposure(tmp_path, "127.0.0.1")
    assert not plain.tls and plain.scheme == "http" and plain.ice_ip is None
    assert plain.env() == {"LOTCAST_HOST": "127.0.0.1"}
    assert phone_hint(plain, "http://127.0.0.1:8080") is None
    assert not (tmp_path / tls.TLS_DIR).exists()

    local = plan_exposure(tmp_path, "127.0.0.1", tls=True)
    assert local.tls and local.dev is not None and local.ca_file == str(local.dev.ca_path)
    assert local.env()["LOTCAST_TLS_CERT"] == str(local.dev.cert_path)
    assert local.url_args(0) == ["--public-url", "https://127.0.0.1:0"]
    names = tls.certificate_names(_cert(local.dev.cert_path))
    assert {"127.0.0.1", "localhost", *tls.lan_addresses()} <= names
    hint = phone_hint(local, "https://127.0.0.1:8080")
    assert hint is not None and "https://127.0.0.1:8080/ca.crt" in hint and "--host 0.0.0.0" in hint

    lan = plan_exposure(tmp_path, "0.0.0.0")
    expected = (tls.lan_addresses() or ["127.0.0.1"])[0]
    assert lan.tls and lan.public_host == expected and lan.env()["LOTCAST_HOST"] == "0.0.0.0"
    assert lan.dev is not None and expected in tls.certificate_names(_cert(lan.dev.cert_path))
    assert lan.url_args(8080) == ["--public-url", f"https://{expected}:8080"]

    named = plan_exposure(tmp_path, "192.0.2.10", public_host="laptop.example.com", tls=True)
    assert named.ice_ip == "192.0.2.10"
    assert named.dev is not None
    assert {"laptop.example.com", "192.0.2.10"} <= tls.certificate_names(_cert(named.dev.cert_path))

    own = plan_exposure(tmp_path, "127.0.0.1", cert="c.pem", key="k.pem")
    assert own.tls and own.dev is None and own.ca_file == ""
    assert own.cert == str(Path("c.pem").resolve())
    with pytest.raises(ValueError, match="--cert and --key"):
        plan_exposure(tmp_path, "127.0.0.1", cert="c.pem")


def test_node_url_scheme_follows_tls() -> None:
    assert node_url(Settings(host="127.0.0.1"), 8443) == "http://127.0.0.1:8443"
    assert node_url(Settings(host="127.0.0.1", tls_cert="c", tls_key="k"), 8443) == \
        "https://127.0.0.1:8443"
    assert node_url(Settings(public_url="https://192.0.2.10:0"), 8443) == "https://192.0.2.10:8443"
    assert node_url(Settings(public_url="https://relay-1.edge.example.com"), 8443) == \
        "https://relay-1.edge.example.com"
    env = Settings.from_env(host="127.0.0.1", port=9000, tls_cert="c", tls_key="k")
    assert env.public_url == "https://127.0.0.1:9000"
