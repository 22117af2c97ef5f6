"""Pure RTP helpers for packet-level forwarding: header building, keyframe detection, sequence
and timestamp continuity across upstream changes. No I/O, no aiortc objects."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

KeyframeTest = Callable[[bytes], bool]

RTP_HEADER = struct.Struct("!BBHII")
SEQ_MOD = 1 << 16
TS_MOD = 1 << 32


def seq_newer(a: int, b: int) -> bool:
    """True when 16-bit sequence number ``a`` comes after ``b`` (RFC 1982 arithmetic)."""
    return a != b and ((a - b) & 0xFFFF) < 0x8000


def build_packet(marker: int, payload_type: int, seq: int, timestamp: int, ssrc: int,
                 payload: bytes) -> bytes:
    """A plain RTP packet with no CSRCs, header extensions or padding."""
    return RTP_HEADER.pack(0x80, (marker << 7) | payload_type, seq, timestamp, ssrc) + payload


def with_payload_type(packet: bytes, payload_type: int) -> bytes:
    """The same packet with its payload type replaced (marker bit kept)."""
    return packet[:1] + bytes([(packet[1] & 0x80) | payload_type]) + packet[2:]


def shifted(packet: bytes, payload_type: int, seq_delta: int, ts_delta: int) -> bytes:
    """The same packet with its payload type replaced and ``seq_delta``/``ts_delta`` added to
    its sequence number and timestamp (a viewer that switched simulcast layers)."""
    seq = (((packet[2] << 8) | packet[3]) + seq_delta) % SEQ_MOD
    ts = (int.from_bytes(packet[4:8], "big") + ts_delta) % TS_MOD
    return (packet[:1] + bytes([(packet[1] & 0x80) | payload_type]) + seq.to_bytes(2, "big")
            + ts.to_bytes(4, "big") + packet[8:])


# RFC 8285 one-byte header extension block holding one 3-byte element: the "defined by
# profile" word 0xBEDE, the block's length (1 word), then the element header (id << 4 | len - 1)
ABS_SEND_TIME_BLOCK = (0xBEDE0001 << 32) | (2 << 24)
ABS_SEND_TIME_SIZE = 8  # bytes the block adds to a packet
NTP_UNIX_OFFSET_NS = 2208988800 * 1_000_000_000  # 1900-01-01 to 1970-01-01


def abs_send_time_now() -> int:
    """Now as abs-send-time: 6.18 fixed-point seconds of the NTP clock, the value aiortc's own
    sender stamps (``(current_ntp_time() >> 14) & 0xFFFFFF``), from the integer clock (a fifth
    of the cost of aiortc's datetime arithmetic, once per packet per send group)."""
    return (((time.time_ns() + NTP_UNIX_OFFSET_NS) << 18) // 1_000_000_000) & 0xFFFFFF


def stamped(packet: bytes, payload_type: int, extension_id: int, send_time: int,
            seq_delta: int = 0, ts_delta: int = 0) -> bytes:
    """``packet`` (a `build_packet` one: no CSRCs, no header extension) with its payload type
    replaced, ``seq_delta``/``ts_delta`` added, and an abs-send-time header extension (id
    ``extension_id``, value ``send_time``, as `abs_send_time_now` gives it) in one build."""
    first = bytes((packet[0] | 0x10, (packet[1] & 0x80) | payload_type))
    if seq_delta or ts_delta:
        seq = (((packet[2] << 8) | packet[3]) + seq_delta) % SEQ_MOD
        ts = (int.from_bytes(packet[4:8], "big") + ts_delta) % TS_MOD
        header = first + seq.to_bytes(2, "big") + ts.to_bytes(4, "big") + packet[8:12]
    else:
        header = first + packet[2:12]
    block = ABS_SEND_TIME_BLOCK | (extension_id << 28) | (send_time & 0xFFFFFF)
    return header + block.to_bytes(ABS_SEND_TIME_SIZE, "big") + packet[12:]


def _vp8_descriptor_size(payload: bytes) -> int:
    pos = 1
    if payload[0] & 0x80:
        if len(payload) < 2:
            return len(payload)
        ext = payload[1]
        pos = 2
        if ext & 0x80:
            if len(payload) <= pos:
                return len(payload)
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:
            pos += 1
        if ext & 0x30:
            pos += 1
    return pos


def vp8_keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) from the first packet of a VP8 key frame (RFC 6386 section 9.1: the
    3-byte frame tag, the start code 9d 01 2a, then 14-bit width and height); None otherwise."""
    if not vp8_is_keyframe_start(payload):
        return None
    pos = _vp8_descriptor_size(payload)
    header = payload[pos:pos + 10]
    if len(header) < 10 or header[3:6] != b"\x9d\x01\x2a":
        return None
    width = int.from_bytes(header[6:8], "little") & 0x3FFF
    height = int.from_bytes(header[8:10], "little") & 0x3FFF
    return (width, height) if width and height else None


def vp8_is_keyframe_start(payload: bytes) -> bool:
    """First packet of a VP8 key frame (RFC 7741 payload descriptor + payload header)."""
    if not payload:
        return False
    first = payload[0]
    start_of_partition = first & 0x10
    partition_index = first & 0x07
    if not start_of_partition or partition_index != 0:
        return False
    pos = 1
    if first & 0x80:  # X: extension byte present
        if len(payload) < 2:
            return False
        ext = payload[1]
        pos = 2
        if ext & 0x80:  # I: picture id, 7 or 15 bits
            if len(payload) <= pos:
                return False
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            pos += 1
        if ext & 0x30:  # T or K: TID/KEYIDX byte
            pos += 1
    if len(payload) <= pos:
        return False
    return (payload[pos] & 0x01) == 0  # P bit 0 means key frame


H264_IDR = 5
H264_SPS = 7
H264_STAP_A = 24
H264_FU_A = 28


def h264_is_keyframe_start(payload: bytes) -> bool:
    """A packet that starts an H.264 IDR access unit (SPS, IDR, or a STAP-A/FU-A holding one)."""
    if not payload:
        return False
    nal_type = payload[0] & 0x1F
    if nal_type in (H264_SPS, H264_IDR):
        return True
    if nal_type == H264_STAP_A:
        pos = 1
        while pos + 2 < len(payload):
            size = (payload[pos] << 8) | payload[pos + 1]
            if pos + 2 >= len(payload):
                break
            if payload[pos + 2] & 0x1F in (H264_SPS, H264_IDR):
                return True
            pos += 2 + size
        return False
    if nal_type == H264_FU_A and len(payload) > 1:
        fu_header = payload[1]
        return bool(fu_header & 0x80) and (fu_header & 0x1F) == H264_IDR
    return False


H264_PPS = 8
H264_SLICES = range(1, 6)  # non-IDR slice, data partitions A-C, IDR slice


def h264_nal_starts(payload: bytes) -> list[tuple[int, bytes]]:
    """(nal type, first byte after the NAL header or b"") of each NAL unit this packet starts.

    Single NAL units and STAP-A list their NALs; a FU-A lists its NAL only in its start
    fragment (a continuation starts nothing)."""
    if not payload:
        return []
    nal_type = payload[0] & 0x1F
    if nal_type < H264_STAP_A:
        return [(nal_type, payload[1:2])]
    if nal_type == H264_STAP_A:
        nals: list[tuple[int, bytes]] = []
        pos = 1
        while pos + 2 < len(payload):
            size = (payload[pos] << 8) | payload[pos + 1]
            if size == 0:
                break
            nals.append((payload[pos + 2] & 0x1F, payload[pos + 3:pos + 4] if size > 1 else b""))
            pos += 2 + size
        return nals
    if nal_type == H264_FU_A and len(payload) > 1 and payload[1] & 0x80:
        return [(payload[1] & 0x1F, payload[2:3])]
    return []


class H264KeyframeStarts:
    """Finds the first packet of each H.264 IDR access unit, for one packet stream.

    An IDR access unit is [SPS] [PPS] IDR slice, IDR slice, ... and may span many packets
    (separate SPS and PPS packets, an IDR in FU-A fragments, several slices per picture). Only
    its first packet starts the key frame: the forwarder restarts its key-frame cache at every
    start, so a later "start" inside the same access unit would drop the SPS/PPS (or the first
    slices) from what a joining viewer is replayed. A slice begins a new picture when its
    first_mb_in_slice is 0 (ue(v) 0 is a single 1 bit). A separate SPS/PPS packet is taken as
    a start: whether an IDR follows is not known yet (encoders send them before IDRs)."""

    def __init__(self) -> None:
        self._parameter_sets_open = False  # SPS/PPS seen, no slice yet: the AU has started

    def __call__(self, payload: bytes) -> bool:
        nals = h264_nal_starts(payload)
        slices = [(t, rest) for t, rest in nals if t in H264_SLICES]
        params = any(t in (H264_SPS, H264_PPS) for t, _ in nals)
        opened = self._parameter_sets_open
        if not slices:
            if params:
                self._parameter_sets_open = True
                return not opened
            return False  # SEI, AUD, FU-A continuation: part of whatever is going on
        self._parameter_sets_open = False
        nal_type, rest = slices[0]
        if nal_type != H264_IDR:
            return False
        if params:  # STAP-A holding SPS/PPS and the IDR
            return not opened
        first_slice_of_picture = bool(rest) and bool(rest[0] & 0x80)
        return first_slice_of_picture and not opened


def keyframe_detector(mime_type: str) -> KeyframeTest:
    """The key-frame start test for one packet stream of ``mime_type`` (may keep state: call
    once per stream)."""
    mime = mime_type.lower()
    if mime == "video/vp8":
        return vp8_is_keyframe_start
    if mime == "video/h264":
        return H264KeyframeStarts()
    return _never


def _never(payload: bytes) -> bool:
    return False


@dataclass
class SequenceMapper:
    """Maps each upstream source's (seq, timestamp) into one continuous output numbering.

    When the source SSRC changes (publisher reconnected, relay re-pulled) the output keeps
    counting from where it was, and the timestamp advances by the wall-clock gap, so viewers'
    decoders see one uninterrupted stream with the same SSRC.
    """

    clock_rate: int
    source_ssrc: int | None = None
    seq_offset: int = 0
    ts_offset: int = 0
    last_out_seq: int = 0
    last_out_ts: int = 0
    last_wall: float = 0.0
    started: bool = False

    def map(self, ssrc: int, seq: int, timestamp: int) -> tuple[int, int, bool]:
        """(output seq, output timestamp, whether this packet began a new source)."""
        switched = ssrc != self.source_ssrc
        now = time.monotonic()
        if switched:
            self.source_ssrc = ssrc
            if self.started:
                gap = max(1, int((now - self.last_wall) * self.clock_rate))
                self.seq_offset = (self.last_out_seq + 1 - seq) % SEQ_MOD
                self.ts_offset = (self.last_out_ts + gap - timestamp) % TS_MOD
            else:
                self.seq_offset = 0
                self.ts_offset = 0
        out_seq = (seq + self.seq_offset) % SEQ_MOD
        out_ts = (timestamp + self.ts_offset) % TS_MOD
        if not self.started or seq_newer(out_seq, self.last_out_seq):
            self.last_out_seq = out_seq
            self.last_out_ts = out_ts
            self.last_wall = now
        self.started = True
        return out_seq, out_ts, switched

    def map_timestamp(self, timestamp: int) -> int:
        return (timestamp + self.ts_offset) % TS_MOD
