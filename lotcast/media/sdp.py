"""Checks on WHIP/WHEP SDP offers, done before any peer connection exists.

Pure functions: text in, an OfferSummary or an SdpError (HTTP status + readable reason) out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from aiortc import sdp as aiortc_sdp

Purpose = Literal["publish", "play"]

# What the platform forwards: what browsers send and aiortc can negotiate.
ACCEPTED_CODECS = {
    "video": ("video/vp8", "video/h264"),
    "audio": ("audio/opus",),
}


class SdpError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class OfferSummary:
    # kind -> accepted codec mime types the offer lists, in the offer's order
    kinds: dict[str, list[str]] = field(default_factory=dict)


def check_offer(text: str, purpose: Purpose) -> OfferSummary:
    """Validate an SDP offer for publishing (WHIP) or playing (WHEP)."""
    if not text.strip():
        raise SdpError(400, "malformed SDP: empty body")
    if not text.lstrip().startswith("v=0"):
        raise SdpError(400, "malformed SDP: must start with 'v=0'")
    for number, line in enumerate(text.splitlines(), start=1):
        if line and (len(line) < 2 or line[1] != "="):
            raise SdpError(400, f"malformed SDP: line {number} is not '<type>=<value>': {line[:40]!r}")
    try:
        description = aiortc_sdp.SessionDescription.parse(text)
    except Exception as exc:  # aiortc's parser raises assorted errors on garbage
        raise SdpError(400, f"malformed SDP: {exc or type(exc).__name__}") from exc
    if not description.media:
        raise SdpError(400, "malformed SDP: no m= sections")

    summary = OfferSummary()
    for index, media in enumerate(description.media):
        if media.kind not in ACCEPTED_CODECS:
            continue
        if media.port == 0 or media.direction == "inactive":
            continue
        if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
            raise SdpError(400, f"malformed SDP: m-line {index} has no ice-ufrag/ice-pwd")
        if media.dtls is None or not media.dtls.fingerprints:
            raise SdpError(400, f"malformed SDP: m-line {index} has no DTLS fingerprint")
        wanted = ("sendonly", "sendrecv") if purpose == "publish" else ("recvonly", "sendrecv")
        if media.direction not in wanted:
            raise SdpError(
                422, f"{media.kind} m-line {index} is {media.direction}; "
                f"{'publishing' if purpose == 'publish' else 'playing'} needs {' or '.join(wanted)}"
            )
        if media.kind in summary.kinds:
            raise SdpError(422, f"offer has more than one {media.kind} m-line; one of each is served")
        codecs = [c.mimeType.lower() for c in media.rtp.codecs]
        accepted = [c for c in codecs if c in ACCEPTED_CODECS[media.kind]]
        if not accepted:
            continue
        summary.kinds[media.kind] = accepted
    if not summary.kinds:
        raise SdpError(
            422, "offer has no media we accept: need VP8 or H.264 video and/or Opus audio"
        )
    return summary
