"""Simulcast parts without sockets: the offer's a=simulcast/a=rid parse and its 422s, the
answer's receive lines, the rid demux (RTX table, SSRCs learned once the extensions stop), the
per-viewer seq/timestamp shift and the VP8 key frame size, and the forwarder's layer switches
(at a frame end of the old layer, numbering on from its newest packet, NACKs across a switch,
a new choice cancelling the one under way) (issue 11)."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiortc import RTCRtpCodecParameters
from aiortc.rtp import HeaderExtensions, RtpPacket

from lotcast.media import forwarder as forwarder_module
from lotcast.media.aiortc_hooks import SimulcastDemux
from lotcast.media.forwarder import (
    HISTORY_SIZE,
    MAX_SEQ_JUMP,
    SWITCH_WAIT_FRAMES,
    ForwardSink,
    TrackForwarder,
)
from lotcast.media.rtp import build_packet, shifted, vp8_keyframe_size
from lotcast.media.sdp import SdpError, answer_simulcast, parse_simulcast

VIDEO = (
    "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\na=rtpmap:111 opus/48000/2\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendonly\r\na=rtpmap:96 VP8/90000\r\n"
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n"
)
RID_EXT = "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n"
RRID_EXT = "a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id\r\n"
RIDS = "a=rid:h send max-width=1280;max-height=720\r\na=rid:m send\r\na=rid:l send\r\n"


def test_offer_simulcast_parsed_top_first_with_ext_ids_and_sizes() -> None:
    offer = parse_simulcast(VIDEO + RID_EXT + RRID_EXT + RIDS + "a=simulcast:send h;m;~l\r\n")
    assert offer is not None
    assert offer.rids == ("h", "m", "l")
    assert (offer.rid_ext_id, offer.repaired_rid_ext_id) == (10, 11)
    assert offer.sizes == {"h": (1280, 720)}


def test_offer_without_simulcast_is_one_layer() -> None:
    assert parse_simulcast(VIDEO + RID_EXT) is None
    assert parse_simulcast(VIDEO.split("m=video")[0]) is None


@pytest.mark.parametrize(("extra", "reason"), [
    (RIDS + "a=simulcast:send h;m;l\r\n",
     "simulcast needs the urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"),
    (RID_EXT + "a=rid:h send\r\na=simulcast:send h;x\r\n", "simulcast names rid 'x' without 'a=rid:x send'"),
    (RID_EXT + RIDS + "a=simulcast:send h;h\r\n", "simulcast needs 1-4 distinct rids"),
    (RID_EXT + RIDS + "a=simulcast:recv h;m\r\n", "simulcast must be 'a=simulcast:send <rids>'"),
    (RID_EXT + "a=rid:h/1 send\r\na=simulcast:send h/1\r\n", "simulcast rid 'h/1' is not"),
])
def test_simulcast_the_broadcaster_cannot_receive_is_422(extra: str, reason: str) -> None:
    with pytest.raises(SdpError) as caught:
        parse_simulcast(VIDEO + extra)
    assert caught.value.status == 422
    assert str(caught.value.reason).startswith(reason), caught.value.reason


def test_answer_gets_rid_recv_and_simulcast_recv_in_its_video_section_only() -> None:
    offer = parse_simulcast(VIDEO + RID_EXT + RIDS + "a=simulcast:send h;m;l\r\n")
    assert offer is not None
    answer = answer_simulcast(VIDEO.replace("sendonly", "recvonly"), offer)
    audio, video = answer.split("m=video")
    assert "a=rid" not in audio and "a=simulcast" not in audio
    assert video.endswith("a=rid:h recv\r\na=rid:m recv\r\na=rid:l recv\r\n"
                          "a=simulcast:recv h;m;l\r\n"), video


def packet(ssrc: int, seq: int, rid: str | None = None, repaired: str | None = None) -> RtpPacket:
    p = RtpPacket(payload_type=96, sequence_number=seq, timestamp=seq * 3000, ssrc=ssrc)
    p.extensions = HeaderExtensions(rtp_stream_id=rid, repaired_rtp_stream_id=repaired)
    return p


def test_demux_learns_ssrcs_by_rid_and_fills_the_rtx_table() -> None:
    demux = SimulcastDemux(("h", "m", "l"))
    rtx: dict[int, int] = {}
    assert not demux.classify(packet(500, 1), rtx)  # no rid seen for it yet: dropped
    assert demux.unknown_dropped == 1
    assert demux.classify(packet(900, 1, repaired="m"), rtx)  # RTX before its media: kept
    assert rtx == {}
    assert demux.classify(packet(100, 1, rid="h"), rtx)
    assert demux.classify(packet(200, 1, rid="m"), rtx)
    assert rtx == {900: 200}
    assert demux.classify(packet(200, 2), rtx)  # the extensions stop once acknowledged
    assert demux.layer_of == {100: "h", 200: "m"}
    assert demux.classify(packet(201, 3, rid="m"), rtx)  # a new SSRC for m replaces the old
    assert demux.layer_of == {100: "h", 201: "m"} and demux.ssrc_of["m"] == 201
    assert rtx == {900: 201}


def test_shift_moves_seq_and_timestamp_with_wraparound_and_keeps_the_rest() -> None:
    data = build_packet(1, 96, 65530, 4294967000, 0xABCDEF01, b"payload")
    out = shifted(data, 100, 10, 1000)
    assert out[1] == 0x80 | 100
    assert int.from_bytes(out[2:4], "big") == 4
    assert int.from_bytes(out[4:8], "big") == (4294967000 + 1000) % (1 << 32)
    assert out[8:] == data[8:]


def test_vp8_key_frame_size_from_its_first_packet() -> None:
    # descriptor: X=1, S=1, PID 0; extension I=1 with a 15-bit picture id; then the key frame
    descriptor = bytes([0x90, 0x80, 0x81, 0x23])
    frame = bytes([0x50, 0x2A, 0x00, 0x9D, 0x01, 0x2A]) + (640).to_bytes(2, "little") \
        + (360 | 0x4000).to_bytes(2, "little")  # the top two bits are the scale, not the size
    assert vp8_keyframe_size(descriptor + frame + b"rest") == (640, 360)
    delta = bytes([0x51]) + frame[1:]  # P bit set: an inter frame
    assert vp8_keyframe_size(descriptor + delta) is None
    assert vp8_keyframe_size(bytes([0x10, 0x50, 0x2A, 0x00, 0x9D, 0x01])) is None  # cut short


# --- per-viewer layer switches in the forwarder (lotcast/media/forwarder.py) -----------------

class CapturingSender:
    """Stands in for a viewer's SRTP+socket pair: records what the forwarder sends it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.protect = lambda data: data
        self.sendto = lambda data, addr: self.sent.append(data)
        self.addr = ("127.0.0.1", 9)

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def alive(self) -> bool:
        return True


VP8_CODEC = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
PACKETS_PER_FRAME = {"h": 3, "m": 2, "l": 1}


class FakeLayer:
    """One simulcast layer's packets: VP8 payload descriptors (a key frame when asked), its
    own SSRC, sequence numbers and timestamps; the payload names layer, frame and packet."""

    def __init__(self, rid: str, ssrc: int, seq: int, ts: int) -> None:
        self.rid, self.ssrc, self.seq, self.ts = rid, ssrc, seq, ts
        self.frame = 0
        self.keyframe_wanted = True
        self.forwarder = TrackForwarder("video", VP8_CODEC, output_ssrc=77)
        self.forwarder.keyframe_requester = self.ask
        self.requests = 0

    def ask(self) -> bool:
        self.requests += 1
        self.keyframe_wanted = True
        return True

    def frame_packets(self) -> list[RtpPacket]:
        key, self.keyframe_wanted = self.keyframe_wanted, False
        count = PACKETS_PER_FRAME[self.rid]
        out = []
        for index in range(count):
            descriptor = bytes([0x10 if index == 0 else 0x00])
            header = bytes([0x00 if key else 0x01]) if index == 0 else b""
            tag = f"{self.rid}{self.frame}.{index}{'K' if key and index == 0 else ''}".encode()
            p = RtpPacket(payload_type=96, marker=int(index == count - 1),
                          sequence_number=self.seq, timestamp=self.ts, ssrc=self.ssrc)
            p.payload = descriptor + header + tag
            out.append(p)
            self.seq = (self.seq + 1) % (1 << 16)
        self.ts = (self.ts + 3000) % (1 << 32)
        self.frame += 1
        return out


def tag_of(data: bytes) -> str:
    payload = data[12:]
    return payload[2:].decode() if payload[0] & 0x10 else payload[1:].decode()


def seq_ts(data: bytes) -> tuple[int, int]:
    return (data[2] << 8) | data[3], int.from_bytes(data[4:8], "big")


async def feed(layer: FakeLayer, packets: list[RtpPacket]) -> None:
    for p in packets:
        layer.forwarder.on_source_packet(p)
        await asyncio.sleep(0)  # one packet per loop turn, as the receive path delivers them


def simulcast() -> tuple[dict[str, FakeLayer], ForwardSink, CapturingSender]:
    layers = {"h": FakeLayer("h", 1, 65500, 4294960000), "m": FakeLayer("m", 2, 10, 50),
              "l": FakeLayer("l", 3, 30000, 2 ** 31)}
    sender = CapturingSender()
    sink = ForwardSink(cast(Any, sender), cast(Any, SimpleNamespace()), 100)
    layers["h"].forwarder.add_sink(sink)
    return layers, sink, sender


async def test_three_switches_follow_the_newest_packet_at_a_frame_end_continuous_seq_and_ts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # every key-frame request goes out at once (the 500 ms throttle would hold the second one
    # to h, asked already when the viewer joined)
    monkeypatch.setattr(forwarder_module, "KEYFRAME_REQUEST_INTERVAL", 0.0)
    layers, sink, sender = simulcast()
    for layer in layers.values():
        await feed(layer, layer.frame_packets())
    current = layers["h"]
    for rid in ("l", "m", "h"):
        target = layers[rid]
        target.forwarder.switch_in(sink, current.forwarder)
        old = current.frame_packets()
        new = target.frame_packets()
        # the old layer's frame starts, an old packet of it comes again (RTX payload
        # padding), the new layer's key frame arrives, then the old frame ends
        await feed(current, old[:1])
        await feed(current, [old[0]])
        await feed(target, new)
        if len(old) > 1:  # waits for the old layer's frame to end
            assert current.forwarder.sinks() == [sink], rid
        await feed(current, old[1:])
        assert target.forwarder.sinks() == [sink] and current.forwarder.sinks() == [], rid
        await feed(target, target.frame_packets())
        await feed(current, current.frame_packets())  # no longer sent to this viewer
        current = target
    tags = [tag_of(d).rstrip("K") for d in sender.sent]
    assert tags == ["h0.0", "h0.1", "h0.2", "h1.0", "h1.1", "h1.2",  # h, whole frames
                    "l1.0", "l2.0", "l3.0",  # l's key frame replayed after h's frame ended
                    "m1.0", "m1.1", "m2.0", "m2.1", "m3.0", "m3.1",  # l was between frames
                    "h3.0", "h3.1", "h3.2", "h4.0", "h4.1", "h4.2"], tags
    # each layer's first packet is the first of its key frame
    assert [tag_of(sender.sent[i]).endswith("K") for i in (0, 6, 9, 15)] == [True] * 4
    stamps = [seq_ts(d) for d in sender.sent]
    for (seq_a, ts_a), (seq_b, ts_b) in itertools.pairwise(stamps):
        assert seq_b == (seq_a + 1) % (1 << 16), stamps
        assert 0 <= (ts_b - ts_a) % (1 << 32) < 1 << 31, stamps  # never backwards
    assert all(d[1] & 0x7F == 100 for d in sender.sent)
    assert [layers[r].forwarder.duplicates_dropped for r in ("h", "l", "m")] == [1, 1, 1]
    assert [layers[r].forwarder.layer_switches for r in ("h", "m", "l")] == [1, 1, 1]


async def test_a_nack_for_a_packet_sent_before_a_switch_is_answered_by_the_layer_it_left(
) -> None:
    layers, sink, sender = simulcast()
    h, m, low = layers["h"], layers["m"], layers["l"]
    for layer in layers.values():
        await feed(layer, layer.frame_packets())
    low.forwarder.switch_in(sink, h.forwarder)
    await feed(low, low.frame_packets())
    m.forwarder.switch_in(sink, low.forwarder)
    await feed(m, m.frame_packets())
    by_seq = {seq_ts(d)[0]: d for d in sender.sent}
    assert [tag_of(by_seq[s]) for s in sorted(by_seq)] == [
        "h0.0K", "h0.1", "h0.2", "l1.0K", "m1.0K", "m1.1"]
    first_h, last_l, first_m = min(by_seq), min(by_seq) + 3, min(by_seq) + 4
    sender.sent.clear()
    # the viewer lost the last packet of l and the first of m: each from its own layer, as sent
    m.forwarder.retransmit(sink, [last_l, first_m])
    assert sender.sent == [by_seq[last_l], by_seq[first_m]]
    # two layers back (h) is not answered: those numbers are no longer h's shift
    sender.sent.clear()
    m.forwarder.retransmit(sink, [first_h])
    assert sender.sent == []


async def test_a_new_choice_cancels_the_switch_under_way() -> None:
    layers, sink, sender = simulcast()
    h, m, low = layers["h"], layers["m"], layers["l"]
    for layer in layers.values():
        await feed(layer, layer.frame_packets())
    low.forwarder.switch_in(sink, h.forwarder)
    m.forwarder.switch_in(sink, h.forwarder)  # changed its mind before l's key frame
    await feed(low, low.frame_packets())
    assert h.forwarder.sinks() == [sink] and not low.forwarder.switching(sink)
    await feed(m, m.frame_packets())
    assert m.forwarder.sinks() == [sink] and h.forwarder.sinks() == []
    low.forwarder.switch_in(sink, m.forwarder)
    low.forwarder.switch_in(sink, m.forwarder)  # asked twice: one switch
    m.forwarder.switch_in(sink, m.forwarder)  # and back to where it is: no switch at all
    await feed(low, low.frame_packets())
    assert m.forwarder.sinks() == [sink] and low.forwarder.sinks() == []
    assert [layers[r].forwarder.layer_switches for r in ("h", "m", "l")] == [0, 1, 0]
    assert [tag_of(d)[0] for d in sender.sent] == ["h", "h", "h", "m", "m"]


async def test_the_old_layer_goes_on_until_the_new_key_frame_is_whole_even_a_late_packet_of_it(
) -> None:
    layers, sink, sender = simulcast()
    h, m = layers["h"], layers["m"]
    for layer in layers.values():
        await feed(layer, layer.frame_packets())
    m.forwarder.switch_in(sink, h.forwarder)
    key, after = m.frame_packets(), m.frame_packets()
    # m's key frame starts; its second packet is lost upstream and comes back (RTX) late
    await feed(m, key[:1] + after)
    await feed(h, h.frame_packets())  # the viewer still gets h meanwhile
    assert h.forwarder.sinks() == [sink]
    await feed(m, key[1:])
    assert m.forwarder.sinks() == [sink] and h.forwarder.sinks() == []
    await feed(m, m.frame_packets())
    got = [(tag_of(d).rstrip("K"), seq_ts(d)) for d in sender.sent]
    assert [t for t, _ in got] == ["h0.0", "h0.1", "h0.2", "h1.0", "h1.1", "h1.2",
                                   "m1.0", "m2.0", "m2.1", "m1.1",  # as they came, at once
                                   "m3.0", "m3.1"], got
    # in sequence order: one numbering on from h's last packet, time never going back
    ordered = [st for _, st in sorted(got, key=lambda g: (g[1][0] - got[0][1][0]) % (1 << 16))]
    assert [(s - ordered[0][0]) % (1 << 16) for s, _ in ordered] == list(range(12))
    for (_, ts_a), (_, ts_b) in itertools.pairwise(ordered):
        assert (ts_b - ts_a) % (1 << 32) < 1 << 31, ordered


async def test_a_switch_away_from_a_layer_paused_mid_frame_waits_a_few_frames_not_forever(
) -> None:
    layers, sink, sender = simulcast()
    h, low = layers["h"], layers["l"]
    for layer in layers.values():
        await feed(layer, layer.frame_packets())
    low.forwarder.switch_in(sink, h.forwarder)
    await feed(h, h.frame_packets()[:1])  # then the publisher pauses h mid-frame
    for _ in range(SWITCH_WAIT_FRAMES):
        await feed(low, low.frame_packets())
        assert h.forwarder.sinks() == [sink]
    await feed(low, low.frame_packets())
    assert low.forwarder.sinks() == [sink]
    tags = [tag_of(d).rstrip("K") for d in sender.sent]
    assert tags == ["h0.0", "h0.1", "h0.2", "h1.0",
                    *[f"l{i}.0" for i in range(1, SWITCH_WAIT_FRAMES + 2)]], tags


async def test_a_source_that_numbers_again_under_the_same_ssrc_is_a_new_source_not_duplicates(
) -> None:
    # a relay's new pull of the same upstream (a layer pull replaced) has the upstream's SSRC
    # but numbers its packets its own way: some numbers are ones already forwarded
    layers, _sink, sender = simulcast()
    h = layers["h"]
    await feed(h, h.frame_packets())
    await feed(h, h.frame_packets())
    h.seq = (h.seq - 4) % (1 << 16)  # the new session's numbers overlap the old one's
    h.keyframe_wanted = True
    await feed(h, h.frame_packets())
    await feed(h, h.frame_packets())
    assert h.forwarder.numbering_restarts == 1 and h.forwarder.duplicates_dropped == 0
    tags = [tag_of(d).rstrip("K") for d in sender.sent]
    assert tags == ["h0.0", "h0.1", "h0.2", "h1.0", "h1.1", "h1.2", "h2.0", "h2.1", "h2.2",
                    "h3.0", "h3.1", "h3.2"], tags
    seqs = [seq_ts(d)[0] for d in sender.sent]
    assert [(s - seqs[0]) % (1 << 16) for s in seqs] == list(range(12)), seqs
    # the same packet again is a duplicate: dropped
    await feed(h, [h.frame_packets()[0]] * 2)
    assert h.forwarder.duplicates_dropped == 1 and len(sender.sent) == 13
    # numbers far ahead (beyond what NACKs reach) or far behind: a new numbering too
    for jump in (MAX_SEQ_JUMP + 1, -(HISTORY_SIZE + 1)):
        h.seq = (h.seq + jump) % (1 << 16)
        h.keyframe_wanted = True
        await feed(h, h.frame_packets())
    assert h.forwarder.numbering_restarts == 3
    seqs = [seq_ts(d)[0] for d in sender.sent]
    assert [(s - seqs[0]) % (1 << 16) for s in seqs] == list(range(len(seqs))), seqs
    assert len(seqs) == 19


async def test_a_paused_viewer_switched_to_another_layer_gets_nothing_until_resumed_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder_module, "KEYFRAME_REQUEST_INTERVAL", 0.0)  # resume's ask
    layers, sink, sender = simulcast()
    h, m = layers["h"], layers["m"]
    for layer in layers.values():
        await feed(layer, layer.frame_packets())
    h.forwarder.pause(sink)
    m.forwarder.switch_in(sink, h.forwarder)  # a layer POST while its video is paused
    await feed(h, h.frame_packets()[:1])  # (mid-frame: no matter, nothing goes to it)
    await feed(m, m.frame_packets())
    assert m.forwarder.sinks() == [sink] and len(sender.sent) == 3  # moved, sent nothing
    m.forwarder.resume(sink)
    await feed(m, m.frame_packets())  # its next key frame (resume asks for one)
    tags = [tag_of(d).rstrip("K") for d in sender.sent]
    assert tags == ["h0.0", "h0.1", "h0.2", "m2.0", "m2.1"], tags
    seqs = [seq_ts(d)[0] for d in sender.sent]
    assert [(s - seqs[0]) % (1 << 16) for s in seqs] == list(range(5)), seqs
