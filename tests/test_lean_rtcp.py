"""Lean RTCP on the forwarding path (issue 8 item 4): our parser against aiortc's serializer, the
one-timer Sender Report clock, and real viewers of a relay on both paths (lean, and aiortc's own
with LOTCAST_LEAN_RTCP=0): Sender Reports reach them (lip-sync stats), NACKs and PLIs are
served, receiver reports are read."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from typing import Any

import pylibsrtp
import pytest
from aioice import stun
from aiortc.rtp import (
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPacket,
    RtcpPsfbPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSdesPacket,
    RtcpSrPacket,
    pack_remb_fci,
)
from media_support import (
    Publisher,
    Viewer,
    host_token,
    http_client,
    lose_every_20th_video_packet_once,
    running_cluster,
)

from lotcast.media import aiortc_hooks
from lotcast.media.aiortc_hooks import (
    MAX_SRTP_PACKET,
    SilentTrack,
    _widen_srtp_session,
    answer_consent_checks_fast,
    fast_unprotect_rtcp,
    new_peer_connection,
    observe_rtcp,
    request_keyframe,
)
from lotcast.media.rtcp import (
    RtcpError,
    SenderInfo,
    ntp_middle,
    parse_feedback,
    sender_reports,
)
from lotcast.media.stun_fast import binding_success
from lotcast.media.viewer_rtcp import ReportClock, ViewerRtcp, report_clock
from lotcast.redis_server import RedisServer

# --- the parser, checked against aiortc's own serializer -------------------------------------


def _rr(*blocks: RtcpReceiverInfo, ssrc: int = 99) -> bytes:
    return bytes(RtcpRrPacket(ssrc=ssrc, reports=list(blocks)))


def _block(ssrc: int, lost: int = 3, fraction: int = 17, lsr: int = 0x12345678,
           dlsr: int = 65536) -> RtcpReceiverInfo:
    return RtcpReceiverInfo(ssrc=ssrc, fraction_lost=fraction, packets_lost=lost,
                            highest_sequence=70000, jitter=42, lsr=lsr, dlsr=dlsr)


def test_receiver_report_blocks_are_read() -> None:
    feedback = parse_feedback(_rr(_block(1111), _block(2222, lost=-2, fraction=0)))
    assert [(b.ssrc, b.fraction_lost, b.packets_lost, b.highest_sequence, b.jitter, b.lsr,
             b.dlsr) for b in feedback.reports] == [
        (1111, 17, 3, 70000, 42, 0x12345678, 65536),
        (2222, 0, -2, 70000, 42, 0x12345678, 65536),
    ]
    assert feedback.nacks == [] and feedback.keyframe_requests == [] and feedback.remb is None


def test_a_compound_of_every_type_we_act_on() -> None:
    nack = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=99, media_ssrc=2222)
    nack.lost = [100, 101, 117, 200, 65535]
    pli = RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=99, media_ssrc=2222)
    remb = RtcpPsfbPacket(fmt=15, ssrc=99, media_ssrc=0, fci=pack_remb_fci(1_234_560, [2222, 1111]))
    fir = RtcpPsfbPacket(fmt=4, ssrc=99, media_ssrc=0, fci=struct.pack("!IB3x", 2222, 7))
    sdes = RtcpSdesPacket()  # skipped by its length
    data = b"".join([_rr(_block(1111)), bytes(sdes), bytes(nack), bytes(pli), bytes(remb),
                     bytes(fir)])
    feedback = parse_feedback(data)
    assert [b.ssrc for b in feedback.reports] == [1111]
    assert len(feedback.nacks) == 1
    media_ssrc, lost = feedback.nacks[0]
    assert media_ssrc == 2222 and sorted(lost) == sorted(nack.lost)
    assert feedback.keyframe_requests == [2222, 2222]  # the PLI, then the FIR's FCI entry
    assert feedback.remb is not None
    bitrate, ssrcs = feedback.remb
    assert ssrcs == (2222, 1111)
    assert abs(bitrate - 1_234_560) <= 1_234_560 >> 17  # REMB's 18-bit mantissa


@pytest.mark.parametrize("data", [
    b"", b"\x80\xc9", b"\x40\xc9\x00\x01" + bytes(4),  # empty, truncated, version 1
    b"\x81\xc9\x00\x08" + bytes(28),  # length past the datagram
    b"\x82\xc9\x00\x07" + bytes(28),  # two report blocks announced, one present
    b"\x81\xcd\x00\x01" + bytes(4),  # feedback shorter than its header
])
def test_malformed_compounds_are_refused(data: bytes) -> None:
    with pytest.raises(RtcpError):
        parse_feedback(data)


def test_sender_reports_are_one_compound_aiortc_reads() -> None:
    infos = [SenderInfo(1111, 0xE1234567_89ABCDEF, 48000, 10, 1000),
             SenderInfo(2222, 0xE1234567_89ABCDEF, 90000, 20, 20000)]
    data = sender_reports(infos, b"cname-of-the-viewer-session")
    packets = RtcpPacket.parse(data)
    srs = [p for p in packets if isinstance(p, RtcpSrPacket)]
    assert [(p.ssrc, p.sender_info.ntp_timestamp, p.sender_info.rtp_timestamp,
             p.sender_info.packet_count, p.sender_info.octet_count) for p in srs] == [
        (1111, 0xE1234567_89ABCDEF, 48000, 10, 1000), (2222, 0xE1234567_89ABCDEF, 90000, 20, 20000)]
    sdes = [c for p in packets if isinstance(p, RtcpSdesPacket) for c in p.chunks]
    assert [(c.ssrc, c.items) for c in sdes] == [
        (1111, [(1, b"cname-of-the-viewer-session")]), (2222, [(1, b"cname-of-the-viewer-session")])]
    assert ntp_middle(0xE1234567_89ABCDEF) == 0x456789AB


def test_fast_srtcp_unprotect_matches_pylibsrtp() -> None:
    key = os.urandom(30)
    profile = pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80
    tx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                                            srtp_profile=profile))
    rx_slow = pylibsrtp.Session(pylibsrtp.Policy(
        key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=profile))
    rx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
                                            srtp_profile=profile))
    _widen_srtp_session(rx)
    unprotect = fast_unprotect_rtcp(rx)
    for i in range(20):
        plain = _rr(_block(1000 + i), _block(2000 + i), ssrc=99)
        protected = tx.protect_rtcp(plain)
        assert unprotect(protected) == plain == rx_slow.unprotect_rtcp(protected)
    forged = tx.protect_rtcp(_rr(_block(7)))
    forged = forged[:10] + bytes([forged[10] ^ 1]) + forged[11:]
    with pytest.raises(pylibsrtp.Error):
        unprotect(forged)
    with pytest.raises(pylibsrtp.Error):
        unprotect(bytes(MAX_SRTP_PACKET + 1))


@pytest.mark.parametrize("addr", [("127.0.0.1", 50000), ("10.1.2.3", 1), ("::1", 65535),
                                  ("2001:db8::7", 3478)])
def test_binding_success_is_the_response_aioice_builds(addr: tuple[str, int]) -> None:
    for _ in range(5):
        transaction_id = os.urandom(12)
        password = os.urandom(16).hex().encode()
        expected = stun.Message(message_method=stun.Method.BINDING,
                                message_class=stun.Class.RESPONSE, transaction_id=transaction_id)
        expected.attributes["XOR-MAPPED-ADDRESS"] = addr
        expected.add_message_integrity(password)
        ours = binding_success(transaction_id, addr, password)
        assert ours == bytes(expected)
        parsed = stun.parse_message(ours)  # checks the fingerprint
        assert parsed.attributes["XOR-MAPPED-ADDRESS"] == addr
        assert parsed.check_message_integrity(password)


@pytest.mark.timeout(60)
async def test_consent_checks_on_the_nominated_pair_are_answered_fast() -> None:
    server, viewer = new_peer_connection(), new_peer_connection()
    try:
        server.addTransceiver(SilentTrack("video"), direction="sendonly")
        await server.setLocalDescription(await server.createOffer())
        await viewer.setRemoteDescription(server.localDescription)
        await viewer.setLocalDescription(await viewer.createAnswer())
        await server.setRemoteDescription(viewer.localDescription)
        deadline = time.monotonic() + 30
        while server.connectionState != "connected" or viewer.connectionState != "connected":
            assert time.monotonic() < deadline, (server.connectionState, viewer.connectionState)
            await asyncio.sleep(0.05)
        dtls = server.getTransceivers()[0].sender.transport
        assert answer_consent_checks_fast(dtls)
        server_ice = dtls.transport._connection
        ice = viewer.getTransceivers()[0].receiver.transport.transport._connection
        pair = ice._nominated[1]
        # the viewer's own consent loop would add checks of its own: this test sends them
        assert ice._query_consent_task is not None
        ice._query_consent_task.cancel()
        before = aiortc_hooks.consent_answers_fast
        for _ in range(3):  # what the viewer's consent loop sends every ~5 s
            request = ice.build_request(pair, nominate=False)
            response, _ = await pair.protocol.request(
                request, pair.remote_addr, integrity_key=ice.remote_password.encode(),
                retransmissions=0)
            assert response.message_class == stun.Class.RESPONSE
            assert response.check_message_integrity(server_ice.local_password.encode())
            assert response.attributes["XOR-MAPPED-ADDRESS"] == (pair.local_candidate.host,
                                                                 pair.local_candidate.port)
        assert aiortc_hooks.consent_answers_fast == before + 3
        # a check that would nominate, or a wrong password, still goes to aioice
        nominating = ice.build_request(pair, nominate=False)
        nominating.attributes["USE-CANDIDATE"] = None
        await pair.protocol.request(nominating, pair.remote_addr,
                                    integrity_key=ice.remote_password.encode(), retransmissions=0)
        forged = ice.build_request(pair, nominate=False)
        forged.add_message_integrity(b"not-the-password")
        with pytest.raises(stun.TransactionFailed):
            await pair.protocol.request(forged, pair.remote_addr, retransmissions=0)
        assert aiortc_hooks.consent_answers_fast == before + 3
    finally:
        await viewer.close()
        await server.close()


# --- the clock: every viewer's reports from one timer ----------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.report: tuple[int, int, int, int] | None = (1 << 32, 1000, 5, 500)
        self.closed = False


class _Forwarder:
    def __init__(self, ssrc: int) -> None:
        self.output_ssrc = ssrc
        self.nacked: list[list[int]] = []
        self.keyframe_requests = 0

    def retransmit(self, sink: Any, seqs: list[int]) -> None:
        self.nacked.append(seqs)

    def request_keyframe_for(self, sink: Any) -> None:
        self.keyframe_requests += 1


@pytest.mark.timeout(60)
async def test_one_clock_sends_every_viewers_reports() -> None:
    sent: dict[int, list[bytes]] = {i: [] for i in range(60)}
    viewers = []
    for i in range(60):
        viewer = ViewerRtcp(on_alive=lambda: None)
        viewer.add_track(_Forwarder(1000 + i), _Sink())  # type: ignore[arg-type]
        viewer.add_track(_Forwarder(5000 + i), _Sink())  # type: ignore[arg-type]
        viewer.start(sent[i].append, "cname")
        viewers.append(viewer)
    clock = report_clock()
    assert clock.viewers == 60
    before = len(asyncio.all_tasks())
    deadline = time.monotonic() + 30
    while any(len(s) < 2 for s in sent.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert all(len(s) >= 2 for s in sent.values()), {i: len(s) for i, s in sent.items()}
    assert len(asyncio.all_tasks()) == before  # no task per viewer
    for i, datagrams in sent.items():
        srs = [p for p in RtcpPacket.parse(datagrams[0]) if isinstance(p, RtcpSrPacket)]
        assert sorted(p.ssrc for p in srs) == [1000 + i, 5000 + i]  # both tracks, one datagram
    for viewer in viewers:
        viewer.stop()
    assert clock.viewers == 0
    counts = {i: len(s) for i, s in sent.items()}
    await asyncio.sleep(2.0)
    assert {i: len(s) for i, s in sent.items()} == counts  # stopped viewers get nothing more


async def test_feedback_reaches_the_track_it_names() -> None:
    alive: list[int] = []
    viewer = ViewerRtcp(on_alive=lambda: alive.append(1))
    audio, video = _Forwarder(1111), _Forwarder(2222)
    viewer.add_track(audio, _Sink())  # type: ignore[arg-type]
    viewer.add_track(video, _Sink())  # type: ignore[arg-type]
    viewer.start(lambda data: None, None)
    viewer.send_report()  # remembers each SR's LSR and send time, for the RTT
    lsr = ntp_middle(1 << 32)
    nack = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=99, media_ssrc=2222)
    nack.lost = [7, 8]
    pli = RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=99, media_ssrc=2222)
    other = RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=99, media_ssrc=3333)  # not ours: ignored
    viewer.on_rtcp(_rr(_block(1111, lost=4, fraction=64, lsr=lsr, dlsr=0)) + bytes(nack)
                   + bytes(pli) + bytes(other))
    viewer.on_rtcp(b"\x80\xc9")  # malformed: counted, still a sign of life
    assert alive == [1, 1] and viewer.malformed == 1
    assert video.nacked == [[7, 8]] and video.keyframe_requests == 1
    assert audio.nacked == [] and audio.keyframe_requests == 0
    track = viewer.tracks[1111]
    assert (track.receiver_reports, track.packets_lost, track.fraction_lost) == (1, 4, 64)
    assert track.rtt is not None and 0 <= track.rtt < 5
    assert viewer.tracks[2222].receiver_reports == 0
    viewer.stop()


def test_clock_without_viewers_has_no_timer() -> None:
    loop = asyncio.new_event_loop()
    try:
        clock = ReportClock(loop)
        viewer = ViewerRtcp(on_alive=lambda: None)
        clock.add(viewer)
        assert clock._handle is not None
        clock.remove(viewer)
        assert clock._handle is None and clock.viewers == 0
    finally:
        loop.close()


# --- real viewers of a real relay, lean and old path -----------------------------------------


def _sr_datagrams(datagrams: list[bytes]) -> list[list[RtcpSrPacket]]:
    out = []
    for data in datagrams:
        srs = [p for p in RtcpPacket.parse(data) if isinstance(p, RtcpSrPacket)]
        if srs:
            out.append(srs)
    return out


async def _stream_counter(relay_url: str, stream: str, name: str) -> int:
    async with http_client() as http:
        response = await http.get(f"{relay_url}/api/stats")
    assert response.status_code == 200
    entry = next(s for s in response.json()["streams"] if s["id"] == stream)
    return int(entry[name])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("lean", ["1", "0"], ids=["lean", "aiortc"])
async def test_viewers_get_reports_and_feedback_is_served(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, lean: str) -> None:
    monkeypatch.setenv("LOTCAST_LEAN_RTCP", lean)
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "rtcp", host_token())
        await publisher.start()
        viewer = Viewer(cluster.relay.url, "rtcp")
        await viewer.start()
        received: list[bytes] = []
        dtls = viewer.pc.getTransceivers()[0].receiver.transport
        observe_rtcp(dtls, received.append)
        loss = lose_every_20th_video_packet_once(viewer)
        try:
            await viewer.wait_frames(60, timeout=40)
            # Sender Reports, mapped: the viewer's receivers show them as remote-outbound stats
            deadline = time.monotonic() + 20
            kinds: dict[str, Any] = {}
            while (len(kinds) < 2 or len(_sr_datagrams(received)) < 4) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.3)
                for transceiver in viewer.pc.getTransceivers():
                    stats = await transceiver.receiver.getStats()
                    for s in stats.values():
                        if s.type == "remote-outbound-rtp" and s.packetsSent > 0:
                            kinds[transceiver.kind] = s
            assert set(kinds) == {"audio", "video"}, kinds
            for report in kinds.values():
                assert abs(report.remoteTimestamp.timestamp() - time.time()) < 30
            srs = _sr_datagrams(received)
            assert len(srs) >= 4
            ssrc_sets = {frozenset(p.ssrc for p in group) for group in srs}
            if lean == "1":  # one compound per viewer, both tracks' reports in it (once both
                # tracks have had a packet: the first reports may carry audio's alone)
                assert len(srs[-1]) == 2 and max(len(g) for g in srs) == 2, [len(g) for g in srs]
            else:  # aiortc: one datagram per sender
                assert all(len(group) == 1 for group in srs), [len(g) for g in srs]
                assert len(ssrc_sets) == 2
            # NACKs answered from the relay's history
            assert len(loss.dropped) >= 3
            assert len(loss.recovered) >= len(loss.dropped) - 2
            # each recovered packet was resent: on its NACK, or in the key frame the viewer
            # started on, sent again on its PLI (forwarder.request_keyframe_for)
            served = await _stream_counter(cluster.relay.url, "rtcp", "video_nacks_served")
            resent = await _stream_counter(cluster.relay.url, "rtcp",
                                           "video_keyframe_resent_packets")
            assert served + resent >= len(loss.recovered), (served, resent, loss)
            # a PLI from the viewer becomes a key-frame request upstream
            video = next(t for t in viewer.pc.getTransceivers() if t.kind == "video")
            video_ssrc = kinds["video"].ssrc
            before = await _stream_counter(cluster.relay.url, "rtcp", "video_keyframe_requests")
            deadline = time.monotonic() + 15
            after = before
            while after <= before and time.monotonic() < deadline:
                request_keyframe(video.receiver, video_ssrc)
                await asyncio.sleep(0.6)
                after = await _stream_counter(cluster.relay.url, "rtcp", "video_keyframe_requests")
            assert after > before
        finally:
            await viewer.stop()
            await publisher.stop()
