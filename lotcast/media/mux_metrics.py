"""Prometheus series of a worker's UDP mux (lotcast/media/udpmux.py), read at scrape time.

On a node of several workers /metrics merges each worker's series under a `worker` label, so
every worker's port shows its own counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lotcast.media.udpmux import UdpMux


class UdpMuxCollector(Collector):
    """`lotcast_udp_mux_dropped_datagrams_total` (datagrams no peer connection claimed: neither
    a known remote address nor a STUN USERNAME of a connection on the mux), connections and
    bound remote addresses, and the port, of the mux ``mux()`` returns (None: nothing yet)."""

    def __init__(self, mux: Callable[[], UdpMux | None]) -> None:
        self._mux = mux

    def collect(self) -> Iterator[Metric]:
        mux = self._mux()
        dropped = CounterMetricFamily(
            "lotcast_udp_mux_dropped_datagrams",
            "Datagrams to this worker's UDP port that no peer connection claimed.")
        dropped.add_metric([], mux.dropped if mux is not None else 0)
        yield dropped
        connections = GaugeMetricFamily("lotcast_udp_mux_connections",
                                        "Peer connections served on this worker's UDP port.")
        connections.add_metric([], mux.connections() if mux is not None else 0)
        yield connections
        addresses = GaugeMetricFamily("lotcast_udp_mux_remote_addresses",
                                      "Remote addresses routed on this worker's UDP port.")
        addresses.add_metric([], mux.bound_addresses() if mux is not None else 0)
        yield addresses
        port = GaugeMetricFamily("lotcast_udp_mux_port",
                                 "The UDP port this worker serves media on (0: not open).")
        port.add_metric([], int(mux.sockname[1]) if mux is not None else 0)
        yield port
