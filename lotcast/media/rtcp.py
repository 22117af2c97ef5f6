"""A lean RTCP codec for the forwarding path: the few packet types a relay acts on, nothing else.

A viewer's RTCP reaches a relay about twice a second per track (receiver reports, REMB, now and
then NACK or PLI). aiortc parses every packet of a compound into dataclasses, routes each to its
sender and, for a receiver report, builds a stats object with a datetime: a fixed cost per viewer
that dominated an idle viewer's CPU. `parse_feedback` reads one decrypted compound packet in one
pass and returns only what the forwarder uses: report blocks (loss, jitter, RTT inputs), NACKed
sequence numbers, key-frame requests (PLI, FIR) and REMB. Every other type is skipped by its
length. `sender_reports` builds one compound of Sender Reports (one per forwarded track of a
viewer) plus their SDES CNAMEs, so one protect and one send carry a viewer's whole report.

Pure: no I/O, no aiortc objects. RFC 3550 (SR, RR, SDES), RFC 4585 (NACK, PLI), RFC 5104 (FIR),
draft-alvestrand-rmcat-remb (REMB).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SR, RR, SDES, BYE, RTPFB, PSFB = 200, 201, 202, 203, 205, 206
FMT_NACK = 1  # RTPFB
FMT_PLI, FMT_FIR, FMT_APP = 1, 4, 15  # PSFB (APP carries REMB)
SDES_CNAME = 1

_HEADER = struct.Struct("!BBH")
_U32 = struct.Struct("!I")
_BLOCK = struct.Struct("!IIIIII")  # ssrc, lost (fraction:8 + cumulative:24), highest, jitter, lsr, dlsr
_SR = struct.Struct("!BBHIQIII")  # header, ssrc, ntp, rtp timestamp, packets, octets
_NACK_FCI = struct.Struct("!HH")


class RtcpError(ValueError):
    """Not a well-formed RTCP compound packet."""


@dataclass(frozen=True, slots=True)
class ReportBlock:
    """One reception report about one of our SSRCs (from an RR or an SR)."""

    ssrc: int
    fraction_lost: int  # of 256, since the previous report
    packets_lost: int  # cumulative, signed
    highest_sequence: int  # extended highest sequence number received
    jitter: int  # in RTP timestamp units
    lsr: int  # middle 32 bits of the NTP timestamp of our last SR (0: none received)
    dlsr: int  # delay since that SR, in 1/65536 s


@dataclass(slots=True)
class Feedback:
    """What one compound packet asks of us."""

    reports: list[ReportBlock] = field(default_factory=list)
    nacks: list[tuple[int, list[int]]] = field(default_factory=list)  # (media ssrc, seqs)
    keyframe_requests: list[int] = field(default_factory=list)  # media ssrcs (PLI, FIR)
    remb: tuple[int, tuple[int, ...]] | None = None  # (bits/s, ssrcs)


def parse_feedback(data: bytes) -> Feedback:
    """Read a decrypted RTCP compound packet; raises RtcpError on a malformed one (as a whole:
    a truncated compound is dropped, as aiortc does)."""
    out = Feedback()
    pos, end = 0, len(data)
    if end < 4:
        raise RtcpError(f"RTCP packet of {end} bytes")
    while pos < end:
        if end - pos < 4:
            raise RtcpError("truncated RTCP header")
        first, pt, words = _HEADER.unpack_from(data, pos)
        if first >> 6 != 2:
            raise RtcpError(f"RTCP version {first >> 6}")
        length = 4 * (words + 1)
        stop = pos + length
        if stop > end:
            raise RtcpError(f"RTCP packet length {length} exceeds the datagram")
        if first & 0x20:  # padding: the last byte counts it
            stop_data = stop - data[stop - 1]
            if stop_data < pos + 4:
                raise RtcpError("RTCP padding exceeds the packet")
        else:
            stop_data = stop
        count = first & 0x1F
        if pt == RR or pt == SR:
            blocks_at = pos + 8 + (20 if pt == SR else 0)
            if blocks_at + 24 * count > stop_data:
                raise RtcpError("RTCP report blocks exceed the packet")
            for i in range(count):
                ssrc, loss, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(data, blocks_at + 24 * i)
                cumulative = loss & 0xFFFFFF
                if cumulative & 0x800000:
                    cumulative -= 0x1000000
                out.reports.append(ReportBlock(ssrc, loss >> 24, cumulative, highest, jitter,
                                               lsr, dlsr))
        elif pt == RTPFB or pt == PSFB:
            if stop_data - pos < 12:
                raise RtcpError("RTCP feedback packet shorter than 12 bytes")
            media_ssrc = _U32.unpack_from(data, pos + 8)[0]
            fci = pos + 12
            if pt == RTPFB and count == FMT_NACK:
                lost: list[int] = []
                for at in range(fci, stop_data - 3, 4):
                    pid, blp = _NACK_FCI.unpack_from(data, at)
                    lost.append(pid)
                    for bit in range(16):
                        if blp >> bit & 1:
                            lost.append((pid + bit + 1) & 0xFFFF)
                out.nacks.append((media_ssrc, lost))
            elif pt == PSFB and count == FMT_PLI:
                out.keyframe_requests.append(media_ssrc)
            elif pt == PSFB and count == FMT_FIR:
                # the media SSRC field is unused (0) in a FIR: each FCI entry names one
                for at in range(fci, stop_data - 7, 8):
                    out.keyframe_requests.append(_U32.unpack_from(data, at)[0])
            elif pt == PSFB and count == FMT_APP and stop_data - fci >= 8 \
                    and data[fci:fci + 4] == b"REMB":
                num, exp_mantissa = data[fci + 4], _U32.unpack_from(data, fci + 4)[0] & 0xFFFFFF
                if fci + 8 + 4 * num > stop_data:
                    raise RtcpError("REMB SSRC list exceeds the packet")
                bitrate = (exp_mantissa & 0x3FFFF) << (exp_mantissa >> 18)
                ssrcs = struct.unpack_from(f"!{num}I", data, fci + 8)
                out.remb = (bitrate, ssrcs)
        pos = stop
    return out


@dataclass(frozen=True, slots=True)
class SenderInfo:
    """The sender-info part of one track's Sender Report."""

    ssrc: int
    ntp_timestamp: int  # 64-bit NTP
    rtp_timestamp: int
    packet_count: int
    octet_count: int


def sender_reports(infos: list[SenderInfo], cname: bytes | None) -> bytes:
    """One compound packet: an SR (no report blocks) per track, then an SDES CNAME per SSRC
    (when ``cname`` is given)."""
    if not infos:
        raise ValueError("no sender report to build")
    parts = [_SR.pack(0x80, SR, 6, i.ssrc, i.ntp_timestamp & 0xFFFFFFFFFFFFFFFF,
                      i.rtp_timestamp & 0xFFFFFFFF, i.packet_count & 0xFFFFFFFF,
                      i.octet_count & 0xFFFFFFFF) for i in infos]
    if cname is not None:
        # one SDES packet per SSRC (RFC 3550 allows several): a chunk's end item is padded to a
        # 32-bit boundary, which some parsers (aiortc's) misread when a second chunk follows
        text = cname[:255]
        for info in infos:
            chunk = _U32.pack(info.ssrc) + bytes((SDES_CNAME, len(text))) + text
            chunk += bytes(4 - len(chunk) % 4)  # the end item (zero bytes) to a 32-bit boundary
            parts.append(_HEADER.pack(0x81, SDES, len(chunk) // 4) + chunk)
    return b"".join(parts)


def ntp_middle(ntp_timestamp: int) -> int:
    """The 32 bits of an NTP timestamp a receiver echoes as LSR."""
    return (ntp_timestamp >> 16) & 0xFFFFFFFF
