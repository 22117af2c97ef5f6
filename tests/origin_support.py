"""Several origins (issue 13): two broadcasters and relays on one Redis, and a WHIP publisher that
goes through origin placement the way the host page does.

`PlacedPublisher` POSTs its offer to an entry origin and follows a `307` by POSTing the same offer,
with the same token, to the `Location` it was given (a WHIP client must re-send its credentials
there: HTTP clients drop Authorization on a cross-origin redirect). `publish_anywhere` is the host
page's retry: try each known origin in turn until one accepts, bounded in attempts and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urljoin

import httpx
from aiortc import RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from media_support import SECRET, Publisher, http_client

from lotcast.redis_server import RedisServer
from lotcast.supervisor import ServiceProcess

MAX_HOPS = 3


class PublishRefused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text.strip()}")
        self.status = status


class PlacedPublisher(Publisher):
    """A media_support Publisher that follows WHIP placement redirects."""

    def __init__(self, entry_url: str, stream: str, token: str, first_frame: int = 0) -> None:
        super().__init__(entry_url, stream, token, first_frame=first_frame)
        self.stream = stream
        self.hops: list[str] = []  # every URL POSTed to, in order
        self.origin_url = ""  # base URL of the origin that accepted it

    async def start(self) -> None:
        self.pc.addTrack(AudioStreamTrack())
        self.pc.addTrack(self.video)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        url = self.url
        async with http_client() as http:
            for _hop in range(MAX_HOPS):
                self.hops.append(url)
                response = await http.post(url, content=self.pc.localDescription.sdp,
                                           headers={"Content-Type": "application/sdp",
                                                    "Authorization": f"Bearer {self.token}"})
                if response.status_code != 307:
                    break
                url = urljoin(url, response.headers["Location"])
        if response.status_code != 201:
            raise PublishRefused(response.status_code, response.text)
        self.resource = urljoin(url, response.headers["Location"])
        self.origin_url = self.resource.split("/whip/")[0]
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))


async def publish_anywhere(entry_urls: list[str], stream: str, token: str, first_frame: int = 0,
                           within: float = 20.0) -> PlacedPublisher:
    """Publish through whichever origin answers (the host page's retry after its origin died)."""
    deadline = time.monotonic() + within
    errors: list[str] = []
    while time.monotonic() < deadline:
        for entry in entry_urls:
            publisher = PlacedPublisher(entry, stream, token, first_frame=first_frame)
            try:
                await publisher.start()
                return publisher
            except (PublishRefused, httpx.HTTPError) as exc:
                errors.append(f"{entry}: {exc!r}")
                await publisher.stop(delete=False)
        await asyncio.sleep(0.25)
    raise AssertionError(f"no origin accepted {stream} within {within}s: {errors[-6:]}")


@dataclass
class Origins:
    origins: list[ServiceProcess]
    env: dict[str, str]
    relays: list[ServiceProcess] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [o.url for o in self.origins]

    def by_url(self, url: str) -> ServiceProcess:
        return next(o for o in self.origins if url.startswith(o.url))

    def other(self, proc: ServiceProcess) -> ServiceProcess:
        return next(o for o in self.origins if o is not proc)


def node_id_of(index: int) -> str:
    return f"origin-{index}"


@contextlib.contextmanager
def two_origins(redis: RedisServer, relays: int = 1, heartbeat: float = 0.5,
                drain_timeout: float = 20.0) -> Iterator[Origins]:
    """Two broadcasters (node ids origin-0, origin-1) and relays whose configured origin URL is
    origin-0 (only the fallback: they find each stream's origin through its binding)."""
    env = {"LOTCAST_JWT_SECRET": SECRET, "LOTCAST_REDIS_URL": redis.url,
           "LOTCAST_LOG_LEVEL": "warning", "LOTCAST_HEARTBEAT_INTERVAL": str(heartbeat),
           "LOTCAST_DRAIN_TIMEOUT": str(drain_timeout)}
    procs: list[ServiceProcess] = []
    try:
        for i in range(2):
            procs.append(ServiceProcess("broadcaster", ["--port", "0", "--node-id", node_id_of(i)],
                                        env=env, name=node_id_of(i)).start())
        cluster = Origins(list(procs), env)
        for i in range(relays):
            relay = ServiceProcess("relay", ["--port", "0", "--origin-url", procs[0].url,
                                             "--node-id", f"relay-{i}"], env=env).start()
            procs.append(relay)
            cluster.relays.append(relay)
        yield cluster
    finally:
        for proc in reversed(procs):
            if proc.alive():
                proc.kill()
