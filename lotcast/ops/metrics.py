"""Prometheus metrics of one node, and the `/metrics` route that serves them.

Each node app owns one `NodeMetrics` with its own `CollectorRegistry` (so several nodes can run in
one test process). Hot paths must not call into prometheus-client per packet: keep plain integer
counters in the forwarding code and add them here in batches (`inc(n)`), or let `update_load()`
copy a snapshot at heartbeat time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lotcast.ops.node import NodeInfo, NodeState

# The metric the relay HPA scales on (k8s/base/relay-hpa.yaml, via prometheus-adapter).
LOAD_RATIO_METRIC = "lotcast_relay_load_ratio"

FIRST_FRAME_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
BID_ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# bits/s: a viewer on a phone's weak link (~150 kbit/s) up to a wide path for a 1080p layer
ESTIMATE_BUCKETS = (1e5, 1.5e5, 2e5, 3e5, 4e5, 5e5, 6e5, 8e5, 1e6, 1.2e6, 1.5e6, 2e6, 2.5e6,
                    3e6, 4e6, 5e6, 8e6)
ACK_WRITE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)


class NodeMetrics:
    """The metric objects of one node. Who updates what:

    - relay media path: `forwarded_packets.inc(n)`, `nacks_served.inc(n)`,
      `plis_sent_upstream.inc()`, `egress_bytes.inc(n)`, `first_frame_seconds.observe(s)` (time
      from WHEP POST to the first keyframe sent to that viewer), `viewer_estimate_bps.observe(b)`
      (each REMB a viewer sends, about one a second);
    - interactive layer: `sockets.set(n)` or inc/dec, `room_http_sessions.set(n)` (append it to
      `InteractiveService.http.count_observers`), `outbox_drops.inc()` when a message is
      dropped or a slow socket is cut for a full outbox, `bid_ack_latency_seconds.observe(s)`
      (bid received to personal ack sent);
    - telemetry (each heartbeat and scrape): `turn_viewers` / `turn_publishers`, the sessions
      whose nominated ICE pair has a relay candidate (a TURN allocation) on either side;
    - heartbeat (relay app, once per interval): `update_load(registry_snapshot)` sets viewers,
      streams, egress bits/s, capacity, load ratio and draining.
    """

    def __init__(self, node_id: str, kind: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.info = Info("lotcast_node", "This node's identity.", registry=r)
        self.info.info({"node_id": node_id, "kind": kind})
        self.viewers = Gauge("lotcast_viewers", "WHEP viewers attached to this node.", registry=r)
        self.streams = Gauge("lotcast_streams", "Streams this node carries.", registry=r)
        self.capacity = Gauge(
            "lotcast_relay_capacity", "Most viewers this node accepts (max_viewers).", registry=r
        )
        self.relay_load_ratio = Gauge(
            LOAD_RATIO_METRIC, "viewers / capacity; the relay autoscaling metric.", registry=r
        )
        self.draining = Gauge(
            "lotcast_node_draining", "1 while the node drains after SIGTERM.", registry=r
        )
        self.egress_bits_per_second = Gauge(
            "lotcast_egress_bits_per_second", "Media egress over the last interval.", registry=r
        )
        self.egress_bytes = Counter(
            "lotcast_egress_bytes", "Media bytes sent to viewers and child relays.", registry=r
        )
        self.forwarded_packets = Counter(
            "lotcast_forwarded_packets", "RTP packet copies forwarded downstream.", registry=r
        )
        self.nacks_served = Counter(
            "lotcast_nacks_served", "Packets retransmitted in answer to NACKs.", registry=r
        )
        self.send_errors = Counter(
            "lotcast_send_errors",
            "Packet copies skipped because a send failed on a live transport (the viewer stays).",
            registry=r,
        )
        self.plis_sent_upstream = Counter(
            "lotcast_plis_sent_upstream", "Keyframe requests (PLI) sent upstream.", registry=r
        )
        self.first_frame_seconds = Histogram(
            "lotcast_first_frame_seconds",
            "Time from a viewer's WHEP request to its first keyframe sent.",
            buckets=FIRST_FRAME_BUCKETS,
            registry=r,
        )
        self.viewer_estimate_bps = Histogram(
            "lotcast_viewer_estimate_bps",
            "Bandwidth estimates (REMB, bits/s) viewers report for the video we send them.",
            buckets=ESTIMATE_BUCKETS,
            registry=r,
        )
        self.turn_viewers = Gauge(
            "lotcast_turn_viewers",
            "WHEP sessions (viewers, child relays) whose media goes through a TURN server.",
            registry=r,
        )
        self.turn_publishers = Gauge(
            "lotcast_turn_publishers",
            "WHIP publishers whose media goes through a TURN server.",
            registry=r,
        )
        self.sockets = Gauge(
            "lotcast_websockets", "Open interactive WebSocket connections.", registry=r
        )
        self.room_http_sessions = Gauge(
            "lotcast_room_http_sessions",
            "Interactive sessions on the HTTP fallback transport (no WebSocket); also counted in "
            "lotcast_websockets.",
            registry=r,
        )
        self.outbox_drops = Counter(
            "lotcast_outbox_drops", "Messages dropped for a full socket outbox.", registry=r
        )
        self.bid_ack_latency_seconds = Histogram(
            "lotcast_bid_ack_latency_seconds",
            "Time from a bid received to its personal ack sent.",
            buckets=BID_ACK_BUCKETS,
            registry=r,
        )
        self.ack_write_seconds = Histogram(
            "lotcast_ack_write_seconds",
            "Time from a room Function's reply to its ack's or error's bytes in the socket's "
            "transport (waits behind fan-out or earlier frames of that socket show here).",
            buckets=ACK_WRITE_BUCKETS,
            registry=r,
        )

    def update_load(self, node: NodeInfo) -> None:
        """Copy a heartbeat snapshot into the gauges (call once per heartbeat)."""
        self.viewers.set(node.viewers)
        self.streams.set(len(node.streams))
        self.capacity.set(node.capacity)
        self.relay_load_ratio.set(node.viewers / node.capacity if node.capacity > 0 else 0.0)
        self.draining.set(1 if node.state is NodeState.DRAINING else 0)
        self.egress_bits_per_second.set(node.egress_bps)
        self.sockets.set(node.sockets)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        return Response(self.render(), media_type=CONTENT_TYPE_LATEST)

    def route(self, path: str = "/metrics") -> Route:
        """A Starlette route serving the text exposition format (GET only)."""
        return Route(path, self.endpoint, methods=["GET"], name="metrics")


@dataclass
class EgressRate:
    """Bits per second from a monotonically growing byte total, sampled at heartbeat time.

    The forwarding loop only adds to an int; the relay app calls `sample(total_bytes, now)` once
    per heartbeat and publishes the result (NodeLoad.egress_bps, NodeMetrics.update_load).
    """

    _last_bytes: int | None = None
    _last_time: float = 0.0
    bps: float = field(default=0.0)

    def sample(self, total_bytes: int, now: float) -> float:
        if self._last_bytes is not None and now > self._last_time:
            delta = max(0, total_bytes - self._last_bytes)
            self.bps = delta * 8 / (now - self._last_time)
        self._last_bytes = total_bytes
        self._last_time = now
        return self.bps
