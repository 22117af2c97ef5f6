"""Stream -> origin bindings in a real Redis (lotcast/ops/origins.py): atomic claims, take-over
only from the named holder, refresh and compare-and-delete."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from lotcast import keys
from lotcast.ops.origins import StreamBindings


@pytest.mark.timeout(30)
async def test_concurrent_claims_from_many_origins_have_one_winner(
        redis_client: aioredis.Redis) -> None:
    origins = [StreamBindings(redis_client, f"origin-{i}", ttl=5.0) for i in range(8)]
    claims = await asyncio.gather(*(o.claim("race") for o in origins for _ in range(5)))
    winners = {c.holder for c in claims if c.mine}
    assert len(winners) == 1
    (winner,) = winners
    assert {c.holder for c in claims} == {winner}
    assert (await redis_client.get(keys.stream_origin("race"))) == winner.encode()
    ttl = await redis_client.pttl(keys.stream_origin("race"))
    assert 0 < ttl <= 5000


@pytest.mark.timeout(30)
async def test_take_over_release_and_refresh(redis_client: aioredis.Redis) -> None:
    a = StreamBindings(redis_client, "origin-a", ttl=5.0)
    b = StreamBindings(redis_client, "origin-b", ttl=5.0)
    assert (await a.claim("s")).mine
    # b may take it only from the holder it names
    refused = await b.claim("s", take_over="origin-c")
    assert not refused.mine and refused.holder == "origin-a"
    assert (await b.claim("s", take_over="origin-a")).mine
    assert await a.refresh() == ["s"]  # a learns it lost the stream
    assert a.held == set()
    await a.release("s")  # compare-and-delete: b's binding stays
    assert await b.holder("s") == "origin-b"
    await redis_client.pexpire(keys.stream_origin("s"), 100)
    assert await b.refresh() == []
    assert await redis_client.pttl(keys.stream_origin("s")) > 1000  # refreshed to the TTL
    await b.release("s")
    assert await b.holder("s") is None
