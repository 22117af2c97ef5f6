"""Simulcast parts without sockets: the offer's a=simulcast/a=rid parse and its 422s, the
answer's receive lines, the rid demux (RTX table, SSRCs learned once the extensions stop), the
per-viewer seq/timestamp shift and the VP8 key frame size (issue 11)."""

from __future__ import annotations

import pytest
from aiortc.rtp import HeaderExtensions, RtpPacket

from lotcast.media.aiortc_hooks import SimulcastDemux
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


def test_automatic_layer_goes_down_at_once_up_slowly_and_holds_off_after_a_relapse() -> None:
    from lotcast.media.layer_choice import HOLD_S, UP_STABLE_S, LayerChoiceState, next_layer

    state = LayerChoiceState()
    rates: list[int | None] = [1_200_000, 400_000, 120_000]
    # clean reports on the top layer: stays
    assert next_layer(state, 0.0, 0, 3, 1, 0, None, rates) == 0
    # one report with 12 % loss: one layer down at once
    assert next_layer(state, 1.0, 0, 3, 2, 31, None, rates) == 1
    # the same (old) report again is no news; nothing moves up within the hold-off
    assert next_layer(state, 2.0, 1, 3, 2, 31, None, rates) == 1
    # clean reports from t=3: up once both the hold-off (8 s after the move down) and 6 s of
    # clean reports have passed, at t=9, not before
    t, reports = 2.0, 2
    while t < 1.0 + HOLD_S - 1:
        t, reports = t + 1, reports + 1
        assert next_layer(state, t, 1, 3, reports, 0, None, rates) == 1, t
    t, reports = t + 1, reports + 1
    assert t == 3.0 + UP_STABLE_S
    assert next_layer(state, t, 1, 3, reports, 0, None, rates) == 0  # up, conservatively
    # loss again soon after the move up: down, and the hold-off doubles
    assert next_layer(state, t + 1, 0, 3, reports + 1, 40, None, rates) == 1
    assert state.hold == 2 * HOLD_S
    # a bandwidth estimate below the layer's bitrate moves down too; the lowest stays
    assert next_layer(state, t + 2, 1, 3, reports + 1, 0, 300_000, rates) == 2
    assert next_layer(state, t + 3, 2, 3, reports + 2, 90, None, rates) == 2
    # an estimate without headroom for the layer above keeps it down however clean
    late = t + 200
    assert next_layer(state, late, 2, 3, reports + 3, 0, 450_000, rates) == 2
    assert next_layer(state, late + UP_STABLE_S, 2, 3, reports + 4, 0, 450_000, rates) == 2
    assert next_layer(state, late + UP_STABLE_S + 1, 2, 3, reports + 5, 0, 600_000, rates) == 1
    # one layer: nothing to choose
    assert next_layer(LayerChoiceState(), 0.0, 0, 1, 1, 200, None, [None]) == 0
