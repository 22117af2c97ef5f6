"""A real relay's /metrics reflects what it did: viewers, forwarded packets, first frames and
bid ack latency."""

from __future__ import annotations

import pytest
from media_support import SECRET, Publisher, Viewer, host_token, http_client, running_cluster

from lotcast.auth import Role, TokenAuthority
from lotcast.interactive.client import HttpRoomClient, RoomClient
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_relay_metrics_count_bids_viewers_and_packets(redis_server: RedisServer) -> None:
    authority = TokenAuthority(SECRET)
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "metered", host_token())
        await publisher.start()
        viewer = Viewer(cluster.relay.url, "metered")
        await viewer.start()
        host = RoomClient(cluster.origin.url, "metered", authority.mint(Role.HOST, "host", "Host"))
        bidder = RoomClient(cluster.relay.url, "metered", authority.mint(Role.BIDDER, "b1", "B1"))
        try:
            await viewer.wait_frames(10, timeout=30)
            await host.connect()
            await bidder.connect()
            lot = (await host.request("lot_create", title="Lamp", start_price=100,
                                      increments=[[0, 10]], duration_ms=60000,
                                      soft_close_ms=1000))["lot"]
            await host.request("lot_open", lot=lot)
            for amount in (100, 110, 120):
                assert (await bidder.request("bid", lot=lot, amount=amount))["status"] == "winning"
            async with http_client() as http:
                text = (await http.get(f"{cluster.relay.url}/metrics")).text
            assert sample(text, "lotcast_bid_ack_latency_seconds_count") == 3
            # each bid's ack: from its Function's reply to its bytes in the socket's transport
            assert sample(text, "lotcast_ack_write_seconds_count") == 3
            assert sample(text, "lotcast_first_frame_seconds_count") >= 1
        finally:
            await host.close()
            await bidder.close()
            await viewer.stop()
            await publisher.stop()



async def test_every_node_counts_its_http_fallback_room_sessions(redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        for node in (cluster.origin, cluster.relay):
            client = HttpRoomClient(node.url, "fallback")
            await client.connect()
            try:
                async with http_client() as http:
                    text = (await http.get(f"{node.url}/metrics")).text
                assert sample(text, "lotcast_room_http_sessions") == 1, node.url
            finally:
                await client.close()
