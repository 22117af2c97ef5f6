"""ICE consent freshness on one clock per process (lotcast/media/consent.py): the checks are
the bytes aioice would send, real aiortc viewers of a relay answer them (aioice's own consent
task no longer runs), and a viewer that stops answering is closed after CONSENT_FAILURES missed
checks while the other keeps playing. LOTCAST_CONSENT_INTERVAL_S shortens the interval."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from aioice import stun
from aioice.candidate import candidate_priority
from media_support import Publisher, Viewer, host_token, http_client, running_cluster

from lotcast.media.aiortc_hooks import ignore_binding_requests
from lotcast.media.stun_fast import binding_request
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(150)

INTERVAL_S = 0.4


@pytest.mark.parametrize("controlling", [True, False])
def test_consent_check_is_the_request_aioice_sends(controlling: bool) -> None:
    transaction_id = os.urandom(12)
    expected = stun.Message(message_method=stun.Method.BINDING,
                            message_class=stun.Class.REQUEST, transaction_id=transaction_id)
    expected.attributes["USERNAME"] = "remoteufrag:loc"  # an odd length: padded
    expected.attributes["PRIORITY"] = candidate_priority(1, "prflx")
    expected.attributes["ICE-CONTROLLING" if controlling else "ICE-CONTROLLED"] = 0xFEDCBA9876543210
    expected.add_message_integrity(b"the-peers-ice-password")
    ours = binding_request(transaction_id, "remoteufrag:loc", candidate_priority(1, "prflx"),
                           controlling, 0xFEDCBA9876543210, b"the-peers-ice-password")
    assert ours == bytes(expected)
    parsed = stun.parse_message(ours)
    assert parsed.check_message_integrity(b"the-peers-ice-password")


async def _stats(url: str) -> dict[str, Any]:
    async with http_client() as http:
        response = await http.get(f"{url}/api/stats")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def _until(url: str, check: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = await _stats(url)
        if check(stats):
            return stats
        assert time.monotonic() < deadline, f"{what}: {stats}"
        await asyncio.sleep(0.2)


async def test_relay_checks_every_viewer_on_one_clock_and_lets_a_silent_one_go(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOTCAST_CONSENT_INTERVAL_S", str(INTERVAL_S))
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "consent", host_token())
        await publisher.start()
        staying, leaving = Viewer(cluster.relay.url, "consent"), Viewer(cluster.relay.url, "consent")
        try:
            await asyncio.gather(staying.start(), leaving.start())
            await asyncio.gather(staying.wait_frames(10, timeout=40),
                                 leaving.wait_frames(10, timeout=40))
            # both on the clock, both answering (aiortc viewers answer with aioice)
            stats = await _until(cluster.relay.url,
                                 lambda s: s["consent_connections"] == 2
                                 and s["consent_checks_answered"] >= 6, 30,
                                 "both viewers' checks answered")
            assert stats["consent_expired"] == 0, stats
            answered = stats["consent_checks_answered"]

            # one viewer stops answering: its checks go missing, and after CONSENT_FAILURES in a
            # row (a few intervals here; 30 s at the default) the relay closes its session
            ignore_binding_requests(leaving.pc.getTransceivers()[0].receiver.transport)
            stats = await _until(cluster.relay.url,
                                 lambda s: s["consent_expired"] == 1 and s["viewers"] == 1, 30,
                                 "the silent viewer's consent expired and its session closed")
            assert stats["consent_checks_missed"] >= 6, stats
            assert stats["consent_connections"] == 1, stats
            # the other went on answering, and playing
            assert stats["consent_checks_answered"] > answered, stats
            frames = len(staying.counters)
            await staying.wait_frames(frames + 15, timeout=20)
        finally:
            await staying.stop()
            await leaving.stop()
            await publisher.stop()
