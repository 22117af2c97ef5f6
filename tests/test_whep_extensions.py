"""WHEP extensions (draft-ietf-wish-whep) against real origin + relay processes: the Link headers
of every WHEP 201, the server-sent events stream (active, viewercount, inactive, closed with its
session) and the layer POST validation, with exact status codes for bad input."""

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
import pytest
from aiortc import RTCSessionDescription
from media_support import Publisher, Viewer, host_token, http_client, running_cluster

from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

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


async def test_sse_events_and_layer_choice_through_a_relay(redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "sse", host_token())
        await publisher.start()
        sessions: list[Session] = []
        try:
            first = await play(cluster.relay.url, "sse")
            sessions.append(first)
            # both extensions advertised, as sub-resources of the session
            assert first.sse == f"{first.viewer.resource}/sse"
            assert first.layer == f"{first.viewer.resource}/layer"
            async with http_client() as http, subscribed(
                    http, first, ["active", "inactive", "layers", "viewercount"]) as reader:
                await reader.wait("active")
                assert reader.status == 200
                assert reader.content_type.startswith("text/event-stream")
                await reader.wait("count", 1)
                layers = next(data for name, data in reader.events if name == "layers")
                # one layer without rid (no simulcast ingest yet), in the draft's shape
                assert layers["video"]["layers"] == [{"spatialLayerId": 0, "temporalLayerId": 0}]  # type: ignore[index]

                second = await play(cluster.relay.url, "sse")
                sessions.append(second)
                await reader.wait("count", 2)
                async with http_client() as other:
                    assert (await other.delete(second.viewer.resource)).status_code == 200
                await reader.wait("count", 1)
                assert reader.counts() == [1, 2, 1]

                # the viewer's layer choice: validated, stored (204)
                for body, status in [({}, 204), ({"encodingId": None}, 204),
                                     ({"spatialLayerId": 0, "temporalLayerId": 0}, 204),
                                     ({"maxSpatialLayerId": 0, "mediaId": "1"}, 204),
                                     ({"encodingId": "h"}, 400), ({"spatialLayerId": 1}, 400),
                                     ({"temporalLayerId": -1}, 400), ({"spatialLayerId": True}, 400),
                                     ({"encodingId": 3}, 400), ({"bogus": 1}, 400), ([], 400)]:
                    answer = await http.post(first.layer, json=body)
                    assert answer.status_code == status, (body, answer.status_code, answer.text)
                answer = await http.post(first.layer, json={"encodingId": "h"})
                assert answer.text == ("unknown encodingId 'h'; this stream's encodings: none "
                                       "(one layer without rid: omit encodingId)\n")

                # before media flowed the stream was inactive; then active while it played
                assert reader.names()[0] == "inactive"
                assert "inactive" not in reader.names()[reader.names().index("active"):]
                seen = len(reader.events)
                await publisher.stop()
                await reader.wait("inactive", timeout=20, after=seen)

                # the session ends: its event stream ends with it
                assert (await http.delete(first.viewer.resource)).status_code == 200
                await reader.wait("ended", timeout=10)
        finally:
            await publisher.stop()
            for session in sessions:
                await session.viewer.stop(delete=False)


async def test_extension_bad_input_exact_statuses(redis_server: RedisServer) -> None:
    with running_cluster(redis_server) as cluster:
        publisher = Publisher(cluster.origin.url, "bad", host_token())
        await publisher.start()
        session: Session | None = None
        try:
            # the origin's WHEP sessions advertise them too
            origin_session = await play(cluster.origin.url, "bad")
            assert set(origin_session.links) >= {SSE_REL, LAYER_REL}
            await origin_session.viewer.stop()
            session = await play(cluster.relay.url, "bad")
            async with http_client() as http:
                cases: list[tuple[str, str, dict[str, str], bytes, int, str]] = [
                    ("POST", session.sse, {"Content-Type": "text/plain"}, b'["active"]', 415,
                     "Content-Type must be application/json"),
                    ("POST", session.sse, {"Content-Type": "application/json"}, b"[", 400,
                     "body is not JSON"),
                    ("POST", session.sse, {"Content-Type": "application/json"}, b'{"a":1}', 400,
                     "body must be a JSON array of event names"),
                    ("POST", session.sse, {"Content-Type": "application/json"}, b"[]", 400,
                     "no event named"),
                    ("POST", session.sse, {"Content-Type": "application/json"},
                     b'["active","bogus"]', 400, "unknown event 'bogus'"),
                    ("POST", session.sse, {"Content-Type": "application/json"}, b"\xff", 400,
                     "body is not JSON"),
                    ("POST", session.sse, {"Content-Type": "application/json"},
                     b"[" + b'"active",' * 1000 + b'"active"]', 413, "body exceeds"),
                    ("PUT", session.sse, {}, b"", 405, "PUT is not supported here"),
                    ("POST", session.layer, {"Content-Type": "application/sdp"}, b"{}", 415,
                     "Content-Type must be application/json"),
                    ("POST", session.layer, {"Content-Type": "application/json"}, b"nope", 400,
                     "body is not JSON"),
                    ("GET", session.layer, {}, b"", 405, "GET is not supported here"),
                    ("POST", session.sse.replace(session.viewer.resource or "", f"{cluster.relay.url}/whep/bad/nosuch"),
                     {"Content-Type": "application/json"}, b'["active"]', 404, "no such session"),
                    ("POST", session.sse.replace("/whep/bad/", "/whep/other/"),
                     {"Content-Type": "application/json"}, b'["active"]', 404, "no such session"),
                    ("POST", session.sse.replace("/whep/bad/", "/whep/b.d/"),
                     {"Content-Type": "application/json"}, b'["active"]', 400, "stream id must"),
                    ("GET", f"{session.sse}/nosuch", {}, b"", 404, "no such event stream"),
                    ("POST", f"{session.sse}/nosuch", {}, b"", 405, "POST is not supported"),
                    ("POST", session.layer, {"Content-Type": "application/json",
                                             "Authorization": "Bearer broken"}, b"{}", 401,
                     "invalid token"),
                ]
                for method, url, headers, body, status, reason in cases:
                    answer = await http.request(method, url, headers=headers, content=body)
                    assert (answer.status_code, answer.text.startswith(reason)) == (status, True), \
                        (method, url, body[:40], answer.status_code, answer.text)
                options = await http.options(session.sse)
                assert options.status_code == 204
                assert options.headers["Accept-Post"] == "application/json"
                # an event stream closed by DELETE is gone
                created = await http.post(session.sse, json=["viewercount"])
                assert created.status_code == 201
                stream_url = urljoin(session.sse, created.headers["Location"])
                assert (await http.delete(stream_url)).status_code == 200
                assert (await http.get(stream_url)).status_code == 404
                # a session that ended has no extension resources any more
                assert (await http.delete(session.viewer.resource or "")).status_code == 200
                gone = await http.post(session.layer, json={})
                assert gone.status_code == 404
                assert (await http.post(session.sse, json=["active"])).status_code == 404
        finally:
            await publisher.stop()
            if session is not None:
                await session.viewer.stop(delete=False)
