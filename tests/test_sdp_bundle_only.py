"""An m-line offered bundle-only (port 0 + a=bundle-only, RFC 8843) is live media on the group's
transport, as GStreamer's webrtcbin offers it with max-bundle; a plain port-0 line is rejected."""

from __future__ import annotations

import pytest
from aiortc.mediastreams import AudioStreamTrack

from lotcast.media.aiortc_hooks import new_peer_connection
from lotcast.media.sdp import SdpError, check_offer
from lotcast.media.testsource import CounterVideoTrack

pytestmark = pytest.mark.timeout(30)

TRANSPORT_ATTRS = ("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:", "a=setup:", "a=candidate:",
                   "a=end-of-candidates", "a=rtcp-mux")


async def _offer() -> str:
    pc = new_peer_connection()
    pc.addTrack(CounterVideoTrack())
    pc.addTrack(AudioStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


def _second_section_port_zero(sdp: str, bundle_only: bool) -> str:
    lines = sdp.splitlines()
    m_lines = [i for i, line in enumerate(lines) if line.startswith("m=")]
    second = m_lines[1]
    parts = lines[second].split(" ")
    parts[1] = "0"
    out = [*lines[:second], " ".join(parts)]
    if bundle_only:
        out.append("a=bundle-only")
    out += [line for line in lines[second + 1:]
            if not any(line.startswith(attr) for attr in TRANSPORT_ATTRS)]
    return "\r\n".join(out) + "\r\n"


async def test_bundle_only_m_line_is_served() -> None:
    offer = _second_section_port_zero(await _offer(), bundle_only=True)
    summary = check_offer(offer, "publish")
    assert set(summary.kinds) == {"video", "audio"}


async def test_port_zero_without_bundle_only_in_the_group_is_refused() -> None:
    offer = _second_section_port_zero(await _offer(), bundle_only=False)
    with pytest.raises(SdpError) as caught:
        check_offer(offer, "publish")
    assert caught.value.status == 400 and "rejected (port 0)" in caught.value.reason
