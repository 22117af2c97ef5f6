"""NodeMetrics: every required metric is exposed on /metrics, per-node registries stay apart."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from lotcast.ops.metrics import LOAD_RATIO_METRIC, EgressRate, NodeMetrics
from lotcast.ops.node import NodeInfo, NodeState

pytestmark = pytest.mark.timeout(10)

REQUIRED = {
    "lotcast_viewers": "gauge",
    "lotcast_streams": "gauge",
    "lotcast_egress_bits_per_second": "gauge",
    "lotcast_forwarded_packets": "counter",
    "lotcast_nacks_served": "counter",
    "lotcast_plis_sent_upstream": "counter",
    "lotcast_first_frame_seconds": "histogram",
    "lotcast_websockets": "gauge",
    "lotcast_outbox_drops": "counter",
    "lotcast_bid_ack_latency_seconds": "histogram",
    "lotcast_ack_write_seconds": "histogram",
    LOAD_RATIO_METRIC: "gauge",
    "lotcast_relay_capacity": "gauge",
    "lotcast_node_draining": "gauge",
}


def families(text: str) -> dict[str, tuple[str, dict[str, float]]]:
    out: dict[str, tuple[str, dict[str, float]]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = (fam.type, {s.name: s.value for s in fam.samples if not s.labels
                                    or "le" not in s.labels})
    return out


async def test_metrics_route_serves_every_required_metric() -> None:
    metrics = NodeMetrics("relay-0", "relay")
    metrics.update_load(NodeInfo(node_id="relay-0", url="u", state=NodeState.DRAINING,
                                 viewers=30, capacity=120, egress_bps=4.5e7,
                                 streams={"a": 0, "b": 1}, sockets=12))
    metrics.forwarded_packets.inc(1000)
    metrics.nacks_served.inc(3)
    metrics.plis_sent_upstream.inc()
    metrics.first_frame_seconds.observe(0.21)
    metrics.bid_ack_latency_seconds.observe(0.004)
    metrics.outbox_drops.inc(2)
    app = Starlette(routes=[metrics.route()])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as client:
        resp = await client.get("/metrics")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        assert (await client.post("/metrics")).status_code == 405
    fams = families(resp.text)
    for name, kind in REQUIRED.items():
        assert name in fams, name
        assert fams[name][0] == kind, name
    assert fams[LOAD_RATIO_METRIC][1][LOAD_RATIO_METRIC] == pytest.approx(0.25)
    assert fams["lotcast_viewers"][1]["lotcast_viewers"] == 30
    assert fams["lotcast_streams"][1]["lotcast_streams"] == 2
    assert fams["lotcast_node_draining"][1]["lotcast_node_draining"] == 1
    assert fams["lotcast_websockets"][1]["lotcast_websockets"] == 12
    assert fams["lotcast_forwarded_packets"][1]["lotcast_forwarded_packets_total"] == 1000
    assert fams["lotcast_first_frame_seconds"][1]["lotcast_first_frame_seconds_count"] == 1
    assert "process_cpu_seconds" in fams
    assert 'node_id="relay-0"' in resp.text


def test_two_nodes_in_one_process_do_not_collide() -> None:
    a, b = NodeMetrics("a", "relay"), NodeMetrics("b", "broadcaster")
    a.viewers.set(5)
    assert b"lotcast_viewers 0.0" in b.render()
    assert b"lotcast_viewers 5.0" in a.render()


def test_zero_capacity_load_ratio_is_zero() -> None:
    m = NodeMetrics("o", "broadcaster")
    m.update_load(NodeInfo(node_id="o", url="u", kind="broadcaster", viewers=3, capacity=0))
    assert b"lotcast_relay_load_ratio 0.0" in m.render()


def test_egress_rate() -> None:
    rate = EgressRate()
    assert rate.sample(1000, 10.0) == 0.0  # first sample is the baseline
    assert rate.sample(1000 + 125_000, 11.0) == pytest.approx(1_000_000)
    assert rate.sample(1000 + 125_000, 11.0) == pytest.approx(1_000_000)  # no time passed
    assert rate.sample(0, 12.0) == 0.0  # counter reset never goes negative
