"""The announced address (--ice-announce-ip): a relay whose mux binds one address and advertises
another, as a k8s relay binds its pod IP and advertises the node's (hostPort maps node:port to
pod:port, the port unchanged).

The relay binds 127.0.0.1 and announces 127.0.0.2 (all of 127/8 is local on Linux). Nothing
listens on 127.0.0.2:port but `HostPortMap`, a UDP forwarder standing in for the node's hostPort
mapping: it passes every datagram between 127.0.0.2:port and the relay's 127.0.0.1:port, so a
viewer reaches the relay only if it uses the announced address. The viewer is a real aiortc peer
that decodes frames.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, cast
from urllib.parse import urljoin

import psutil
import pytest
from aiortc import RTCSessionDescription
from media_support import Publisher, Viewer, assert_in_order, host_token, http_client, running_cluster
from prometheus_client.parser import text_string_to_metric_families

from lotcast.config import Settings
from lotcast.launch import announce_problem
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(150)

BOUND = "127.0.0.1"
ANNOUNCED = "127.0.0.2"


def _port_free_on_both() -> int:
    """A UDP port free on 127.0.0.1 and on 127.0.0.2 (the relay binds one, the map the other)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
            a.bind((BOUND, 0))
            port = int(a.getsockname()[1])
            try:
                b.bind((ANNOUNCED, port))
            except OSError:
                continue
            return port
    raise AssertionError("no UDP port free on both loopback addresses")


class _Front(asyncio.DatagramProtocol):
    def __init__(self, owner: HostPortMap) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.owner.inbound(data, (addr[0], addr[1]))


class _Back(asyncio.DatagramProtocol):
    def __init__(self, owner: HostPortMap, client: tuple[str, int]) -> None:
        self.owner = owner
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.owner.outbound(data, self.client)


class HostPortMap:
    """ANNOUNCED:port -> BOUND:port, one inner socket per outside address (as a hostPort DNAT
    with masquerade keeps one mapping per flow); replies go out from ANNOUNCED:port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.to_relay = 0
        self.from_relay = 0
        self._front: asyncio.DatagramTransport | None = None
        self._back: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._connecting: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Front(self), local_addr=(ANNOUNCED, self.port))
        self._front = cast(asyncio.DatagramTransport, transport)

    def inbound(self, data: bytes, client: tuple[str, int]) -> None:
        self.to_relay += 1
        back = self._back.get(client)
        if back is not None:
            back.sendto(data)
            return
        pending = self._pending.setdefault(client, [])
        pending.append(data)
        if len(pending) == 1:
            task = asyncio.ensure_future(self._connect(client))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, client: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Back(self, client), local_addr=(BOUND, 0), remote_addr=(BOUND, self.port))
        back = cast(asyncio.DatagramTransport, transport)
        self._back[client] = back
        for data in self._pending.pop(client, []):
            back.sendto(data)

    def outbound(self, data: bytes, client: tuple[str, int]) -> None:
        self.from_relay += 1
        if self._front is not None:
            self._front.sendto(data, client)

    def close(self) -> None:
        for task in self._connecting:
            task.cancel()
        for back in self._back.values():
            back.close()
        if self._front is not None:
            self._front.close()


class UnreachableViewer(Viewer):
    """A viewer whose offer names none of its addresses (no candidates, no end-of-candidates, as
    a client that would trickle them later): the relay learns its address only from the checks
    it receives (peer-reflexive), which come through the mapping. So the relay cannot reach the
    viewer straight from its bound address, as a NAT'd viewer is not reachable from a pod."""

    async def start(self, expect: int = 201) -> None:
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            consume = self._video if track.kind == "video" else self._audio
            self._tasks.append(asyncio.ensure_future(consume(track)))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = "".join(line + "\r\n" for line in self.pc.localDescription.sdp.splitlines()
                        if not line.startswith(("a=candidate:", "a=end-of-candidates")))
        assert "a=candidate" not in offer
        async with http_client() as http:
            response = await http.post(self.url, content=offer,
                                       headers={"Content-Type": "application/sdp"})
        assert response.status_code == expect, (response.status_code, response.text)
        self.resource = urljoin(str(response.url), response.headers["Location"])
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))


def _mux_series(text: str) -> dict[str, float]:
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("lotcast_udp_mux_")}


async def _mux_metrics_until(url: str, want: dict[str, float]) -> dict[str, float]:
    deadline = time.monotonic() + 20
    async with http_client() as http:
        while True:
            response = await http.get(f"{url}/metrics")
            assert response.status_code == 200
            series = _mux_series(response.text)
            if all(series.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
                return series
            await asyncio.sleep(0.2)


@pytest.mark.timeout(180)
async def test_the_viewer_connects_through_the_announced_address(
        redis_server: RedisServer) -> None:
    port = _port_free_on_both()
    hostport = HostPortMap(port)
    await hostport.open()
    args = ["--udp-port", str(port), "--ice-ip", BOUND, "--ice-announce-ip", ANNOUNCED]
    try:
        with running_cluster(redis_server, relay_args=args) as cluster:
            relay = cluster.relay
            # the mux binds the bound address; nothing of the relay's listens on the announced one
            bound = [(c.laddr.ip, c.laddr.port)
                     for c in psutil.Process(relay.pid).net_connections(kind="udp")]
            assert bound == [(BOUND, port)], bound

            # the mux still counts what nobody claims, arriving through the mapping
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stray:
                for i in range(5):
                    stray.sendto(b"\x80\x60junk" + bytes([i]), (ANNOUNCED, port))
            want = {"lotcast_udp_mux_dropped_datagrams_total": 5.0,
                    "lotcast_udp_mux_port": float(port), "lotcast_udp_mux_connections": 0.0}
            series = await _mux_metrics_until(relay.url, want)
            assert {k: series.get(k) for k in want} == want, series

            publisher = Publisher(cluster.origin.url, "announced", host_token())
            await publisher.start()
            viewer = UnreachableViewer(relay.url, "announced")
            try:
                await viewer.start()
                answer = viewer.pc.remoteDescription.sdp
                candidates = [line for line in answer.splitlines()
                              if line.startswith("a=candidate:")]
                assert candidates, answer
                assert all(f" {ANNOUNCED} {port} typ host" in c for c in candidates), candidates
                assert f"c=IN IP4 {ANNOUNCED}" in answer, answer
                assert f" {BOUND} " not in "\n".join(candidates)

                await viewer.wait_frames(30, timeout=90)
                assert_in_order(viewer.counters)
                pair = viewer.pc.getTransceivers()[0].receiver.transport.transport \
                    ._connection._nominated[1]
                assert pair.remote_addr == (ANNOUNCED, port)
                # every media datagram went through the mapping, both ways
                assert hostport.to_relay > 5 and hostport.from_relay > 30, (
                    hostport.to_relay, hostport.from_relay)
                series = await _mux_metrics_until(relay.url, {"lotcast_udp_mux_connections": 1.0})
                assert series.get("lotcast_udp_mux_connections") == 1.0, series
                assert series.get("lotcast_udp_mux_dropped_datagrams_total") == 5.0, series
                # the pull from the origin gathers on the bound address as before (not announced)
                sockets = psutil.Process(relay.pid).net_connections(kind="udp")
                assert sorted(c.laddr.ip for c in sockets) == [BOUND, BOUND], sockets
                async with http_client() as http:
                    stats = (await http.get(f"{relay.url}/api/stats")).json()
                assert stats["udp_sockets"] == 2  # the mux + the upstream pull
            finally:
                await viewer.stop()
                await publisher.stop()
    finally:
        hostport.close()


@pytest.mark.parametrize(("values", "reason"), [
    ({"ice_announce_ip": "node.example.com", "udp_port": 40000}, "is not an IP address"),
    ({"ice_announce_ip": "10.0.0.300", "udp_port": 40000}, "is not an IP address"),
    ({"ice_announce_ip": "0.0.0.0", "udp_port": 40000}, "is not a unicast address"),
    ({"ice_announce_ip": "239.1.2.3", "udp_port": 40000}, "is not a unicast address"),
    ({"ice_announce_ip": "203.0.113.7", "udp_port": 0}, "needs --udp-port"),
    ({"ice_announce_ip": "2001:db8::7", "udp_port": 40000}, "is IPv6 but the mux binds"),
    ({"ice_announce_ip": "203.0.113.7", "udp_port": 40000, "ice_ip": "::1"},
     "is IPv4 but the mux binds"),
])
def test_bad_announced_addresses_are_refused(values: dict[str, Any], reason: str) -> None:
    problem = announce_problem(Settings(**values))
    assert problem is not None and reason in problem, problem


def test_good_announced_addresses_pass() -> None:
    assert announce_problem(Settings()) is None
    assert announce_problem(Settings(ice_announce_ip="203.0.113.7", udp_port=40000,
                                     ice_ip="10.1.2.3")) is None
    assert announce_problem(Settings(ice_announce_ip="2001:db8::7", udp_port=40000,
                                     ice_ip="fd00::5")) is None


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_bad_announced_address_fails_the_relay_start(
        redis_server: RedisServer, workers: str) -> None:
    args = ["--workers", workers, "--udp-port", str(_port_free_on_both()),
            "--ice-announce-ip", "node-ip"]
    with pytest.raises(RuntimeError) as failed, \
            running_cluster(redis_server, relay_args=args):
        pass
    message = str(failed.value)
    assert "relay exited before ready" in message, message
    assert "lotcast: --ice-announce-ip 'node-ip' is not an IP address" in message, message
    assert "Traceback" not in message, message


def _free_pair_on_bound() -> int:
    """A port N with N and N + 1 free on BOUND (a two-worker relay binds both)."""
    for _ in range(50):
        base = _port_free_on_both()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as second:
            try:
                second.bind((BOUND, base + 1))
            except OSError:
                continue
        return base
    raise AssertionError("no two adjacent free UDP ports")


@pytest.mark.timeout(180)
async def test_every_worker_announces_the_address_with_its_own_port(
        redis_server: RedisServer) -> None:
    base = _free_pair_on_bound()
    args = ["--workers", "2", "--udp-port", str(base), "--ice-ip", BOUND,
            "--ice-announce-ip", ANNOUNCED]
    with running_cluster(redis_server, relay_args=args) as cluster:
        relay = cluster.relay
        bound = sorted((c.laddr.ip, c.laddr.port) for pid in relay.info["worker_pids"]
                       for c in psutil.Process(pid).net_connections(kind="udp"))
        assert bound == [(BOUND, base), (BOUND, base + 1)], bound
        publisher = Publisher(cluster.origin.url, "announced2", host_token())
        await publisher.start()
        seen: set[int] = set()
        try:
            for _ in range(16):  # SO_REUSEPORT spreads POSTs over the workers; stop once both
                viewer = Viewer(relay.url, "announced2")
                try:
                    await viewer.start()
                    candidates = [line for line in viewer.pc.remoteDescription.sdp.splitlines()
                                  if line.startswith("a=candidate:")]
                    ports = {int(c.split()[5]) for c in candidates}
                    assert candidates and all(f" {ANNOUNCED} " in c for c in candidates), candidates
                    assert len(ports) == 1 and ports <= {base, base + 1}, candidates
                    seen |= ports
                finally:
                    await viewer.stop()
                if seen == {base, base + 1}:
                    break
        finally:
            await publisher.stop()
        assert seen == {base, base + 1}, seen
