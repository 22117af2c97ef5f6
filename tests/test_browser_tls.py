"""Real `lotcast up --tls` (issue 12 item 2): every node serves HTTPS/WSS with a certificate from
the local CA `up` keeps in its data dir; the printed and advertised URLs are https; clients that
trust the CA verify every node; plain HTTP is refused; Chromium, trusting exactly that server
key, publishes from the host page and plays on the viewer page (room socket over wss)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_support import CHROMIUM_ARGS, PageLog, chromium_path, open_page, wait_for
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from up_support import UpProcess

from lotcast import tls
from lotcast.auth import Role

STREAM = "main"


def _spki_hash(cert_path: Path) -> str:
    """What --ignore-certificate-errors-spki-list takes: base64(sha256(SubjectPublicKeyInfo))."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


async def _state(page: Any) -> dict[str, Any]:
    return await page.evaluate("window.lotcast ? window.lotcast.state() : {}")  # type: ignore[no-any-return]


async def _published(page: Any) -> bool:
    if (await _state(page)).get("publish") != "live":
        return False
    stats = await page.evaluate("window.lotcast.stats()") or {}
    return bool(stats.get("framesEncoded"))


async def _playing(page: Any, relay: str, frames: int) -> dict[str, Any] | None:
    s = await _state(page)
    if s.get("relay") != relay or s.get("media") != "connected" or s.get("room") != "open":
        return None
    raw = await page.evaluate("window.lotcast.rawStats()") or {}
    if raw.get("video", {}).get("framesDecoded", 0) >= frames and raw.get("audio", {}).get(
            "packetsReceived"):
        return s
    return None


@pytest.mark.timeout(180)
async def test_up_tls_serves_every_node_over_https_and_chromium_publishes_and_plays(
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright

    data = tmp_path / "data"
    up = UpProcess(data, relays=1, args=["--tls"])
    log = PageLog()
    try:
        up.start()
        text = up.text()
        origin, relay = up.urls["broadcaster"], up.urls["relay-0"]
        for url in (origin, relay):
            assert re.fullmatch(r"https://127\.0\.0\.1:\d+", url), text
        assert f"Host page:    {origin}/host?stream={STREAM}#token=" in text
        assert f"Viewer page:  {relay}/watch?stream={STREAM}\n" in text
        ca = data / tls.TLS_DIR / tls.CA_CERT
        server_cert = data / tls.TLS_DIR / tls.SERVER_CERT
        assert f"certificate {server_cert} (created; for localhost, 127.0.0.1" in text
        assert f"{origin}/ca.crt" in text and "Certificate Trust Settings" in text
        assert "Install a certificate > CA certificate" in text

        # Every node verifies against the generated CA (and only because of it).
        verify = tls.client_context(ca)
        async with httpx.AsyncClient(verify=verify, trust_env=False, timeout=10) as http:
            for url in (origin, relay):
                health = await http.get(f"{url}/healthz")
                assert (health.status_code, health.text) == (200, "ok\n")
                assert (await http.get(f"{url}/api/stats")).status_code == 200
                assert (await http.get(f"{url}/ca.crt")).content == ca.read_bytes()
            # Placement sends browsers to the relay's advertised (registry) URL: https.
            # (503 until the relay's first heartbeat is in the registry)
            for _ in range(100):
                placed = await http.get(f"{origin}/api/streams/{STREAM}/edge")
                if placed.status_code != 503:
                    break
                await asyncio.sleep(0.1)
            assert placed.status_code == 307, placed.text
            assert placed.headers["location"] == f"{relay}/whep/{STREAM}"
        async with httpx.AsyncClient(trust_env=False, timeout=10) as plain:
            for url in (origin, relay):
                with pytest.raises(httpx.RemoteProtocolError):
                    await plain.get(url.replace("https://", "http://") + "/healthz")
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await plain.get(f"{url}/healthz")

        # Chromium trusts exactly the server key up generated (this test's profile only).
        args = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={_spki_hash(server_cert)}"]
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium_path(), args=args,
                                               headless=True)
            try:
                token = up.authority().mint(Role.HOST, "host", "Host")
                host = await open_page(browser, f"{origin}/host?stream={STREAM}#token={token}",
                                       log, "host")
                assert await host.evaluate("window.isSecureContext") is True
                await host.click("#go-live")
                await wait_for(lambda: _published(host), 45, "host page live over https", log)
                viewer = await open_page(browser, f"{relay}/watch?stream={STREAM}", log, "viewer")
                assert await viewer.evaluate("window.isSecureContext") is True
                state = await wait_for(lambda: _playing(viewer, relay, 15), 60,
                                       "viewer decoding over https with its room open", log)
                assert state["lastStatus"] == 201
                room_url = await viewer.evaluate("window.lotcast.room.url")
                assert room_url.startswith(relay.replace("https://", "wss://") + "/ws/"), room_url
            finally:
                await browser.close()
        # The relay pulled the stream from the https origin, verifying it with the CA.
        async with httpx.AsyncClient(verify=verify, trust_env=False, timeout=10) as http:
            upstreams = (await http.get(f"{relay}/api/stats")).json()["upstreams"]
        assert [u["url"].rstrip("/") for u in upstreams] == [origin], upstreams
    except BaseException:
        print(log.tail(120))
        print(up.text())
        raise
    finally:
        up.close()
