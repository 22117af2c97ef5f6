"""Checks on WHIP/WHEP SDP offers and trickle fragments, done before aiortc sees them.

Pure functions: text in, an OfferSummary / TrickleFragment or an SdpError (HTTP status + readable
reason) out. Everything aiortc would trip over (a BUNDLE group naming a missing m-line, a
candidate that is not an address, no RTCP mux, ...) is refused here with a 4xx, so a peer
connection is only ever built from an offer it can negotiate.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from aiortc import RTCIceCandidate
from aiortc import sdp as aiortc_sdp

Purpose = Literal["publish", "play"]

# What the platform forwards: what browsers send and aiortc can negotiate.
ACCEPTED_CODECS = {
    "video": ("video/vp8", "video/h264"),
    "audio": ("audio/opus",),
}
# Browsers send 1-3 m-sections (audio, video, data channel); anything near this is not a client.
MAX_MEDIA_SECTIONS = 16
CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")


class SdpError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class OfferSummary:
    # kind -> accepted codec mime types the offer lists, in the offer's order
    kinds: dict[str, list[str]] = field(default_factory=dict)
    # a publish offer's video simulcast (RFC 8853), None without a=simulcast
    simulcast: SimulcastOffer | None = None


RID_URI = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
REPAIRED_RID_URI = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
MAX_SIMULCAST_LAYERS = 4
_RID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


@dataclass(frozen=True)
class SimulcastOffer:
    """The send layers of a video m-section: rids in the offer's a=simulcast order (the
    publisher's preference; our host page lists them high to low), the extmap ids of the rid
    header extensions, and each rid's a=imageattr/max-width size if the offer gives one."""

    rids: tuple[str, ...]
    rid_ext_id: int
    repaired_rid_ext_id: int | None
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)


def _video_section(text: str) -> list[str] | None:
    lines = text.splitlines()
    section: list[str] | None = None
    for line in lines:
        if line.startswith("m="):
            if section is not None:
                return section
            section = [line] if line.startswith("m=video") else None
        elif section is not None:
            section.append(line)
    return section


def parse_simulcast(text: str) -> SimulcastOffer | None:
    """The video simulcast of a publish offer; None when it has none. SdpError(422) on a
    simulcast the broadcaster cannot receive (no rid header extension, unknown rids...)."""
    section = _video_section(text)
    if section is None:
        return None
    send: list[str] | None = None
    declared: dict[str, dict[str, str]] = {}
    ext_ids: dict[str, int] = {}
    for line in section:
        if line.startswith("a=simulcast:"):
            parts = line[len("a=simulcast:"):].split()
            if len(parts) < 2 or parts[0] != "send" or send is not None:
                raise SdpError(422, f"simulcast must be 'a=simulcast:send <rids>': {line[:60]!r}")
            # alternatives ("h,h2") take the first; a paused rid ("~l") is still a layer
            send = [alt.split(",")[0].lstrip("~") for alt in parts[1].split(";")]
        elif line.startswith("a=rid:"):
            fields = line[len("a=rid:"):].split()
            if len(fields) >= 2 and fields[1] == "send":
                params = {}
                for item in (fields[2].split(";") if len(fields) > 2 else []):
                    key, _, value = item.partition("=")
                    params[key] = value
                declared[fields[0]] = params
        elif line.startswith("a=extmap:"):
            head, _, uri = line[len("a=extmap:"):].partition(" ")
            try:
                ext_ids[uri.split()[0] if uri else ""] = int(head.split("/")[0])
            except ValueError:
                continue
    if send is None:
        return None
    if not 1 <= len(send) <= MAX_SIMULCAST_LAYERS or len(set(send)) != len(send):
        raise SdpError(422, f"simulcast needs 1-{MAX_SIMULCAST_LAYERS} distinct rids")
    for rid in send:
        if not rid or len(rid) > 16 or not set(rid) <= _RID_CHARS:
            raise SdpError(422, f"simulcast rid {rid[:20]!r} is not 1-16 letters/digits/-/_")
        if rid not in declared:
            raise SdpError(422, f"simulcast names rid {rid!r} without 'a=rid:{rid} send'")
    if RID_URI not in ext_ids:
        raise SdpError(422, f"simulcast needs the {RID_URI} header extension")
    sizes: dict[str, tuple[int, int]] = {}
    for rid in send:
        params = declared[rid]
        if params.get("max-width", "").isdigit() and params.get("max-height", "").isdigit():
            sizes[rid] = (int(params["max-width"]), int(params["max-height"]))
    return SimulcastOffer(tuple(send), ext_ids[RID_URI], ext_ids.get(REPAIRED_RID_URI), sizes)


ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"


def without_receive_estimate(answer: str) -> str:
    """Our answer to a publisher without REMB: no `goog-remb` feedback and no abs-send-time
    extension, so the publisher's bandwidth estimate is its own loss-based one. aiortc's
    receive-side estimator reads the arrival times of packets after our event loop handled them:
    on a busy origin their jitter looks like a queue building, it keeps lowering its REMB, and
    the publisher (Chromium) ends up sending its lowest simulcast layer at ~30 kbit/s."""
    return "".join(line for line in answer.splitlines(keepends=True)
                   if not (line.startswith("a=rtcp-fb:") and line.rstrip().endswith(" goog-remb"))
                   and not (line.startswith("a=extmap:") and ABS_SEND_TIME_URI in line))


def answer_simulcast(answer: str, simulcast: SimulcastOffer) -> str:
    """Our answer with the receive side of the offer's simulcast added to its video section:
    'a=rid:<id> recv' per layer and 'a=simulcast:recv <rids>' (RFC 8853 section 5.3)."""
    out: list[str] = []
    in_video = False
    added = False

    def add() -> None:
        out.extend(f"a=rid:{rid} recv" for rid in simulcast.rids)
        out.append("a=simulcast:recv " + ";".join(simulcast.rids))

    for line in answer.splitlines():
        if line.startswith("m="):
            if in_video and not added:
                add()
                added = True
            in_video = line.startswith("m=video")
        out.append(line)
    if in_video and not added:
        add()
    return "\r\n".join(out) + "\r\n"


def _check_lines(text: str) -> None:
    if not text.strip():
        raise SdpError(400, "malformed SDP: empty body")
    if not text.lstrip().startswith("v=0"):
        raise SdpError(400, "malformed SDP: must start with 'v=0'")
    for number, line in enumerate(text.splitlines(), start=1):
        if line and (len(line) < 2 or line[1] != "=" or not line[0].isascii()
                     or not line[0].isalpha()):
            raise SdpError(400, f"malformed SDP: line {number} is not '<type>=<value>': {line[:40]!r}")


def parse_description(text: str) -> aiortc_sdp.SessionDescription:
    """aiortc's parse of a text already known to be line-wise SDP; SdpError(400) on garbage."""
    _check_lines(text)
    try:
        return aiortc_sdp.SessionDescription.parse(text)
    except Exception as exc:  # aiortc's parser raises assorted errors on garbage
        raise SdpError(400, f"malformed SDP: {exc or type(exc).__name__}") from exc


def check_candidate(candidate: RTCIceCandidate, where: str) -> None:
    """Refuse a candidate aioice could not pair (it would fail later, off the request path)."""
    host = candidate.ip
    if not host.lower().endswith(".local"):
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise SdpError(400, f"{where}: candidate address {host[:40]!r} is not an IP "
                           "address or an mDNS .local name") from exc
    if not 0 < candidate.port < 65536:
        raise SdpError(400, f"{where}: candidate port {candidate.port} is out of range")
    if candidate.component not in (1, 2):
        raise SdpError(400, f"{where}: candidate component {candidate.component} is not 1 or 2")
    if not 0 <= candidate.priority < 2**32:
        raise SdpError(400, f"{where}: candidate priority {candidate.priority} is out of range")
    if candidate.protocol.lower() not in ("udp", "tcp"):
        raise SdpError(400, f"{where}: candidate transport {candidate.protocol[:20]!r} is not udp")
    if candidate.type not in CANDIDATE_TYPES:
        raise SdpError(400, f"{where}: candidate type {candidate.type[:20]!r} is not one of "
                       + "/".join(CANDIDATE_TYPES))


def bundle_only_sections(text: str, description: aiortc_sdp.SessionDescription) -> set[int]:
    """Indices of m-sections that are port 0 with a=bundle-only inside a BUNDLE group but not
    its first: live, bundled on the group's transport (RFC 8843 §6), not rejected. GStreamer's
    webrtcbin (max-bundle, as its own WHIP sink uses) offers its second m-line this way.
    aiortc's parser drops the attribute, so it is read from the section's raw lines."""
    flagged: set[int] = set()
    index = -1
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            index += 1
        elif index >= 0 and line == "a=bundle-only":
            flagged.add(index)
    tail_mids = {str(item) for group in description.group if group.semantic == "BUNDLE"
                 for item in group.items[1:]}
    return {i for i in flagged if i < len(description.media)
            and description.media[i].port == 0 and description.media[i].rtp.muxId in tail_mids}


def _check_structure(description: aiortc_sdp.SessionDescription, bundle_only: set[int]) -> None:
    media = description.media
    if not media:
        raise SdpError(400, "malformed SDP: no m= sections")
    if len(media) > MAX_MEDIA_SECTIONS:
        raise SdpError(422, f"offer has {len(media)} m-sections; at most {MAX_MEDIA_SECTIONS} "
                       "are served")
    mids: dict[str, int] = {}
    for index, section in enumerate(media):
        mid = section.rtp.muxId
        if not mid:
            raise SdpError(400, f"malformed SDP: m-line {index} has no a=mid")
        if mid in mids:
            raise SdpError(400, f"malformed SDP: m-lines {mids[mid]} and {index} share mid {mid!r}")
        mids[mid] = index
        if section.port == 0:
            continue  # rejected, or bundle-only: transport attributes are the group's first
        if section.ice is None or not section.ice.usernameFragment or not section.ice.password:
            raise SdpError(400, f"malformed SDP: m-line {index} has no ice-ufrag/ice-pwd")
        if section.dtls is None or not section.dtls.fingerprints:
            raise SdpError(400, f"malformed SDP: m-line {index} has no DTLS fingerprint")
        if section.kind in ("audio", "video") and not section.rtcp_mux:
            raise SdpError(422, f"{section.kind} m-line {index} lacks a=rtcp-mux; WebRTC needs "
                           "RTP and RTCP on one port")
        for candidate in section.ice_candidates:
            check_candidate(candidate, f"m-line {index}")
    bundles = [g for g in description.group if g.semantic == "BUNDLE"]
    if len(bundles) > 1:
        raise SdpError(422, "offer has more than one BUNDLE group; one is served")
    for group in bundles:
        for item in group.items:
            index_of = mids.get(str(item))
            if index_of is None:
                raise SdpError(400, f"malformed SDP: BUNDLE names mid {str(item)[:20]!r}, "
                               "which no m-line has")
            if media[index_of].port == 0 and index_of not in bundle_only:
                raise SdpError(400, f"malformed SDP: BUNDLE names mid {str(item)[:20]!r}, "
                               "whose m-line is rejected (port 0)")


def check_offer(text: str, purpose: Purpose) -> OfferSummary:
    """Validate an SDP offer for publishing (WHIP) or playing (WHEP)."""
    description = parse_description(text)
    bundle_only = bundle_only_sections(text, description)
    _check_structure(description, bundle_only)

    summary = OfferSummary()
    for index, media in enumerate(description.media):
        if media.kind not in ACCEPTED_CODECS:
            continue
        if (media.port == 0 and index not in bundle_only) or media.direction == "inactive":
            continue
        wanted = ("sendonly", "sendrecv") if purpose == "publish" else ("recvonly", "sendrecv")
        if media.direction not in wanted:
            found = media.direction or "without a direction attribute"
            raise SdpError(
                422, f"{media.kind} m-line {index} is {found}; "
                f"{'publishing' if purpose == 'publish' else 'playing'} needs {' or '.join(wanted)}"
            )
        if media.kind in summary.kinds:
            raise SdpError(422, f"offer has more than one {media.kind} m-line; one of each is served")
        codecs = [c.mimeType.lower() for c in media.rtp.codecs]
        accepted = [c for c in codecs if c in ACCEPTED_CODECS[media.kind]]
        if not accepted:
            continue
        summary.kinds[media.kind] = accepted
    if purpose == "publish" and "video" in summary.kinds:
        summary.simulcast = parse_simulcast(text)
    if not summary.kinds:
        raise SdpError(
            422, "offer has no media we accept: need VP8 or H.264 video and/or Opus audio"
        )
    return summary


@dataclass(frozen=True)
class IceCredentials:
    ufrag: str
    pwd: str


@dataclass(frozen=True)
class TrickleCandidate:
    mid: str | None  # None: the fragment named no m-section (applies to the first)
    candidate: RTCIceCandidate


@dataclass
class TrickleFragment:
    """An application/trickle-ice-sdpfrag body (RFC 8840), as WHIP/WHEP PATCH carries it."""

    ufrags: list[str] = field(default_factory=list)
    pwds: list[str] = field(default_factory=list)
    candidates: list[TrickleCandidate] = field(default_factory=list)
    end_of_candidates: bool = False
    mids: list[str] = field(default_factory=list)

    def restarts(self, current: set[IceCredentials]) -> bool:
        """An ICE restart carries credentials other than the session's current ones (RFC 9725)."""
        ufrags = {c.ufrag for c in current}
        pwds = {c.pwd for c in current}
        return any(u not in ufrags for u in self.ufrags) or any(p not in pwds for p in self.pwds)


def parse_trickle(text: str) -> TrickleFragment:
    fragment = TrickleFragment()
    mid: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=":
            raise SdpError(400, f"malformed trickle fragment: line {number} is not "
                           f"'<type>=<value>': {line[:40]!r}")
        if line.startswith("m="):
            mid = None  # a new m-section; its a=mid follows
            continue
        if not line.startswith("a="):
            continue
        attr, _, value = line[2:].partition(":")
        value = value.strip()
        if attr == "ice-ufrag":
            if not value:
                raise SdpError(400, f"malformed trickle fragment: line {number} has an empty ice-ufrag")
            fragment.ufrags.append(value)
        elif attr == "ice-pwd":
            if not value:
                raise SdpError(400, f"malformed trickle fragment: line {number} has an empty ice-pwd")
            fragment.pwds.append(value)
        elif attr == "mid":
            mid = value
            fragment.mids.append(value)
        elif attr == "end-of-candidates":
            fragment.end_of_candidates = True
        elif attr == "candidate":
            try:
                candidate = aiortc_sdp.candidate_from_sdp(value)
            except Exception as exc:
                raise SdpError(400, f"bad trickle candidate on line {number}: "
                               f"{exc or type(exc).__name__}") from exc
            check_candidate(candidate, f"trickle line {number}")
            fragment.candidates.append(TrickleCandidate(mid, candidate))
    return fragment


def ice_credentials(description: aiortc_sdp.SessionDescription) -> set[IceCredentials]:
    return {IceCredentials(m.ice.usernameFragment, m.ice.password) for m in description.media
            if m.ice is not None and m.ice.usernameFragment and m.ice.password}


def transport_mids(description: aiortc_sdp.SessionDescription) -> dict[str, str]:
    """mid -> the mid whose ICE transport carries it (the first mid of its BUNDLE group)."""
    out = {m.rtp.muxId: m.rtp.muxId for m in description.media if m.rtp.muxId}
    for group in description.group:
        if group.semantic == "BUNDLE" and group.items:
            owner = str(group.items[0])
            for item in group.items:
                out[str(item)] = owner
    return out
