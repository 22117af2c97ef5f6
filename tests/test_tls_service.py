"""A real broadcaster process serving HTTPS/WSS from --cert/--key: clients that trust the CA
verify it, others and plain HTTP are refused, and a renewed certificate goes live while an HTTP
keep-alive connection and a room WebSocket opened before it keep working on the old one."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lotcast import tls
from lotcast.interactive.protocol import decode_server_frame, encode_client
from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess

NAMES = ["localhost", "127.0.0.1"]


@dataclass
class TlsNode:
    node: ServiceProcess
    ca: Path
    served_cert: Path
    served_key: Path
    renewal: tuple[bytes, bytes]  # a second certificate + key from the same CA
    old_serial: int
    new_serial: int

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.node.url.removeprefix("https://").rsplit(":", 1)
        return host, int(port)

    def client_ctx(self) -> ssl.SSLContext:
        return tls.client_context(self.ca)

    def renew(self) -> None:
        """Put the renewal in place the way cert-manager / certbot do: rename over the files."""
        for data, dst in zip(self.renewal, (self.served_cert, self.served_key), strict=True):
            tmp = dst.with_name(dst.name + ".new")
            tmp.write_bytes(data)
            os.replace(tmp, dst)


@pytest.fixture
def tls_node(redis_server: RedisServer, tmp_path: Path) -> Iterator[TlsNode]:
    dev = tls.ensure_dev_certificate(tmp_path / "data", NAMES)
    ca_key = serialization.load_pem_private_key((dev.ca_path.parent / tls.CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, tls.ec.EllipticCurvePrivateKey)
    cert, key = tls.issue_server_certificate(
        x509.load_pem_x509_certificate(dev.ca_path.read_bytes()), ca_key, NAMES)
    served = tmp_path / "mounted"
    served.mkdir()
    served_cert, served_key = served / "tls.crt", served / "tls.key"
    shutil.copyfile(dev.cert_path, served_cert)
    shutil.copyfile(dev.key_path, served_key)
    node = ServiceProcess(
        "broadcaster",
        ["--port", "0", "--redis-url", redis_server.url, "--cert", str(served_cert),
         "--key", str(served_key), "--ca-file", str(dev.ca_path)],
        env={"LOTCAST_TLS_RELOAD_INTERVAL": "0.1", "LOTCAST_HELLO_TIMEOUT": "60",
             "LOTCAST_LOG_LEVEL": "info"})
    node.start()
    try:
        yield TlsNode(node, dev.ca_path, served_cert, served_key,
                      (cert.public_bytes(serialization.Encoding.PEM), tls._key_pem(key)),
                      tls.certificate_serial(dev.cert_path), int(cert.serial_number))
    finally:
        node.stop()


def test_https_verified_with_the_ca_refused_otherwise(tls_node: TlsNode) -> None:
    url = tls_node.node.url
    assert url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=tls_node.client_ctx(), trust_env=False, timeout=5) as client:
        health = client.get(f"{url}/healthz")
        assert (health.status_code, health.text, health.http_version) == (200, "ok\n", "HTTP/1.1")
        assert client.get(f"{url}/readyz").status_code == 200
        ca = client.get(f"{url}/ca.crt")
        assert ca.status_code == 200
        assert ca.headers["content-type"] == "application/x-x509-ca-cert"
        assert ca.content == tls_node.ca.read_bytes()
    # The public store does not know the local CA.
    with httpx.Client(trust_env=False, timeout=5) as client, \
            pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        client.get(f"{url}/healthz")
    # Plain HTTP to the TLS port gets no HTTP answer at all, and the node serves on.
    plain = url.replace("https://", "http://")
    with httpx.Client(trust_env=False, timeout=5) as client, \
            pytest.raises(httpx.RemoteProtocolError):
        client.get(f"{plain}/healthz")
    with httpx.Client(verify=tls_node.client_ctx(), trust_env=False, timeout=5) as client:
        assert client.get(f"{url}/healthz").status_code == 200
    assert "Traceback" not in "".join(tls_node.node.output)


def _peer_serial(ssl_object: Any) -> int:
    der = ssl_object.getpeercert(binary_form=True)
    return int(x509.load_der_x509_certificate(der).serial_number)


def _get(sock: ssl.SSLSocket, path: str) -> bytes:
    """One HTTP/1.1 request on a kept-alive connection; the response head + body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: lotcast\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"ok\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed; got {data!r}")
        data += chunk
    return data


async def _request(ws: Any, kind: str, cid: str, **fields: Any) -> dict[str, Any]:
    await ws.send(encode_client(kind, cid=cid, **fields))
    for _ in range(50):
        frame = await asyncio.wait_for(ws.recv(), 10)
        for msg in decode_server_frame(frame):
            if msg.get("cid") == cid:
                return msg
    raise AssertionError(f"no reply to {kind}")


def _new_connection_serial(node: TlsNode) -> int:
    with socket.create_connection(node.addr, timeout=5) as raw, \
            node.client_ctx().wrap_socket(raw, server_hostname="127.0.0.1") as s:
        return _peer_serial(s)


@pytest.mark.timeout(90)
async def test_renewed_certificate_goes_live_without_dropping_open_connections(
    tls_node: TlsNode,
) -> None:
    host, port = tls_node.addr
    ws_url = tls_node.node.url.replace("https://", "wss://") + "/ws/tls-room"
    keepalive = tls_node.client_ctx().wrap_socket(socket.create_connection((host, port), timeout=5),
                                                  server_hostname="127.0.0.1")
    try:
        assert _get(keepalive, "/healthz").startswith(b"HTTP/1.1 200 OK\r\n")
        assert _peer_serial(keepalive) == tls_node.old_serial
        async with websockets.connect(ws_url, ssl=tls_node.client_ctx(), max_size=None) as ws:
            welcome = await _request(ws, "hello", "c1")
            assert welcome["type"] == "welcome"
            assert _peer_serial(ws.transport.get_extra_info("ssl_object")) == tls_node.old_serial

            tls_node.renew()
            for _ in range(100):
                if await asyncio.to_thread(_new_connection_serial, tls_node) == tls_node.new_serial:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("new connections never saw the renewed certificate:\n"
                                     + "".join(tls_node.node.output[-20:]))

            # Both connections opened before the renewal still work, on the old certificate.
            pong = await _request(ws, "ping", "c2", ts=1)
            assert pong["type"] == "pong"
            assert _peer_serial(ws.transport.get_extra_info("ssl_object")) == tls_node.old_serial
            assert _get(keepalive, "/healthz").startswith(b"HTTP/1.1 200 OK\r\n")
            assert _peer_serial(keepalive) == tls_node.old_serial

            async with websockets.connect(ws_url, ssl=tls_node.client_ctx()) as fresh:
                assert (await _request(fresh, "hello", "c1"))["type"] == "welcome"
                assert _peer_serial(fresh.transport.get_extra_info("ssl_object")) == \
                    tls_node.new_serial
        assert any("TLS certificate reloaded" in line for line in tls_node.node.output)
    finally:
        keepalive.close()
