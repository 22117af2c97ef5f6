"""WHEP extensions (draft-ietf-wish-whep) against real origin + relay processes: the Link headers
of every WHEP 201, the server-sent events stream (active, viewercount, inactive, closed with its
session) and the layer POST validation, with exact status codes for bad input."""

from __future__ import annotations

from urllib.parse import urljoin

import pytest
from media_support import Publisher, host_token, http_client, running_cluster
from sse_support import LAYER_REL, SSE_REL, Session, play, subscribed

from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)


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

                # the stream opens with the session's current state (inactive before its media
                # flowed, active if the subscription came after: a loaded machine), then stays
                # active while it plays
                assert reader.names()[0] in ("inactive", "active"), reader.names()
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
                    ("POST", f"{cluster.relay.url}/whep/bad/nosuch/sse",
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
