"""The media path against real-world publishers: 1400-byte packets, RSA certificates in either
DTLS role, send errors that must not cost a viewer, and an upstream whose video stops."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import urljoin

import aiortc.codecs.vpx
import httpx
import pylibsrtp
import pytest
from aiortc import RTCPeerConnection, RTCRtpCodecParameters, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack
from aiortc.rtcdtlstransport import RTCCertificate, generate_certificate
from aiortc.rtp import RtpPacket
from cryptography.hazmat.primitives.asymmetric import rsa
from media_support import Cluster, Publisher, Viewer, host_token, http_client, running_cluster

from lotcast.media.aiortc_hooks import (
    MAX_SRTP_PACKET,
    _widen_srtp_session,
    drop_incoming_rtp,
    fast_protect,
    install_transport_fixes,
    negotiated_codecs,
    new_peer_connection,
)
from lotcast.media.endpoints import SessionTable
from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.media.stream import StreamRouter
from lotcast.media.testsource import CounterVideoTrack
from lotcast.media.upstream import STALL_TIMEOUT, WATCH_INTERVAL, stall_wait, watched_kind
from lotcast.redis_server import RedisServer
from relay.upstreams import RelayUpstreams

pytestmark = pytest.mark.timeout(120)

GSTREAMER_MTU = 1400  # webrtcbin's payloaders, and many hardware encoders


@pytest.fixture
def large_vp8_packets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the test publisher's VP8 packetizer fill packets as GStreamer does (aiortc's own
    default is 1300 bytes, which hid the bug). The test's own aiortc needs the wider SRTP
    buffers to send them; the nodes under test are separate processes with their own."""
    install_transport_fixes()
    monkeypatch.setattr(aiortc.codecs.vpx, "PACKET_MAX", GSTREAMER_MTU)


async def _stats(url: str) -> dict[str, Any]:
    async with http_client() as http:
        response = await http.get(f"{url}/api/stats")
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    return data


def _stream_stats(stats: dict[str, Any], stream: str) -> dict[str, Any]:
    for entry in stats["streams"]:
        if entry["id"] == stream:
            return dict(entry)
    raise AssertionError(f"stream {stream!r} not on the node: {stats['streams']}")


async def test_large_packets_reach_every_viewer_through_a_relay(
    redis_server: RedisServer, large_vp8_packets: None,
) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "big", host_token())
        publisher.video = CounterVideoTrack(30, width=640, height=480, noisy=True)  # real bits
        await publisher.start()
        viewer = Viewer(cluster.relay.url, "big")
        try:
            await viewer.start()
            await viewer.wait_frames(30, timeout=30)
            origin = _stream_stats(await _stats(cluster.origin.url), "big")
            relay = _stream_stats(await _stats(cluster.relay.url), "big")
            # packets over pylibsrtp's 1356-byte protect limit went through both hops
            assert origin["video_largest_packet"] > 1356, origin
            assert relay["video_largest_packet"] > 1356, relay
            assert origin["video_send_errors"] == 0 and relay["video_send_errors"] == 0
        finally:
            await viewer.stop()
            await publisher.stop()


def _srtp_pair() -> tuple[Any, Any]:
    key = bytes(range(30))
    tx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
    rx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))
    _widen_srtp_session(tx)
    _widen_srtp_session(rx)
    return tx, rx


@pytest.mark.parametrize("size", [200, 1356, 1357, GSTREAMER_MTU, 1500, 4000, MAX_SRTP_PACKET - 16])
def test_widened_srtp_sessions_protect_and_unprotect_every_accepted_size(size: int) -> None:
    tx, rx = _srtp_pair()
    packet = RtpPacket(payload_type=96, sequence_number=size, timestamp=9, ssrc=1234,
                       payload=bytes(size - 12)).serialize()
    protected = fast_protect(tx)(packet)
    assert rx.unprotect(protected) == packet
    rtcp = bytes([0x81, 200, ((size // 4) - 1) >> 8 & 0xFF, ((size // 4) - 1) & 0xFF]) + bytes(
        (size // 4) * 4 - 4)
    assert rx.unprotect_rtcp(tx.protect_rtcp(rtcp)) == rtcp


def test_a_datagram_over_the_limit_is_a_dropped_packet_not_an_error_that_ends_the_transport() -> None:
    tx, rx = _srtp_pair()
    with pytest.raises(pylibsrtp.Error):  # aiortc's receive loop logs and drops on this
        rx.unprotect(bytes([0x80, 96]) + bytes(MAX_SRTP_PACKET + 1))
    with pytest.raises(pylibsrtp.Error):
        rx.unprotect_rtcp(bytes([0x81, 200]) + bytes(MAX_SRTP_PACKET + 1))
    packet = RtpPacket(payload_type=96, sequence_number=1, ssrc=5, payload=b"ok").serialize()
    assert rx.unprotect(fast_protect(tx)(packet)) == packet  # and the session goes on


class FaultySender:
    """Stands in for PacketSender: collects what a viewer would get, fails on demand."""

    def __init__(self) -> None:
        self.delivered: list[bytes] = []
        self.refuse_over: int | None = None
        self.transport_alive = True
        self.addr = ("127.0.0.1", 9)

    def protect(self, data: bytes) -> bytes:
        if self.refuse_over is not None and len(data) > self.refuse_over:
            raise ValueError("packet is too long")
        return data

    def sendto(self, data: bytes, addr: Any) -> None:
        self.delivered.append(data)

    def send(self, data: bytes) -> None:
        self.sendto(self.protect(data), self.addr)

    def alive(self) -> bool:
        return self.transport_alive


async def _feed(forwarder: TrackForwarder, sizes: list[int], first_seq: int) -> None:
    for offset, size in enumerate(sizes):
        forwarder.on_source_packet(RtpPacket(payload_type=111, sequence_number=first_seq + offset,
                                             timestamp=960 * offset, ssrc=77, payload=bytes(size)))
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_failed_send_skips_one_packet_and_keeps_the_viewer() -> None:
    codec = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    forwarder = TrackForwarder("audio", codec, output_ssrc=99)
    healthy, faulty = FaultySender(), FaultySender()
    faulty.refuse_over = 500
    sinks = [ForwardSink(sender, SimpleNamespace(), 111)  # type: ignore[arg-type]
             for sender in (healthy, faulty)]
    for sink in sinks:
        forwarder.add_sink(sink)
    await _feed(forwarder, [100, 900, 100, 100], first_seq=1)
    assert forwarder.sink_count == 2, "a per-packet error dropped a viewer"
    assert forwarder.send_errors == 1
    assert len(healthy.delivered) == 4
    assert len(faulty.delivered) == 3  # only the refused packet is missing
    forwarder.retransmit(sinks[1], [2, 3])  # a NACK for the refused one and a good one
    assert len(faulty.delivered) == 4 and forwarder.sink_count == 2

    faulty.transport_alive = False  # now the transport itself is gone: that does drop it
    await _feed(forwarder, [900], first_seq=5)
    await asyncio.sleep(0.01)
    assert forwarder.sink_count == 1
    await _feed(forwarder, [100], first_seq=6)
    assert len(healthy.delivered) == 6
    forwarder.close()


def test_the_stall_watchdog_notices_within_two_seconds_and_backs_off() -> None:
    assert stall_wait(0) + WATCH_INTERVAL <= 2.0
    assert stall_wait(0) == STALL_TIMEOUT
    waits = [stall_wait(n) for n in range(10)]
    assert waits == sorted(waits) and waits[-1] == 30.0  # a paused source is not re-pulled hot
    assert watched_kind({"audio", "video"}) == "video"
    assert watched_kind({"audio"}) == "audio"
    assert watched_kind(set()) is None


async def test_relay_pulls_again_when_upstream_video_stops_while_audio_flows(
    redis_server: RedisServer,
) -> None:
    with running_cluster(redis_server, relays=0) as cluster:
        publisher = Publisher(cluster.origin.url, "stall", host_token())
        await publisher.start()
        router = StreamRouter(grace=5.0)
        sessions = SessionTable(session_timeout=30.0)
        upstreams = RelayUpstreams(router, sessions, cluster.origin.url, retry_window=10.0)
        try:
            stream = await upstreams.acquire("stall")
            await _until(lambda: "video" in stream.tracks and stream.tracks["video"].packets_in > 30,
                         20, "video never arrived over the pull")
            first = upstreams.pulls()[0]
            pc = first.peer_connection
            assert pc is not None
            video = next(t for t in pc.getTransceivers() if t.kind == "video")
            video_pts = {c.payloadType for c in video._codecs}
            # the fault: the origin's video to this pull stops (as when the origin dropped the
            # pull's sink), while its audio and RTCP keep coming
            drop_incoming_rtp(video.receiver.transport, lambda data: data[1] & 0x7F in video_pts)
            audio_before = stream.tracks["audio"].packets_in
            cut = time.monotonic()
            await _until(lambda: first.stalls >= 1, 15, "the relay never noticed the video stop")
            noticed = time.monotonic() - cut
            assert stream.tracks["audio"].packets_in > audio_before, "audio stopped too"
            await _until(lambda: upstreams.stall_repulls >= 1, 15, "no new pull")
            replacement = upstreams.pulls()[0]
            assert replacement is not first and replacement.peer_connection is not pc
            video_after = stream.tracks["video"].packets_in
            await _until(lambda: stream.tracks["video"].packets_in > video_after + 30, 15,
                         "video did not come back on the new pull")
            print(f"stall noticed after {noticed:.2f}s (target 2 s)")
            # the replaced pull's WHEP session on the origin is gone (DELETEd), not leaked
            await _until_async(lambda: _origin_sessions(cluster), 1, 10)
        finally:
            await upstreams.close()
            await sessions.close()
            router.close()
            await publisher.stop()


async def _origin_sessions(cluster: Cluster) -> int:
    stats = await _stats(cluster.origin.url)
    return int(stats["viewers"])  # the relay's pulls are the origin's WHEP viewers


async def _until(check: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.05)


async def _until_async(read: Any, want: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    value = await read()
    while value != want:
        assert time.monotonic() < deadline, f"got {value}, want {want}"
        await asyncio.sleep(0.1)
        value = await read()


# --- DTLS: RSA and ECDSA peers, in both roles, on every endpoint -------------------------------


def _peer_with(certificate: str) -> RTCPeerConnection:
    pc = new_peer_connection()  # our cipher list: an RSA server must be able to pick a suite
    if certificate == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = RTCCertificate(key=key, cert=generate_certificate(key))  # type: ignore[arg-type]
        pc._RTCPeerConnection__certificates = [cert]  # type: ignore[attr-defined]
    return pc


def _set_offer_role(sdp: str, our_node_is: str) -> str:
    """Rewrite the offer's DTLS role so the node under test ends up as ``our_node_is``."""
    setup = {"server": "active", "client": "passive", "either": "actpass"}[our_node_is]
    return sdp.replace("a=setup:actpass", f"a=setup:{setup}")


class _Drain:
    def __init__(self) -> None:
        self.frames = 0
        self.tasks: list[asyncio.Task[None]] = []

    def consume(self, track: MediaStreamTrack) -> None:
        async def run() -> None:
            with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
                while True:
                    await track.recv()
                    self.frames += 1

        self.tasks.append(asyncio.ensure_future(run()))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture(scope="module")
def dtls_cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    with running_cluster(redis_server) as cluster:
        yield cluster


async def _negotiate(pc: RTCPeerConnection, url: str, role: str, token: str | None) -> tuple[int, str]:
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with http_client() as http:
        response = await http.post(url, content=_set_offer_role(pc.localDescription.sdp, role),
                                   headers=headers, follow_redirects=True)
    assert response.status_code == 201, (response.status_code, response.text)
    answer = response.text
    expected = {"server": "a=setup:passive", "client": "a=setup:active", "either": "a=setup:"}[role]
    assert expected in answer, answer
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return response.status_code, urljoin(str(response.url), response.headers["Location"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("certificate", ["rsa", "ecdsa"])
@pytest.mark.parametrize("node_role", ["client", "server"])
@pytest.mark.parametrize("endpoint", ["whip", "whep-origin", "whep-relay"])
async def test_rsa_and_ecdsa_peers_connect_in_either_dtls_role(
    dtls_cluster: Cluster, certificate: str, node_role: str, endpoint: str,
) -> None:
    cluster = dtls_cluster
    stream = f"dtls-{certificate}-{node_role}"
    feeder: Publisher | None = None
    pc = _peer_with(certificate)
    drain = _Drain()
    resource: str | None = None
    try:
        if endpoint == "whip":
            pc.addTrack(AudioStreamTrack())
            pc.addTrack(CounterVideoTrack(30))
            _, resource = await _negotiate(pc, f"{cluster.origin.url}/whip/{stream}-pub", node_role,
                                           host_token())
            await _until(lambda: pc.connectionState == "connected", 20,
                         f"DTLS/ICE never connected: {pc.connectionState}")

            async def ingested() -> int:
                stats = await _stats(cluster.origin.url)
                entry = next((s for s in stats["streams"] if s["id"] == f"{stream}-pub"), None)
                return 1 if entry is not None and entry.get("video_packets_in", 0) > 20 else 0

            await _until_async(ingested, 1, 20)
        else:
            feeder = Publisher(cluster.origin.url, f"{stream}-{endpoint}", host_token())
            await feeder.start()
            base = cluster.origin.url if endpoint == "whep-origin" else cluster.relay.url
            pc.addTransceiver("audio", direction="recvonly")
            pc.addTransceiver("video", direction="recvonly")
            pc.on("track", drain.consume)
            _, resource = await _negotiate(pc, f"{base}/whep/{stream}-{endpoint}", node_role, None)
            await _until(lambda: drain.frames > 20, 30,
                         f"no media decoded (connection {pc.connectionState})")
        assert pc.sctp is None
        assert negotiated_codecs(pc.getTransceivers()[0])
    finally:
        await drain.close()
        if resource is not None:
            async with http_client() as http:
                with contextlib.suppress(httpx.HTTPError):
                    await http.delete(resource, headers={"Authorization": f"Bearer {host_token()}"})
        await pc.close()
        if feeder is not None:
            await feeder.stop()


async def test_a_pull_no_viewer_ever_used_is_released_after_the_linger(
    redis_server: RedisServer,
) -> None:
    """A WHEP POST on a relay can start a pull and then fail to negotiate (codec mismatch, a
    bad offer): no viewer session ever exists, and the pull must still be let go."""
    with running_cluster(redis_server, relays=0) as cluster:
        publisher = Publisher(cluster.origin.url, "unused", host_token())
        await publisher.start()
        router = StreamRouter(grace=5.0)
        sessions = SessionTable(session_timeout=30.0)
        upstreams = RelayUpstreams(router, sessions, cluster.origin.url, retry_window=5.0,
                                   linger=0.5)
        try:
            await upstreams.acquire("unused")
            assert len(upstreams.pulls()) == 1
            await _until_async(lambda: _origin_sessions(cluster), 1, 10)
            await _until(lambda: not upstreams.pulls() and router.get("unused") is None, 10,
                         "the unused pull was never released")
            await _until_async(lambda: _origin_sessions(cluster), 0, 10)  # DELETEd upstream
        finally:
            await upstreams.close()
            await sessions.close()
            router.close()
            await publisher.stop()
