"""aiortc publishers and viewers that talk WHIP/WHEP to real lotcast processes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urljoin

import httpx
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack

from lotcast.auth import Role, TokenAuthority
from lotcast.media.aiortc_hooks import drop_incoming_rtp, negotiated_codecs, restrict_host_addresses
from lotcast.media.testsource import CounterVideoTrack, decode_delay_ms, read
from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess

SECRET = "test-secret-0123456789-0123456789-abcdef"
restrict_host_addresses(["127.0.0.1"])


def http_client() -> httpx.AsyncClient:
    # Loopback HTTP only: skip building a TLS context, which costs ~100 ms per client here.
    return httpx.AsyncClient(verify=False, trust_env=False, timeout=30)


def host_token(ttl: float = 3600) -> str:
    return TokenAuthority(SECRET).mint(Role.HOST, "host", "Host", ttl)


@dataclass
class Cluster:
    origin: ServiceProcess
    env: dict[str, str]
    relays: list[ServiceProcess] = field(default_factory=list)
    extra: list[ServiceProcess] = field(default_factory=list)  # started by a test; stopped here

    @property
    def relay(self) -> ServiceProcess:
        return self.relays[0]


@contextlib.contextmanager
def running_cluster(redis: RedisServer, relays: int = 1, relay_args: list[str] | None = None,
                    origin_args: list[str] | None = None) -> Iterator[Cluster]:
    env = {"LOTCAST_JWT_SECRET": SECRET, "LOTCAST_REDIS_URL": redis.url, "LOTCAST_LOG_LEVEL": "warning"}
    procs: list[ServiceProcess] = []
    cluster: Cluster | None = None
    try:
        origin = ServiceProcess("broadcaster", ["--port", "0", *(origin_args or [])], env=env).start()
        procs.append(origin)
        cluster = Cluster(origin, env)
        for i in range(relays):
            relay = ServiceProcess("relay", ["--port", "0", "--origin-url", origin.url,
                                             "--node-id", f"relay-{i}", *(relay_args or [])],
                                   env=env).start()
            procs.append(relay)
            cluster.relays.append(relay)
        yield cluster
    finally:
        for proc in [*procs, *(cluster.extra if cluster else [])][::-1]:
            proc.stop()


class Publisher:
    """An aiortc WHIP client publishing a frame-counter video and a tone."""

    def __init__(self, base_url: str, stream: str, token: str, fps: int = 30,
                 first_frame: int = 0) -> None:
        self.url = f"{base_url}/whip/{stream}"
        self.token = token
        self.video = CounterVideoTrack(fps, first=first_frame)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.resource: str | None = None

    async def start(self) -> None:
        self.pc.addTrack(AudioStreamTrack())
        self.pc.addTrack(self.video)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http_client() as http:
            response = await http.post(self.url, content=self.pc.localDescription.sdp,
                                       headers={"Content-Type": "application/sdp",
                                                "Authorization": f"Bearer {self.token}"})
        assert response.status_code == 201, (response.status_code, response.text)
        self.resource = urljoin(self.url, response.headers["Location"])
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))

    async def stop(self, delete: bool = True) -> None:
        if delete and self.resource:
            async with http_client() as http:
                await http.delete(self.resource, headers={"Authorization": f"Bearer {self.token}"})
        await self.pc.close()


class Viewer:
    """An aiortc WHEP client that decodes video (reading painted counters) and counts audio."""

    def __init__(self, base_url: str, stream: str,
                 offer_filter: Callable[[str], str] | None = None) -> None:
        self.url = f"{base_url}/whep/{stream}"
        self.offer_filter = offer_filter  # what the server gets instead of aiortc's own offer
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.resource: str | None = None
        self.counters: list[int] = []
        self.delays_ms: list[float] = []
        self.audio_frames = 0
        self.started_at = 0.0
        self.first_frame_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.status: int | None = None
        self.retry_after: str | None = None

    async def start(self, expect: int = 201) -> None:
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            consume = self._video if track.kind == "video" else self._audio
            self._tasks.append(asyncio.ensure_future(consume(track)))

        self.started_at = time.monotonic()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription.sdp
        if self.offer_filter is not None:
            offer = self.offer_filter(offer)
        async with http_client() as http:
            response = await http.post(self.url, content=offer,
                                       headers={"Content-Type": "application/sdp"},
                                       follow_redirects=True)
        self.status = response.status_code
        self.retry_after = response.headers.get("Retry-After")
        assert response.status_code == expect, (response.status_code, response.text)
        if expect != 201:
            await self.pc.close()
            return
        self.resource = urljoin(str(response.url), response.headers["Location"])
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))

    async def _video(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                counter, wall_ms = read(frame)  # type: ignore[arg-type]
                if self.first_frame_at is None:
                    self.first_frame_at = time.monotonic()
                self.counters.append(counter)
                self.delays_ms.append(decode_delay_ms(wall_ms))

    async def _audio(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                await track.recv()
                self.audio_frames += 1

    async def wait_frames(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.counters) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(self.counters) >= count, f"decoded {len(self.counters)} of {count} frames"

    async def stop(self, delete: bool = True) -> None:
        if delete and self.resource:
            async with http_client() as http:
                await http.delete(self.resource)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()


def assert_in_order(counters: list[int]) -> None:
    """Frames decoded are the publisher's, increasing (gaps allowed, no repeats or reordering)."""
    assert counters, "no frames decoded"
    assert all(b > a for a, b in itertools.pairwise(counters)), counters[:50]


@contextlib.asynccontextmanager
async def viewers(base_url: str, stream: str, n: int) -> AsyncIterator[list[Viewer]]:
    group = [Viewer(base_url, stream) for _ in range(n)]
    try:
        await asyncio.gather(*(v.start() for v in group))
        yield group
    finally:
        await asyncio.gather(*(v.stop() for v in group), return_exceptions=True)


@dataclass
class VideoLoss:
    """Sequence numbers a viewer lost (every 20th video packet, once) and got back by NACK."""

    dropped: set[int] = field(default_factory=set)
    recovered: set[int] = field(default_factory=set)  # the retransmission, byte-identical header


def lose_every_20th_video_packet_once(viewer: Viewer) -> VideoLoss:
    """Fault injection: the viewer's network loses every 20th video packet the first time."""
    video = next(t for t in viewer.pc.getTransceivers() if t.kind == "video")
    video_pt = negotiated_codecs(video)[0].payloadType
    loss = VideoLoss()

    def lose(packet: bytes) -> bool:
        if packet[1] & 0x7F != video_pt:
            return False
        seq = int.from_bytes(packet[2:4], "big")
        if seq in loss.dropped:
            loss.recovered.add(seq)
            return False
        if seq % 20 == 0:
            loss.dropped.add(seq)
            return True
        return False

    drop_incoming_rtp(video.receiver.transport, lose)
    return loss
