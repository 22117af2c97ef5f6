"""A viewer's PLI soon after it started on a layer (joined, switched, resumed) is answered by
sending it that key frame again, under the numbers it was sent, instead of asking the publisher
for a key frame every viewer of the layer would get (issue 11: "the host's encoder gets no more
key-frame requests than one per layer switch", with the switched viewer's path still lossy).
Relay pulls' PLIs always go upstream (they ask for their own joining viewers)."""

from __future__ import annotations

import pytest
from test_simulcast_parts import feed, seq_ts, simulcast, tag_of

from lotcast.media import forwarder as forwarder_module

pytestmark = pytest.mark.timeout(30)


async def test_a_switched_viewer_pli_gets_its_key_frame_again_then_the_source_is_asked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder_module, "KEYFRAME_REQUEST_INTERVAL", 0.0)
    layers, sink, sender = simulcast()
    h, m = layers["h"], layers["m"]
    await feed(h, h.frame_packets())
    await feed(m, m.frame_packets())
    m.forwarder.switch_in(sink, h.forwarder)
    await feed(m, m.frame_packets())  # m's key frame (asked for by the switch)
    await feed(m, m.frame_packets())
    assert m.forwarder.sinks() == [sink]
    start = next(i for i, d in enumerate(sender.sent) if tag_of(d).startswith("m"))
    keyframe = sender.sent[start:start + 2]
    assert tag_of(keyframe[0]).endswith("K") and keyframe[1][1] & 0x80
    asked = m.requests
    sent = len(sender.sent)
    m.forwarder.request_keyframe_for(sink)
    again = sender.sent[sent:]
    # the two packets of its key frame, same numbers and timestamps, nothing asked upstream
    assert [seq_ts(d) for d in again] == [seq_ts(d) for d in keyframe], again
    assert [tag_of(d) for d in again] == [tag_of(d) for d in keyframe]
    assert m.requests == asked and m.forwarder.keyframe_resends == 1
    # asking again at once (before the resend could arrive): dropped
    m.forwarder.request_keyframe_for(sink)
    assert len(sender.sent) == sent + 2 and m.requests == asked
    monkeypatch.setattr(forwarder_module, "RESEND_SPACING_S", 0.0)
    m.forwarder.request_keyframe_for(sink)  # the second and last resend
    assert len(sender.sent) == sent + 4 and m.requests == asked
    m.forwarder.request_keyframe_for(sink)  # still broken: the source is asked
    assert m.requests == asked + 1 and m.forwarder.keyframe_resends == 2


async def test_a_pli_long_after_the_start_or_after_a_newer_key_frame_goes_upstream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder_module, "KEYFRAME_REQUEST_INTERVAL", 0.0)
    layers, sink, sender = simulcast()
    h = layers["h"]
    await feed(h, h.frame_packets())  # its first key frame: it joined on it
    await feed(h, h.frame_packets())
    asked = h.requests
    monkeypatch.setattr(forwarder_module, "KEYFRAME_RESEND_WINDOW_S", -1.0)  # long ago
    h.forwarder.request_keyframe_for(sink)
    assert h.requests == asked + 1 and h.forwarder.keyframe_resends == 0
    monkeypatch.setattr(forwarder_module, "KEYFRAME_RESEND_WINDOW_S", 2.0)
    await feed(h, h.frame_packets())  # the key frame that request brought: not its start
    sent = len(sender.sent)
    h.forwarder.request_keyframe_for(sink)
    assert h.requests == asked + 2 and len(sender.sent) == sent


async def test_a_relay_pull_pli_always_goes_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder_module, "KEYFRAME_REQUEST_INTERVAL", 0.0)
    layers, sink, sender = simulcast()
    sink.fixed_layer = True
    h = layers["h"]
    await feed(h, h.frame_packets())
    asked, sent = h.requests, len(sender.sent)
    h.forwarder.request_keyframe_for(sink)
    assert h.requests == asked + 1 and len(sender.sent) == sent
