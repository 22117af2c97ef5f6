"""`lotcast up --origins 2` (issue 13): two broadcasters, both in the registry as origins, both
answering WHIP placement with the same pair of origins, and streams spread over them."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from origin_support import PlacedPublisher
from up_support import UpProcess

from lotcast.auth import Role
from lotcast.ops.registry import read_live_nodes

SECOND = re.compile(r"^\s+broadcaster-1:\s+(\S+) \(pid (\d+)", re.M)


@pytest.mark.timeout(120)
async def test_up_with_two_origins_places_streams_on_both(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "data", relays=1, args=["--origins", "2"]).start()
    try:
        second = SECOND.search(up.text())
        assert second is not None, up.text()
        urls = sorted([up.urls["broadcaster"], second.group(1)])
        redis = aioredis.Redis.from_url(up.urls["redis"])
        try:
            nodes = [n for n in await read_live_nodes(redis) if n.kind == "broadcaster"]
        finally:
            await redis.aclose()
        assert sorted(n.node_id for n in nodes) == ["origin-0", "origin-1"]
        assert sorted(n.url for n in nodes) == urls
        async with httpx.AsyncClient(timeout=10) as http:
            for url in urls:
                r = await http.get(f"{url}/api/streams/main/ingest")
                assert r.status_code == 200, r.text
                assert sorted(r.json()["origins"]) == urls
        token = up.authority().mint(Role.HOST, "host", "Host")
        publishers = [PlacedPublisher(up.urls["broadcaster"], f"show-{i}", token) for i in range(2)]
        try:
            for p in publishers:
                await p.start()
            assert sorted(p.origin_url for p in publishers) == urls
        finally:
            for p in publishers:
                await p.stop()
    finally:
        up.close()
