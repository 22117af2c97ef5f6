"""The broadcaster (origin) on one UDP port (`--udp-port`), as relays are: its WHIP publishers
(aiortc and GStreamer's webrtcbin, a second WebRTC stack) and the relays pulling from it all go
through the one socket, so a k8s origin needs no hostNetwork and no UDP range.

Real processes: a broadcaster with --udp-port, a relay without, an aiortc publisher, a GStreamer
publisher, aiortc viewers on the relay decoding both streams."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from gst_support import FrameViewer, GstPublisher
from media_support import Publisher, Viewer, host_token, http_client, running_cluster

from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(180)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _stats(base_url: str) -> dict[str, Any]:
    async with http_client() as http:
        response = await http.get(f"{base_url}/api/stats")
        assert response.status_code == 200, response.text
        return dict(response.json())


async def _mux_metric(base_url: str, name: str) -> float:
    async with http_client() as http:
        text = (await http.get(f"{base_url}/metrics")).text
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name) and not line.startswith("#")]
    assert values, f"{name} missing from the origin's /metrics"
    return sum(values)


async def test_origin_serves_publishers_and_relay_pulls_through_one_udp_port(
        redis_server: RedisServer) -> None:
    port = _free_udp_port()
    with running_cluster(redis_server, origin_args=["--udp-port", str(port)]) as cluster:
        publisher = Publisher(cluster.origin.url, "mux-aiortc", host_token())
        gst = GstPublisher(f"{cluster.origin.url}/whip/mux-gst", host_token(), "vp8")
        viewers: list[Viewer] = []
        try:
            await publisher.start()
            # the origin's answer carries the mux port as its host candidate
            answer = publisher.pc.remoteDescription.sdp
            assert f"127.0.0.1 {port} typ host" in answer, answer
            gst.start()
            await gst.wait_connected(timeout=40)

            aiortc_viewer = Viewer(cluster.relay.url, "mux-aiortc")
            gst_viewer = FrameViewer(cluster.relay.url, "mux-gst")
            viewers += [aiortc_viewer, gst_viewer]
            await asyncio.gather(aiortc_viewer.start(), gst_viewer.start())
            await aiortc_viewer.wait_frames(30, timeout=60)
            await gst_viewer.wait_frames(30, timeout=60)
            assert gst_viewer.audio_frames > 0, "no audio decoded from the GStreamer publisher"

            # one UDP socket on the origin for two publishers and the relay's two pulls
            origin = await _stats(cluster.origin.url)
            assert origin["udp_sockets"] == 1, origin
            routed = await _mux_metric(cluster.origin.url, "lotcast_udp_mux_connections")
            assert routed >= 4, routed  # 2 publishers + 2 relay pulls, each routed on the mux
            # the relay (no --udp-port) still has a socket per pull
            relay = await _stats(cluster.relay.url)
            assert relay["udp_sockets"] >= 4, relay  # 2 pulls + 2 viewers' own
        except BaseException:
            print(gst.describe())
            for proc in [cluster.origin, *cluster.relays]:
                print(f"--- {proc.command} ---\n" + "".join(proc.output[-40:]))
            raise
        finally:
            for viewer in viewers:
                await viewer.stop()
            gst.stop()
            await publisher.stop()


async def test_origin_refuses_to_start_on_a_taken_udp_port(redis_server: RedisServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = int(taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="exited before ready") as failed:
            with running_cluster(redis_server, relays=0, origin_args=["--udp-port", str(port)]):
                pass
    assert "address already in use" in str(failed.value).lower(), failed.value
