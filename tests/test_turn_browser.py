"""Media through a real coturn: Chromium and aiortc peers restricted to relay candidates
(`iceTransportPolicy: "relay"`) publish and play through TURN over UDP, and over TCP to a coturn
that has no UDP listener at all (a network where UDP to the TURN server is blocked).

The nodes advertise both coturns in their `Link: rel="ice-server"` headers with credentials
minted per answer; each peer picks the server of its case from those headers (the viewer page's
own parser, viewer_web/static/js/signaling.js). The nodes count the sessions whose nominated ICE
pair is relayed in `lotcast_turn_viewers` / `lotcast_turn_publishers`.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection
from browser_support import PageLog, chromium, wait_for
from media_support import SECRET, Publisher, host_token, http_client

from lotcast.media.aiortc_hooks import selected_candidate_types
from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess
from lotcast.turn import CoturnServer

pytestmark = pytest.mark.timeout(90)

LINK = re.compile(r'<([^>]+)>; rel="ice-server"; username="([^"]+)"; credential="([^"]+)"; '
                  r'credential-type="password"')

# Chromium side: ICE servers from the endpoint's OPTIONS Link header (parsed by the viewer page's
# own module), kept to the URLs containing `pick`, relay candidates only; the offer is sent once
# gathering completes (as whip.js/whep.js do), the answer applied, the pc kept in window.__pc.
_CONNECT_JS = """async ({endpoint, pick, token, publish}) => {
    const {parseIceServerLinks} = await import('/static/js/signaling.js');
    const auth = token ? {Authorization: 'Bearer ' + token} : {};
    const probe = await fetch(endpoint, {method: 'OPTIONS', headers: auth});
    const iceServers = parseIceServerLinks(probe.headers.get('Link'))
        .filter((s) => s.urls.includes(pick));
    if (iceServers.length !== 1) throw new Error('no single ICE server for ' + pick);
    const pc = new RTCPeerConnection({iceServers, iceTransportPolicy: 'relay',
                                      bundlePolicy: 'max-bundle'});
    window.__pc = pc;
    if (publish) {
        const media = await navigator.mediaDevices.getUserMedia(
            {audio: true, video: {width: 320, height: 240, frameRate: 15}});
        for (const track of media.getTracks()) pc.addTransceiver(track, {direction: 'sendonly'});
    } else {
        pc.addTransceiver('audio', {direction: 'recvonly'});
        pc.addTransceiver('video', {direction: 'recvonly'});
    }
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
        if (pc.iceGatheringState === 'complete') return resolve();
        pc.addEventListener('icegatheringstatechange',
            () => pc.iceGatheringState === 'complete' && resolve());
        setTimeout(resolve, 8000);
    });
    const offer = pc.localDescription.sdp;
    const res = await fetch(endpoint, {method: 'POST', body: offer,
        headers: {...auth, 'Content-Type': 'application/sdp'}});
    if (res.status !== 201) throw new Error('POST ' + res.status + ' ' + await res.text());
    await pc.setRemoteDescription({type: 'answer', sdp: await res.text()});
    return {server: iceServers[0].urls, offer};
}"""

_STATS_JS = """async () => {
    const pc = window.__pc;
    const stats = await pc.getStats();
    const out = {state: pc.connectionState, frames: 0, sent: 0, local: null, remote: null};
    stats.forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video') out.frames = s.framesDecoded || 0;
        if (s.type === 'outbound-rtp' && s.kind === 'video') out.sent = s.framesEncoded || 0;
        if (s.type === 'transport' && s.selectedCandidatePairId) {
            const pair = stats.get(s.selectedCandidatePairId);
            const local = stats.get(pair.localCandidateId);
            const remote = stats.get(pair.remoteCandidateId);
            out.local = {type: local.candidateType, relayProtocol: local.relayProtocol || null,
                         address: local.address, port: local.port};
            out.remote = {type: remote.candidateType, address: remote.address};
        }
    });
    return out;
}"""


@dataclass
class TurnCluster:
    origin: ServiceProcess
    relay: ServiceProcess
    both: CoturnServer  # UDP + TCP + TLS listeners
    tcp_only: CoturnServer  # no UDP listener: TURN over TCP or nothing

    def logs(self) -> str:
        return "\n".join(["".join(p.output[-30:]) for p in (self.origin, self.relay)]
                         + [self.both.log_tail(1500), self.tcp_only.log_tail(1500)])


@pytest.fixture(scope="module")
def turn_cluster(redis_server: RedisServer) -> Iterator[TurnCluster]:
    secret = secrets.token_urlsafe(24)
    with contextlib.ExitStack() as stack:
        both = stack.enter_context(CoturnServer(secret=secret))
        tcp_only = stack.enter_context(CoturnServer(secret=secret, udp=False, tls=False))
        env = {"LOTCAST_JWT_SECRET": SECRET, "LOTCAST_REDIS_URL": redis_server.url,
               "LOTCAST_LOG_LEVEL": "warning", "LOTCAST_TURN_SECRET": secret,
               # a closed browser sends no DELETE: its sessions are reaped after this
               "LOTCAST_SESSION_TIMEOUT": "5",
               "LOTCAST_TURN_URLS": ",".join(both.urls + tcp_only.urls)}
        origin = ServiceProcess("broadcaster", ["--port", "0"], env=env)
        stack.callback(origin.stop)
        origin.start()
        relay = ServiceProcess("relay", ["--port", "0", "--origin-url", origin.url,
                                         "--node-id", "turn-relay"], env=env)
        stack.callback(relay.stop)
        relay.start()
        yield TurnCluster(origin, relay, both, tcp_only)


@contextlib.asynccontextmanager
async def browser_pages(n: int) -> AsyncIterator[list[Any]]:
    async with chromium() as browser:
        pages = []
        for _ in range(n):
            context = await browser.new_context()
            pages.append(await context.new_page())
        yield pages


async def metric(url: str, name: str) -> float:
    async with http_client() as http:
        text = (await http.get(f"{url}/metrics")).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def chromium_connect(page: Any, node: str, endpoint: str, pick: str, log: PageLog,
                           token: str | None = None, publish: bool = False) -> dict[str, Any]:
    log.attach(page, "publisher" if publish else "viewer")
    await page.goto(f"{node}/healthz")
    result: dict[str, Any] = await page.evaluate(
        _CONNECT_JS, {"endpoint": endpoint, "pick": pick, "token": token, "publish": publish})
    # relay candidates only in the offer: the peer cannot reach the node but through TURN
    candidates = re.findall(r"^a=candidate:.*$", result["offer"], re.M)
    assert candidates and all(" typ relay" in c for c in candidates), candidates
    return result


def relayed(stats: dict[str, Any], protocol: str) -> bool:
    local = stats.get("local") or {}
    return local.get("type") == "relay" and local.get("relayProtocol") == protocol


async def test_chromium_publishes_and_plays_through_turn_over_udp(
        turn_cluster: TurnCluster) -> None:
    c = turn_cluster
    udp_url = next(u for u in c.both.urls if u.endswith("transport=udp"))
    log = PageLog()
    async with browser_pages(2) as (publisher, viewer):
        pub = await chromium_connect(publisher, c.origin.url, f"{c.origin.url}/whip/turn-udp",
                                     udp_url, log, token=host_token(), publish=True)
        assert pub["server"] == udp_url
        await wait_for(lambda: _stats(publisher, lambda s: s["state"] == "connected"
                                      and relayed(s, "udp") and s["sent"] > 10),
                       30, "the publisher relayed over UDP", log)
        await wait_for(lambda: _has_metric(c.origin.url, "lotcast_turn_publishers", 1), 10,
                       "the origin counting one TURN publisher", log)

        await chromium_connect(viewer, c.relay.url, f"{c.relay.url}/whep/turn-udp", udp_url, log)
        first = await wait_for(lambda: _stats(viewer, lambda s: relayed(s, "udp")
                                              and s["frames"] > 5), 30,
                               f"frames through TURN/UDP\n{c.logs()}", log)
        # the viewer's relay candidate is an allocation on coturn's loopback relay address
        assert first["local"]["address"] == "127.0.0.1"
        assert first["local"]["port"] != c.both.port
        assert first["remote"]["type"] == "host"
        await wait_for(lambda: _stats(viewer, lambda s: s["frames"] > first["frames"] + 15), 20,
                       "decoding to go on", log)
        await wait_for(lambda: _has_metric(c.relay.url, "lotcast_turn_viewers", 1), 10,
                       "the relay counting one TURN viewer", log)
        # the relay's own pull from the origin is direct, not relayed
        assert await metric(c.origin.url, "lotcast_turn_viewers") == 0
    # the browser is gone: its sessions are reaped and the gauges fall back
    await wait_for(lambda: _has_metric(c.relay.url, "lotcast_turn_viewers", 0), 30,
                   "the TURN viewer gauge to drop to 0")
    await wait_for(lambda: _has_metric(c.origin.url, "lotcast_turn_publishers", 0), 30,
                   "the TURN publisher gauge to drop to 0")


async def test_chromium_plays_and_aiortc_publishes_through_turn_over_tcp(
        turn_cluster: TurnCluster) -> None:
    c = turn_cluster
    (tcp_url,) = c.tcp_only.urls
    assert tcp_url.endswith("transport=tcp")
    publisher = await _aiortc_relay_publisher(c.origin.url, "turn-tcp", tcp_url)
    try:
        await wait_for(lambda: _pair_is(publisher.pc, ("relay", "host")), 20,
                       f"the aiortc publisher on a TURN/TCP pair\n{c.logs()}")
        await wait_for(lambda: _has_metric(c.origin.url, "lotcast_turn_publishers", 1), 10,
                       "the origin counting one TURN publisher")
        log = PageLog()
        async with browser_pages(1) as (viewer,):
            await chromium_connect(viewer, c.relay.url, f"{c.relay.url}/whep/turn-tcp", tcp_url,
                                   log)
            first = await wait_for(lambda: _stats(viewer, lambda s: relayed(s, "tcp")
                                                  and s["frames"] > 5), 30,
                                   f"frames through TURN/TCP\n{c.logs()}", log)
            await wait_for(lambda: _stats(viewer, lambda s: s["frames"] > first["frames"] + 15),
                           20, "decoding to go on", log)
            await wait_for(lambda: _has_metric(c.relay.url, "lotcast_turn_viewers", 1), 10,
                           "the relay counting one TURN viewer", log)
    finally:
        await publisher.stop()


async def _aiortc_relay_publisher(origin: str, stream: str, url: str) -> Publisher:
    """media_support's Publisher, on a peer connection that may use only `url`'s relay."""
    async with http_client() as http:
        probe = await http.options(f"{origin}/whip/{stream}")
    servers = [RTCIceServer(urls=u, username=name, credential=cred)
               for u, name, cred in LINK.findall(probe.headers["link"]) if u == url]
    assert len(servers) == 1, probe.headers["link"]
    publisher = Publisher(origin, stream, host_token(), fps=15)
    await publisher.pc.close()
    publisher.pc = RTCPeerConnection(RTCConfiguration(
        iceServers=servers, iceTransportPolicy=RTCIceTransportPolicy.RELAY))
    await publisher.start()
    return publisher


async def _pair_is(pc: RTCPeerConnection, types: tuple[str, str]) -> bool:
    return selected_candidate_types(pc) == types


async def _stats(page: Any, ok: Any) -> dict[str, Any] | None:
    stats: dict[str, Any] = await page.evaluate(_STATS_JS)
    return stats if ok(stats) else None


async def _has_metric(url: str, name: str, value: float) -> bool:
    return await metric(url, name) == value
