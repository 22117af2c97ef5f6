"""Pure parts of the media path, and the guard on aiortc internals."""

from __future__ import annotations

import pytest

from lotcast.media.aiortc_hooks import check_hooks
from lotcast.media.rtp import (
    SequenceMapper,
    build_packet,
    h264_is_keyframe_start,
    seq_newer,
    vp8_is_keyframe_start,
    with_payload_type,
)
from lotcast.media.sdp import SdpError, check_offer

pytestmark = pytest.mark.timeout(30)


def test_aiortc_private_names_still_exist() -> None:
    check_hooks()  # raises HookError naming whatever moved


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (bytes([0x10, 0x00]), True),  # S=1, PID=0, P=0: key frame start
        (bytes([0x10, 0x01]), False),  # P=1: inter frame
        (bytes([0x00, 0x00]), False),  # not a partition start
        (bytes([0x90, 0x80, 0x81, 0x23, 0x00]), True),  # X, I with 15-bit picture id
        (bytes([0x90, 0x80, 0x81, 0x23, 0x01]), False),
        (bytes([0x11, 0x00]), False),  # partition 1
        (b"", False),
    ],
)
def test_vp8_keyframe_detection(payload: bytes, expected: bool) -> None:
    assert vp8_is_keyframe_start(payload) is expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (bytes([0x67, 0x42]), True),  # SPS
        (bytes([0x65, 0x88]), True),  # IDR slice
        (bytes([0x41, 0x9A]), False),  # non-IDR slice
        (bytes([0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x02, 0x68, 0xCE]), True),  # STAP-A with SPS
        (bytes([0x7C, 0x85, 0x00]), True),  # FU-A start of IDR
        (bytes([0x7C, 0x05, 0x00]), False),  # FU-A continuation
        (bytes([0x7C, 0x81, 0x00]), False),  # FU-A start of non-IDR
    ],
)
def test_h264_keyframe_detection(payload: bytes, expected: bool) -> None:
    assert h264_is_keyframe_start(payload) is expected


def test_sequence_mapper_stays_continuous_across_a_source_change() -> None:
    mapper = SequenceMapper(clock_rate=90000)
    out = [mapper.map(111, seq, 1000 + seq * 3000) for seq in (65534, 65535, 0, 1)]
    assert [o[0] for o in out] == [65534, 65535, 0, 1]
    assert out[0][2] is True and not any(o[2] for o in out[1:])
    seq, ts, switched = mapper.map(222, 5000, 77)  # new publisher: unrelated numbering
    assert switched and seq == 2
    assert seq_newer(seq, 1)
    assert (ts - out[-1][1]) % (1 << 32) >= 1
    assert mapper.map(222, 5001, 3077)[0] == 3


def test_packet_building_and_payload_type_rewrite() -> None:
    packet = build_packet(1, 96, 513, 0xDEADBEEF, 0x01020304, b"abc")
    assert packet[:2] == bytes([0x80, 0x80 | 96])
    assert packet[2:4] == (513).to_bytes(2, "big")
    assert packet[8:12] == bytes([1, 2, 3, 4]) and packet[12:] == b"abc"
    rewritten = with_payload_type(packet, 100)
    assert rewritten[1] == 0x80 | 100 and rewritten[2:] == packet[2:]


@pytest.mark.parametrize(
    ("sdp", "status", "reason"),
    [
        ("", 400, "empty body"),
        ("x=1", 400, "must start with 'v=0'"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", 400, "no m= sections"),
    ],
)
def test_offer_checks(sdp: str, status: int, reason: str) -> None:
    with pytest.raises(SdpError) as info:
        check_offer(sdp, "publish")
    assert info.value.status == status and reason in info.value.reason


def test_fast_protect_matches_pylibsrtp() -> None:
    import os

    import pylibsrtp

    from lotcast.media.aiortc_hooks import fast_protect

    key = os.urandom(30)

    def session() -> pylibsrtp.Session:
        return pylibsrtp.Session(pylibsrtp.Policy(
            key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))

    reference, ours = session(), session()
    protect = fast_protect(ours)
    for seq in range(300):
        packet = build_packet(seq % 2, 96, seq, seq * 3000, 0x1234, os.urandom(seq * 4 % 1200))
        assert protect(packet) == reference.protect(packet)
    with pytest.raises(ValueError):
        protect(bytes(1500))
