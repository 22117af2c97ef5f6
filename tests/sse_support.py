"""WHEP extension clients for tests: a viewer that keeps its 201's Link header, and a reader of
a server-sent events stream (draft-ietf-wish-whep)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urljoin

import httpx
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from media_support import Viewer, http_client

SSE_REL = "urn:ietf:params:whep:ext:core:server-sent-events"
LAYER_REL = "urn:ietf:params:whep:ext:core:layer"


@dataclass
class Session:
    viewer: Viewer
    links: dict[str, str]  # rel -> absolute URL

    @property
    def sse(self) -> str:
        return self.links[SSE_REL]

    @property
    def layer(self) -> str:
        return self.links[LAYER_REL]


def parse_links(header: str, base: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in re.split(r",(?=\s*<)", header):
        m = re.match(r"\s*<([^>]+)>(.*)", part)
        rel = re.search(r'rel="([^"]+)"', m.group(2)) if m else None
        if m and rel:
            out[rel.group(1)] = urljoin(base, m.group(1))
    return out


async def play(base_url: str, stream: str) -> Session:
    """A WHEP viewer (as media_support.Viewer.start) that keeps the 201's Link header."""
    viewer = Viewer(base_url, stream)
    viewer.pc.addTransceiver("audio", direction="recvonly")
    viewer.pc.addTransceiver("video", direction="recvonly")

    @viewer.pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        consume = viewer._video if track.kind == "video" else viewer._audio
        viewer._tasks.append(asyncio.ensure_future(consume(track)))

    await viewer.pc.setLocalDescription(await viewer.pc.createOffer())
    async with http_client() as http:
        response = await http.post(viewer.url, content=viewer.pc.localDescription.sdp,
                                   headers={"Content-Type": "application/sdp"})
    assert response.status_code == 201, (response.status_code, response.text)
    viewer.resource = urljoin(str(response.url), response.headers["Location"])
    await viewer.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    return Session(viewer, parse_links(response.headers.get("Link", ""), viewer.resource))


@dataclass
class EventReader:
    """Reads one text/event-stream into (event, data) pairs."""

    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    status: int | None = None
    content_type: str = ""
    ended: bool = False

    async def run(self, http: httpx.AsyncClient, url: str) -> None:
        async with http.stream("GET", url, timeout=httpx.Timeout(60, read=None)) as response:
            self.status = response.status_code
            self.content_type = response.headers.get("content-type", "")
            name = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line[len("event: "):]
                elif line.startswith("data: "):
                    self.events.append((name, json.loads(line[len("data: "):])))
        self.ended = True

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def counts(self) -> list[int]:
        return [int(str(data["viewercount"])) for name, data in self.events
                if name == "viewercount"]

    async def wait(self, check: str, predicate: object = None, timeout: float = 20,
                   after: int = 0) -> None:
        """Until the stream ended, the last viewercount is ``predicate``, or an event named
        ``check`` arrived at index ``after`` or later."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check == "ended" and self.ended:
                return
            if check == "count" and predicate in self.counts()[-1:]:
                return
            if check not in ("ended", "count") and check in self.names()[after:]:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {check} {predicate or ''} within {timeout}s: {self.events}")


@contextlib.asynccontextmanager
async def subscribed(http: httpx.AsyncClient, session: Session,
                     events: list[str]) -> AsyncIterator[EventReader]:
    response = await http.post(session.sse, json=events)
    assert response.status_code == 201, (response.status_code, response.text)
    url = urljoin(session.sse, response.headers["Location"])
    reader = EventReader()
    task = asyncio.ensure_future(reader.run(http, url))
    try:
        yield reader
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await task
