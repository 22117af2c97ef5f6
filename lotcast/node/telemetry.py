"""Media counters of one node copied into Prometheus and the registry heartbeat.

The forwarding hot path keeps plain integer counters per TrackForwarder (packets_sent,
nack_packets_served, keyframe_requests_sent, ...). `MediaTelemetry.sample()` (called at heartbeat
time and on each /metrics scrape) adds what changed since the previous sample to the node's
monotonic totals and to the `NodeMetrics` counters. Forwarders come and go with their streams,
so deltas are kept per forwarder object.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, Gauge
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lotcast.media.aiortc_hooks import relayed_through_turn
from lotcast.media.endpoints import SessionTable
from lotcast.media.forwarder import TrackForwarder
from lotcast.media.peer import EgressSession, IngestSession, PeerSession
from lotcast.media.stream import StreamRouter
from lotcast.ops.metrics import EgressRate, NodeMetrics
from lotcast.ops.node import NodeInfo

# Per forwarded packet on the wire besides the payload: RTP header (12) + SRTP auth tag (10).
PACKET_OVERHEAD = 22


@dataclass
class _Seen:
    sent: int = 0
    nacks: int = 0
    plis: int = 0
    errors: int = 0


class MediaTelemetry:
    """Turns forwarder counters into node totals, egress bits/s and Prometheus metrics."""

    def __init__(self, router: StreamRouter, sessions: SessionTable, metrics: NodeMetrics,
                 viewers: Callable[[], int] | None = None,
                 websockets: Callable[[], int] | None = None,
                 udp_sockets: Callable[[], int] | None = None,
                 node: Callable[[], NodeInfo | None] | None = None,
                 outbox_drops: Callable[[], int] | None = None) -> None:
        self.router = router
        self.sessions = sessions
        self.metrics = metrics
        self._viewers = viewers or (lambda: sessions.count(EgressSession))
        self._websockets = websockets or (lambda: 0)
        self._udp_sockets = udp_sockets
        self._seen: dict[TrackForwarder, _Seen] = {}
        self.forwarded_packets = 0
        self.egress_bytes = 0
        self.nacks_served = 0
        self.plis_sent = 0
        self.rate = EgressRate()
        self._rate_at = 0.0
        self.udp_gauge = Gauge("lotcast_udp_sockets", "Open UDP sockets of this process.",
                               registry=metrics.registry)
        self.last_node: NodeInfo | None = None
        self._node = node
        # sockets cut for a full outbox (InteractiveStats.slow_disconnects), a running total
        self._outbox_drops = outbox_drops
        self._outbox_seen = 0

    def sample(self) -> None:
        current: dict[TrackForwarder, _Seen] = {}
        d_sent = d_bytes = d_nacks = d_plis = d_errors = 0
        for stream in self.router:
            for forwarder in stream.tracks.values():
                prev = self._seen.get(forwarder, _Seen())
                sent = forwarder.packets_sent - prev.sent
                nacks = forwarder.nack_packets_served - prev.nacks
                plis = forwarder.keyframe_requests_sent - prev.plis
                d_errors += forwarder.send_errors - prev.errors
                avg = forwarder.octets_in / forwarder.packets_in if forwarder.packets_in else 0.0
                d_sent += sent
                d_nacks += nacks
                d_plis += plis
                d_bytes += int((sent + nacks) * (avg + PACKET_OVERHEAD))
                current[forwarder] = _Seen(forwarder.packets_sent, forwarder.nack_packets_served,
                                           forwarder.keyframe_requests_sent, forwarder.send_errors)
        self._seen = current
        self.forwarded_packets += d_sent
        self.egress_bytes += d_bytes
        self.nacks_served += d_nacks
        self.plis_sent += d_plis
        m = self.metrics
        if self._outbox_drops is not None:
            drops = self._outbox_drops()
            if drops > self._outbox_seen:
                m.outbox_drops.inc(drops - self._outbox_seen)
            self._outbox_seen = drops
        if d_sent:
            m.forwarded_packets.inc(d_sent)
        if d_bytes:
            m.egress_bytes.inc(d_bytes)
        if d_nacks:
            m.nacks_served.inc(d_nacks)
        if d_plis:
            m.plis_sent_upstream.inc(d_plis)
        if d_errors:
            m.send_errors.inc(d_errors)

    def egress_bps(self, min_interval: float = 0.5) -> float:
        """Sample the counters and return the egress rate over at least `min_interval` seconds
        (extra heartbeats published on a viewer join reuse the last rate)."""
        self.sample()
        now = time.monotonic()
        if now - self._rate_at >= min_interval:
            self._rate_at = now
            self.rate.sample(self.egress_bytes, now)
        return self.rate.bps

    def refresh_gauges(self, node: NodeInfo | None = None) -> None:
        if node is not None:
            self.last_node = node
            self.metrics.update_load(node)
        m = self.metrics
        m.viewers.set(self._viewers())
        m.streams.set(len(self.router))
        m.sockets.set(self._websockets())
        m.turn_viewers.set(self._through_turn(EgressSession))
        m.turn_publishers.set(self._through_turn(IngestSession))
        if self.last_node is not None and self.last_node.capacity > 0:
            m.relay_load_ratio.set(self._viewers() / self.last_node.capacity)
        if self._udp_sockets is not None:
            self.udp_gauge.set(self._udp_sockets())

    def _through_turn(self, kind: type[PeerSession]) -> int:
        return sum(1 for s in self.sessions.sessions(kind) if relayed_through_turn(s.pc))

    def render(self, node: NodeInfo | None = None) -> bytes:
        """The exposition text, counters and gauges brought up to date first."""
        self.sample()
        self.refresh_gauges(node if node is not None
                            else self._node() if self._node is not None else None)
        return self.metrics.render()

    async def endpoint(self, request: Request) -> Response:
        return Response(self.render(), media_type=CONTENT_TYPE_LATEST)

    def route(self) -> Route:
        return Route("/metrics", self.endpoint, methods=["GET"])
