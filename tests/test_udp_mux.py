"""One UDP port for many peer connections (lotcast/media/udpmux.py, wired in aiortc_hooks).

Real aiortc peers over loopback: the serving side's peer connections are put on one shared
socket, each viewer is an ordinary aiortc peer with a socket of its own. Forwarded RTP arrives
at every viewer through that one socket; RTCP from the viewers (NACK under injected loss, PLI)
comes back through it to the right connection; closing a connection frees its routing entries.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import AsyncIterator

import psutil
import pytest
from aiortc.rtp import RtpPacket
from media_support import (
    Publisher,
    Viewer,
    assert_in_order,
    host_token,
    http_client,
    lose_every_20th_video_packet_once,
    running_cluster,
)
from prometheus_client.parser import text_string_to_metric_families

from lotcast.media import aiortc_hooks
from lotcast.media.aiortc_hooks import (
    PacketSender,
    SenderFeedback,
    SilentTrack,
    check_hooks,
    current_udp_mux,
    drop_incoming_rtp,
    hook_sender,
    negotiated_codecs,
    new_peer_connection,
    request_keyframe,
    tap_receiver,
    use_udp_mux,
)
from lotcast.media.udpmux import UdpMux, stun_local_ufrag
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(180)

SSRC = 0x1234ABCD


def _udp_ports() -> list[int]:
    return sorted(c.laddr.port for c in psutil.Process(os.getpid()).net_connections(kind="udp"))


class Link:
    """One served connection (on the mux) and its viewer (a socket of its own)."""

    def __init__(self) -> None:
        self.server = new_peer_connection()
        self.viewer = new_peer_connection()
        self.received: list[RtpPacket] = []
        self.nacked: list[int] = []
        self.keyframe_requests = 0
        self.sender: PacketSender | None = None
        self.pt = 0

    async def connect(self, lose: set[int]) -> None:
        transceiver = self.server.addTransceiver(SilentTrack("video"), direction="sendonly")
        hook_sender(transceiver.sender, SSRC, SenderFeedback(
            on_nack=self.nacked.extend, on_keyframe_request=self._keyframe, on_alive=lambda: None))
        assert use_udp_mux(self.server)
        await self.server.setLocalDescription(await self.server.createOffer())
        await self.viewer.setRemoteDescription(self.server.localDescription)
        await self.viewer.setLocalDescription(await self.viewer.createAnswer())
        await self.server.setRemoteDescription(self.viewer.localDescription)
        deadline = time.monotonic() + 60
        while "connected" not in (self.server.connectionState, self.viewer.connectionState) or \
                self.server.connectionState != self.viewer.connectionState:
            assert time.monotonic() < deadline, (self.server.connectionState,
                                                 self.viewer.connectionState)
            await asyncio.sleep(0.05)
        receiver = self.viewer.getTransceivers()[0].receiver
        tap_receiver(receiver, self.received.append, lambda *_: None)
        dtls = receiver.transport

        def lose_once(data: bytes) -> bool:
            seq = struct.unpack_from("!H", data, 2)[0]
            if seq in lose:
                lose.discard(seq)
                return True
            return False

        drop_incoming_rtp(dtls, lose_once)
        self.sender = PacketSender(transceiver.sender.transport)
        assert self.sender.resolve()
        pt = negotiated_codecs(transceiver)[0].payloadType
        assert pt is not None
        self.pt = pt

    def _keyframe(self) -> None:
        self.keyframe_requests += 1

    def send(self, seq: int) -> None:
        assert self.sender is not None
        header = struct.pack("!BBHII", 0x80, self.pt, seq, seq * 3000, SSRC)
        self.sender.send(header + bytes([0x10, 0, 0, 0]) + bytes(seq % 256 for _ in range(900)))

    async def close(self) -> None:
        await self.viewer.close()
        await self.server.close()


@pytest.fixture
async def mux() -> AsyncIterator[None]:
    aiortc_hooks.restrict_host_addresses(["127.0.0.1"])
    aiortc_hooks.configure_udp_mux("127.0.0.1", 0)
    try:
        yield
    finally:
        aiortc_hooks.close_udp_mux()
        aiortc_hooks._mux_address = None


def test_stun_username_routing_key() -> None:
    # a binding request carrying USERNAME "abcd:wxyz" (RFC 8489 header, one attribute)
    value = b"abcd:wxyz"
    attr = struct.pack("!HH", 0x0006, len(value)) + value + b"\0" * 3
    message = struct.pack("!HHI", 0x0001, len(attr), 0x2112A442) + b"t" * 12 + attr
    assert stun_local_ufrag(message) == "abcd"
    assert stun_local_ufrag(b"\x80" + message[1:]) is None  # RTP's first byte: not STUN
    assert stun_local_ufrag(message[:-4]) is None  # truncated
    assert stun_local_ufrag(struct.pack("!HHI", 1, 0, 0x2112A442) + b"t" * 12) is None
    check_hooks()


async def test_a_foreign_datagram_is_dropped_and_counted() -> None:
    mux = await UdpMux.open("127.0.0.1", 0)
    try:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stray:
            stray.sendto(b"\x80" + b"\0" * 40, mux.sockname[:2])  # RTP from nobody we know
            stray.sendto(b"\x16\xfe\xfd" + b"\0" * 40, mux.sockname[:2])  # DTLS likewise
            deadline = time.monotonic() + 10
            while mux.dropped < 2:
                assert time.monotonic() < deadline, mux.dropped
                await asyncio.sleep(0.01)
        assert mux.dropped == 2 and mux.connections() == 0
    finally:
        mux.close()


async def test_many_viewers_through_one_socket_get_media_nacks_and_plis_back(mux: None) -> None:
    count = 20
    before = _udp_ports()
    links = [Link() for _ in range(count)]
    shared: UdpMux | None = None
    losses = [{5, 9} for _ in links]
    try:
        for start in range(0, count, 5):  # a few at a time: the CPU is shared
            await asyncio.gather(*(link.connect(lost) for link, lost in
                                   zip(links[start:start + 5], losses[start:start + 5],
                                       strict=True)))
        shared = current_udp_mux()
        assert shared is not None
        port = shared.sockname[1]
        # every served connection advertised and uses the one port; each viewer has its own
        for link in links:
            candidates = [line for line in link.server.localDescription.sdp.splitlines()
                          if line.startswith("a=candidate:")]
            assert candidates and all(f" {port} typ host" in c for c in candidates), candidates
            pair = link.server.getTransceivers()[0].sender.transport.transport._connection \
                ._nominated[1]
            assert pair.local_candidate.port == port
        assert shared.connections() == count and shared.bound_addresses() == count
        opened = [p for p in _udp_ports() if p not in before]
        assert opened.count(port) == 1
        assert len(opened) == count + 1  # the viewers' sockets, plus one for every server side

        for seq in range(1, 31):
            for link in links:
                link.send(seq)
            await asyncio.sleep(0.005)
        deadline = time.monotonic() + 30
        while any(not {5, 9} <= set(link.nacked) or len(link.received) < 30 for link in links):
            assert time.monotonic() < deadline, [(len(link.received), link.nacked)
                                                 for link in links]
            for link in links:  # answer the NACKs as the forwarder would
                for seq in [s for s in (5, 9) if s in link.nacked]:
                    if seq not in {p.sequence_number for p in link.received}:
                        link.send(seq)
            await asyncio.sleep(0.1)
        for link in links:
            assert {p.sequence_number for p in link.received} == set(range(1, 31))
            request_keyframe(link.viewer.getTransceivers()[0].receiver, SSRC)
        deadline = time.monotonic() + 20
        while any(link.keyframe_requests == 0 for link in links):
            assert time.monotonic() < deadline, [link.keyframe_requests for link in links]
            await asyncio.sleep(0.05)

        # viewers leaving give their routing entries back; the others go on
        for link in links[: count // 2]:
            await link.close()
        deadline = time.monotonic() + 10
        while shared.connections() != count - count // 2:
            assert time.monotonic() < deadline, shared.connections()
            await asyncio.sleep(0.05)
        assert shared.bound_addresses() == count - count // 2
        for link in links[count // 2:]:
            link.send(40)
        deadline = time.monotonic() + 10
        while any(link.received[-1].sequence_number != 40 for link in links[count // 2:]):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        for link in links:
            await link.close()
    assert (shared.connections(), shared.bound_addresses()) == (0, 0)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(240)
async def test_viewers_through_one_relay_port(redis_server: RedisServer) -> None:
    """A real relay with --udp-port: 20 viewers on one socket, NACK and PLI paths exercised."""
    port = _free_udp_port()
    count = 20
    with running_cluster(redis_server, relay_args=["--udp-port", str(port)]) as cluster:
        publisher = Publisher(cluster.origin.url, "mux", host_token())
        await publisher.start()
        group = [Viewer(cluster.relay.url, "mux") for _ in range(count)]
        try:
            for start in range(0, count, 5):
                await asyncio.gather(*(v.start() for v in group[start:start + 5]))
            for v in group:
                remote = v.pc.remoteDescription.sdp
                assert f"127.0.0.1 {port} typ host" in remote, remote
            lossy = group[0]
            loss = lose_every_20th_video_packet_once(lossy)
            recovered = loss.recovered
            for v in group:
                await v.wait_frames(30, timeout=90)
            for v in group[1:]:
                assert_in_order(v.counters)
            async with http_client() as http:
                stats = (await http.get(f"{cluster.relay.url}/api/stats")).json()
            assert stats["streams"][0]["video_keyframe_requests"] >= 1
            assert stats["streams"][0]["video_native_packets_sent"] > 0
            assert stats["udp_sockets"] == 2  # the mux + the upstream pull
            assert len(recovered) >= 1 and stats["streams"][0]["video_nacks_served"] >= 1
            await asyncio.gather(*(v.stop() for v in group[: count // 2]))
            deadline = time.monotonic() + 20
            while True:
                async with http_client() as http:
                    stats = (await http.get(f"{cluster.relay.url}/api/stats")).json()
                if stats["viewers"] == count - count // 2:
                    break
                assert time.monotonic() < deadline, stats
                await asyncio.sleep(0.2)
            assert stats["udp_sockets"] == 2
            n = len(group[-1].counters)
            await group[-1].wait_frames(n + 10, timeout=30)
        finally:
            await asyncio.gather(*(v.stop() for v in group), return_exceptions=True)
            await publisher.stop()


def _free_udp_port_pair() -> int:
    """A port N with N and N + 1 both free (for a two-worker relay)."""
    for _ in range(50):
        base = _free_udp_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
            try:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
            return base
    raise AssertionError("no two adjacent free UDP ports")


def _mux_series(text: str) -> dict[tuple[str, str | None], float]:
    """(series name, worker label) -> value of the lotcast_udp_mux_* series in /metrics."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("lotcast_udp_mux_"):
                out[(sample.name, sample.labels.get("worker"))] = sample.value
    return out


def _junk(port: int, count: int) -> None:
    """Datagrams no connection claims (not STUN, from an address no viewer has)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(count):
            s.sendto(b"\x80\x60junk" + bytes([i]), ("127.0.0.1", port))


async def _metrics_until(url: str, want: dict[tuple[str, str | None], float]) -> dict[
        tuple[str, str | None], float]:
    deadline = time.monotonic() + 20
    async with http_client() as http:
        while True:
            response = await http.get(f"{url}/metrics")
            assert response.status_code == 200
            series = _mux_series(response.text)
            if all(series.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
                return series
            await asyncio.sleep(0.2)


@pytest.mark.timeout(120)
async def test_the_relay_opens_its_port_at_start_and_counts_drops(
        redis_server: RedisServer) -> None:
    port = _free_udp_port()
    with running_cluster(redis_server, relay_args=["--udp-port", str(port)]) as cluster:
        relay = cluster.relay
        # open before any viewer, as the only UDP socket of the relay
        ports = [c.laddr.port for c in psutil.Process(relay.pid).net_connections(kind="udp")]
        assert ports == [port]
        _junk(port, 5)
        want = {("lotcast_udp_mux_dropped_datagrams_total", None): 5.0,
                ("lotcast_udp_mux_port", None): float(port),
                ("lotcast_udp_mux_connections", None): 0.0}
        series = await _metrics_until(relay.url, want)
        assert {k: series.get(k) for k in want} == want, series


@pytest.mark.timeout(150)
async def test_each_worker_opens_its_port_at_start_and_metrics_say_whose_drops(
        redis_server: RedisServer) -> None:
    base = _free_udp_port_pair()
    args = ["--workers", "2", "--udp-port", str(base)]
    with running_cluster(redis_server, relay_args=args) as cluster:
        relay = cluster.relay
        pids = relay.info["worker_pids"]
        assert len(pids) == 2
        opened = sorted(c.laddr.port for pid in pids
                        for c in psutil.Process(pid).net_connections(kind="udp"))
        assert opened == [base, base + 1]
        _junk(base, 3)
        _junk(base + 1, 7)
        want = {("lotcast_udp_mux_dropped_datagrams_total", "0"): 3.0,
                ("lotcast_udp_mux_dropped_datagrams_total", "1"): 7.0,
                ("lotcast_udp_mux_port", "0"): float(base),
                ("lotcast_udp_mux_port", "1"): float(base + 1)}
        series = await _metrics_until(relay.url, want)
        assert {k: series.get(k) for k in want} == want, series


@pytest.mark.timeout(120)
async def test_a_taken_port_fails_the_relay_start(redis_server: RedisServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as failed, \
                running_cluster(redis_server, relay_args=["--udp-port", str(port)]):
            pass
    message = str(failed.value)
    assert "relay exited before ready" in message and "Address already in use" in message, message
