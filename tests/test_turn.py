"""TURN credentials against a real coturn, and what the nodes say about TURN over HTTP.

- The TURN REST pair a node mints is what coturn's `use-auth-secret` expects: a real coturn
  grants an allocation with it over UDP, TCP and TLS, and refuses (401) an expired pair, a forged
  credential and a pair minted with another secret.
- Every WHIP/WHEP 201 and OPTIONS answer carries fresh credentials for every TURN URL; the static
  secret appears in no response of any endpoint.
- A node without TURN settings sends no TURN Link at all; a node with TURN URLs but no secret
  refuses to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from aioice import stun, turn
from media_support import SECRET, Publisher, Viewer, host_token, http_client, running_cluster
from up_support import SCRUBBED, UpProcess, wait_gone

from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess
from lotcast.turn import (
    CoturnServer,
    TurnConfigError,
    check_turn_settings,
    mint_credentials,
)

pytestmark = pytest.mark.timeout(60)

LINK = re.compile(r'<([^>]+)>; rel="ice-server"; username="([^"]+)"; credential="([^"]+)"; '
                  r'credential-type="password"')


class _Sink(asyncio.DatagramProtocol):
    pass


@pytest.fixture(scope="module")
def coturn() -> Iterator[CoturnServer]:
    with CoturnServer() as server:
        yield server


async def allocate(server: CoturnServer, username: str, password: str,
                   transport: str = "udp") -> tuple[str, int]:
    """Create (and release) a TURN allocation; returns the relayed address coturn granted."""
    port, tls = server.port, None
    if transport == "tls":
        port, tls, transport = server.tls_port, ssl.create_default_context(), "tcp"
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE  # coturn's self-signed loopback certificate
    endpoint, _ = await asyncio.wait_for(turn.create_turn_endpoint(
        _Sink, ("127.0.0.1", port), username, password, ssl=tls, transport=transport), 10)
    try:
        relayed: tuple[str, int] = endpoint.get_extra_info("sockname")
        return relayed
    finally:
        endpoint.close()


async def refused_with(server: CoturnServer, username: str, password: str) -> int:
    with pytest.raises(stun.TransactionFailed) as failure:
        await allocate(server, username, password)
    code: int = failure.value.response.attributes["ERROR-CODE"][0]
    return code


def test_credentials_are_the_turn_rest_scheme() -> None:
    # reference value: printf '1700000600:alice' | openssl dgst -sha1 -hmac <secret> -binary | base64
    creds = mint_credentials("coturn-shared-secret", "alice", 600, now=1700000000)
    assert creds.username == "1700000600:alice"
    assert creds.credential == "GQ+XmsI/IcDeSyMnQI/khbUQTXo="
    assert creds.expires_at == 1700000600
    for user in ("", "a:b"):
        with pytest.raises(TurnConfigError):
            mint_credentials("s", user, 600)
    with pytest.raises(TurnConfigError):
        mint_credentials("", "alice", 600)
    with pytest.raises(TurnConfigError, match="turn_secret"):
        check_turn_settings(["turn:127.0.0.1:3478"], "", 600)
    with pytest.raises(TurnConfigError, match="turn: or turns:"):
        check_turn_settings(["stun:127.0.0.1:3478"], "s", 600)
    with pytest.raises(TurnConfigError, match="Link header"):
        check_turn_settings(['turn:127.0.0.1:3478"; rel="x'], "s", 600)
    with pytest.raises(TurnConfigError, match="positive"):
        check_turn_settings(["turn:127.0.0.1:3478"], "s", 0)
    check_turn_settings([], "", 0)  # no TURN at all is valid


async def test_coturn_grants_fresh_and_refuses_expired_forged_and_foreign_credentials(
        coturn: CoturnServer) -> None:
    fresh = mint_credentials(coturn.secret, "viewer1", 60)
    for transport in ("udp", "tcp", "tls"):
        host, port = await allocate(coturn, fresh.username, fresh.credential, transport)
        assert host == "127.0.0.1" and port not in (coturn.port, coturn.tls_port), transport
    expired = mint_credentials(coturn.secret, "viewer1", -5)
    assert await refused_with(coturn, expired.username, expired.credential) == 401
    assert await refused_with(coturn, fresh.username, "Zm9yZ2VkLWNyZWRlbnRpYWw=") == 401
    # a later expiry written into a pair minted for an earlier one: the HMAC no longer matches
    stretched = f"{fresh.expires_at + 3600}:viewer1"
    assert await refused_with(coturn, stretched, fresh.credential) == 401
    foreign = mint_credentials("some-other-secret", "viewer1", 60)
    assert await refused_with(coturn, foreign.username, foreign.credential) == 401


@contextlib.asynccontextmanager
async def turn_nodes(redis: RedisServer, coturn: CoturnServer,
                     ttl: float = 600) -> AsyncIterator[ServiceProcess]:
    """A broadcaster advertising `coturn` (its secret only in the environment)."""
    env = {"LOTCAST_JWT_SECRET": SECRET, "LOTCAST_REDIS_URL": redis.url,
           "LOTCAST_LOG_LEVEL": "warning", "LOTCAST_TURN_SECRET": coturn.secret,
           "LOTCAST_TURN_URLS": ",".join(coturn.urls), "LOTCAST_TURN_TTL": str(ttl)}
    origin = ServiceProcess("broadcaster", ["--port", "0"], env=env)
    try:
        origin.start()
        yield origin
    finally:
        origin.stop()


def turn_links(response: httpx.Response, urls: list[str]) -> list[tuple[str, str, str]]:
    links = LINK.findall(response.headers.get("link", ""))
    assert [u for u, _, _ in links] == urls, response.headers.get("link")
    # one pair per answer, the same for each of its URLs
    assert len({(name, cred) for _, name, cred in links}) == 1
    return links


def assert_no_secret(response: httpx.Response, secret: str) -> None:
    for name, value in response.headers.items():
        assert secret not in value, f"{response.request.method} {response.url}: header {name}"
    assert secret.encode() not in response.content, f"{response.request.method} {response.url}"


async def test_every_answer_mints_fresh_credentials_and_never_shows_the_secret(
        redis_server: RedisServer, coturn: CoturnServer) -> None:
    async with turn_nodes(redis_server, coturn, ttl=600) as origin:
        base = origin.url
        seen: list[httpx.Response] = []
        async with http_client() as http:
            for path in ("/whip/turn-live", "/whep/turn-live"):
                seen.append(await http.options(base + path))
                assert seen[-1].status_code == 204
            publisher = Publisher(base, "turn-live", host_token())
            await publisher.start()
            viewers = [Viewer(base, "turn-live"), Viewer(base, "turn-live")]
            try:
                answers = []
                for viewer in viewers:
                    answers.append(await _post_offer_to(http, viewer, f"{base}/whep/turn-live"))
                seen += answers
                pairs = [turn_links(r, coturn.urls)[0][1:] for r in [*seen]]
                # every answer (the two OPTIONS and the two 201s) its own pair
                assert len(set(pairs)) == len(pairs), pairs
                now = time.time()
                for name, cred in pairs:
                    expiry = int(name.split(":", 1)[0])
                    assert now + 590 <= expiry <= now + 610, name
                    assert cred == mint_credentials(coturn.secret, name.split(":", 1)[1], 0,
                                                    now=expiry).credential
                # a pair a node handed out opens an allocation on the real coturn
                name, cred = pairs[-1]
                await allocate(coturn, name, cred, "tcp")
                # other answers of the same node: errors, stats, metrics, pages
                seen += [
                    await http.post(base + "/whep/not-live", content="v=0\r\n",
                                    headers={"Content-Type": "application/sdp"}),
                    await http.options(base + "/whep/turn-live/nosuchsession"),
                    await http.delete(base + "/whep/turn-live/nosuchsession"),
                    await http.get(base + "/api/stats"),
                    await http.get(base + "/metrics"),
                    await http.get(base + "/healthz"),
                    await http.get(base + "/watch?stream=turn-live"),
                ]
                for response in seen:
                    assert_no_secret(response, coturn.secret)
            finally:
                for viewer in viewers:
                    await viewer.stop()
                await publisher.stop()
        assert coturn.secret not in "".join(origin.output)


async def test_nodes_without_turn_send_no_turn_link(redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        async with http_client() as http:
            for url in (f"{cluster.origin.url}/whip/plain", f"{cluster.origin.url}/whep/plain",
                        f"{cluster.relay.url}/whep/plain"):
                response = await http.options(url)
                assert response.status_code == 204
                assert "link" not in response.headers, response.headers
        publisher = Publisher(cluster.origin.url, "plain", host_token())
        try:
            await publisher.start()
            viewer = Viewer(cluster.relay.url, "plain")
            try:
                async with http_client() as http:
                    answer = await _post_offer_to(http, viewer, f"{cluster.relay.url}/whep/plain")
                assert 'rel="ice-server"' not in answer.headers.get("link", ""), answer.headers
            finally:
                await viewer.stop()
        finally:
            await publisher.stop()


async def _post_offer_to(http: httpx.AsyncClient, viewer: Viewer, url: str) -> httpx.Response:
    viewer.pc.addTransceiver("audio", direction="recvonly")
    viewer.pc.addTransceiver("video", direction="recvonly")
    await viewer.pc.setLocalDescription(await viewer.pc.createOffer())
    for _ in range(50):  # the relay's pull from the origin may still be starting (409)
        response = await http.post(url, content=viewer.pc.localDescription.sdp,
                                   headers={"Content-Type": "application/sdp"})
        if response.status_code != 409:
            break
        await asyncio.sleep(0.2)
    assert response.status_code == 201, response.text
    viewer.resource = url.rsplit("/whep/", 1)[0] + response.headers["location"]
    return response


def test_a_node_with_turn_urls_but_no_secret_refuses_to_start(redis_server: RedisServer) -> None:
    env = {"LOTCAST_JWT_SECRET": SECRET, "LOTCAST_REDIS_URL": redis_server.url,
           "LOTCAST_TURN_URLS": "turn:127.0.0.1:3478?transport=udp"}
    node = ServiceProcess("relay", ["--port", "0"], env=env)
    with pytest.raises(RuntimeError, match="turn_secret is empty"):
        node.start(timeout=20)
    assert node.returncode not in (None, 0)


def turn_pids(conf: Path) -> set[int]:
    """Running turnserver processes started with this config file."""
    found = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "turnserver" and str(conf) in (proc.info["cmdline"] or []):
            found.add(proc.pid)
    return found


@pytest.mark.timeout(90)
async def test_up_turn_runs_coturn_and_advertises_it(tmp_path: Path) -> None:
    """`lotcast up --turn`: coturn on loopback, supervised (restarted after kill -9 on its ports),
    its URLs advertised with working credentials by every node, stopped with `up`."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    up = UpProcess(tmp_path / "data", env=env,
                   args=["--turn", "--turn-port", "0", "--turn-tls-port", "0"])
    try:
        up.start()
        line = up.wait_line(re.compile(r"^\s+TURN:\s+(.+) \(pid (\d+);"), 5)
        urls, pid = line.group(1).split(", "), int(line.group(2))
        up.every_pid.add(pid)
        assert [u.split("?")[0].split(":")[0] for u in urls] == ["turn", "turn", "turns"]
        assert all(u.startswith(("turn:127.0.0.1:", "turns:127.0.0.1:")) for u in urls)
        conf = (tmp_path / "data" / "turn" / "turnserver.conf")
        assert conf.stat().st_mode & 0o077 == 0
        secret = re.search(r"^static-auth-secret=(\S+)$", conf.read_text(), re.M)
        assert secret and "allow-loopback-peers" in conf.read_text()
        async with http_client() as http:
            for node in ("broadcaster", "relay-0"):
                probe = await http.options(f"{up.urls[node]}/whep/main")
                links = turn_links(probe, urls)
                assert_no_secret(probe, secret.group(1))
        name, cred = links[0][1:]
        server = CoturnServer(port=int(urls[0].split(":")[2].split("?")[0]),
                              tls_port=int(urls[2].split(":")[2].split("?")[0]))
        try:
            await allocate(server, name, cred, "udp")
            await allocate(server, name, cred, "tls")
            mark = len(up.snapshot())
            os.kill(pid, signal.SIGKILL)
            up.wait_line(re.compile(r"^\[up\] turn restarted"), 30, mark)
            for _ in range(50):  # the restarted coturn accepts the same credentials
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    await allocate(server, name, cred, "tcp")
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"restarted coturn refused the credentials:\n{up.text()}")
        finally:
            server.close()
        assert up.stop() == 0
        assert not wait_gone({pid, *turn_pids(conf)}, 10), "coturn outlived up"
    finally:
        up.close()
