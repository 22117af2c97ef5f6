"""WHEP extensions (draft-ietf-wish-whep): server-sent events and layer selection.

Every WHEP session's 201 advertises two links, both sub-resources of the session URL:

    <{session}/sse>;   rel="urn:ietf:params:whep:ext:core:server-sent-events"; events="..."
    <{session}/layer>; rel="urn:ietf:params:whep:ext:core:layer"

- ``POST {session}/sse`` with a JSON array of event names -> 201, ``Location: {session}/sse/{id}``;
  ``GET`` that location is the ``text/event-stream``. The subscription id is unguessable: the
  GET needs no Authorization header (EventSource cannot send one); the POST was authorized.
- ``POST {session}/layer`` with ``{"encodingId", "spatialLayerId", "temporalLayerId",
  "maxSpatialLayerId", "maxTemporalLayerId"}`` -> 204, stored as the session's wanted layer
  (``WhepEvents.wanted_layer(session_id)``, read by the forwarder once simulcast lands).

Events: ``active`` / ``inactive`` (media of the stream's source flows / stopped), ``viewercount`` (this
node's viewers of the stream, on change, at most once per VIEWERCOUNT_INTERVAL_S), ``layers``
(today one layer without rid), ``reconnect`` (the node drains: the URL to play from next).
``scte35`` is accepted and never sent.

The stream state and viewer counts are sampled by one ticker task per node, running only while
someone subscribes; each subscription has a bounded queue (a reader that stays behind is closed).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lotcast.media.peer import PeerSession
from lotcast.media.stream import MediaStream, StreamState
from lotcast.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

SSE_REL = "urn:ietf:params:whep:ext:core:server-sent-events"
LAYER_REL = "urn:ietf:params:whep:ext:core:layer"
JSON = "application/json"
EVENTS = ("active", "inactive", "layers", "reconnect", "viewercount", "scte35")
MAX_BODY_BYTES = 4096
VIEWERCOUNT_INTERVAL_S = 1.0
TICK_S = 0.25
# No packet from the source for this long: the stream is `inactive` (a publisher that left, or
# paused); well above any gap between packets of a live stream (audio: 20 ms).
INACTIVE_AFTER_S = 2.0
QUEUE_LIMIT = 64
# An idle event stream gets a comment line this often, so proxies keep it open.
KEEPALIVE_S = 15.0
LAYER_FIELDS = ("spatialLayerId", "temporalLayerId", "maxSpatialLayerId", "maxTemporalLayerId")


class ExtensionError(Exception):
    """Bad input to an extension resource: answered with ``status`` and ``reason``."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


@dataclass(frozen=True)
class Layer:
    """One encoding a viewer may pick: ``encoding_id`` is its rid (None: the single layer of a
    publisher without simulcast)."""

    encoding_id: str | None
    spatial_layers: int = 1
    temporal_layers: int = 1
    width: int | None = None
    height: int | None = None
    bitrate: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.encoding_id is not None:
            out["encodingId"] = self.encoding_id
        out["spatialLayerId"] = self.spatial_layers - 1
        out["temporalLayerId"] = self.temporal_layers - 1
        for key, value in (("width", self.width), ("height", self.height),
                           ("bitrate", self.bitrate)):
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class LayerChoice:
    """A viewer's wanted layer (the layer POST). ``encoding_id`` None with no other field is
    "automatic" (the server picks); every id is within the stream's layers when stored."""

    encoding_id: str | None = None
    spatial_layer_id: int | None = None
    temporal_layer_id: int | None = None
    max_spatial_layer_id: int | None = None
    max_temporal_layer_id: int | None = None

    @property
    def automatic(self) -> bool:
        return self == LayerChoice()


def stream_layers(stream: MediaStream) -> list[Layer]:
    """The layers of ``stream``: its simulcast layers, top first (rid, size from the last VP8
    key frame or else the offer, measured payload bitrate), or one layer without rid."""
    if "video" not in stream.tracks:
        return []
    if not stream.layers:
        return [Layer(None)]
    out = []
    for rid, forwarder in stream.layers.items():
        size = forwarder.frame_size or stream.layer_sizes.get(rid)
        out.append(Layer(rid, width=size[0] if size else None, height=size[1] if size else None,
                         bitrate=forwarder.measure_bitrate()))
    return out


def stream_active(stream: MediaStream, now: float) -> bool:
    """Media is flowing: a source is attached and sent a packet within INACTIVE_AFTER_S.

    Judged by the packets, not only the source's presence: on a relay the upstream pull stays
    attached while the origin keeps an orphaned stream for its grace period, yet the publisher
    is gone and nothing arrives."""
    if stream.state is not StreamState.LIVE or not stream.tracks:
        return False
    last = max(track.last_packet_time for track in stream.tracks.values())
    return last > 0 and now - last < INACTIVE_AFTER_S


def layers_event(stream: MediaStream) -> dict[str, Any]:
    layers = [layer.to_json() for layer in stream_layers(stream)]
    live = stream_active(stream, time.monotonic())
    return {"video": {"active": layers if live else [], "inactive": [] if live else layers,
                      "layers": layers}}


def parse_event_list(body: bytes) -> list[str]:
    """The JSON array of event names of an SSE subscription POST."""
    try:
        names = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExtensionError(400, f"body is not JSON: {exc}") from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ExtensionError(400, "body must be a JSON array of event names")
    if not names:
        raise ExtensionError(400, f"no event named; known events: {', '.join(EVENTS)}")
    unknown = [n for n in names if n not in EVENTS]
    if unknown:
        raise ExtensionError(400, f"unknown event {unknown[0]!r}; known events: "
                             f"{', '.join(EVENTS)}")
    return list(dict.fromkeys(names))


def parse_layer_choice(body: bytes, layers: list[Layer]) -> LayerChoice:
    """Validate a layer POST against the stream's ``layers``."""
    try:
        raw = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExtensionError(400, f"body is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ExtensionError(400, "body must be a JSON object")
    known = {"mediaId", "encodingId", *LAYER_FIELDS}
    extra = sorted(set(raw) - known)
    if extra:
        raise ExtensionError(400, f"unknown field {extra[0]!r}; known fields: "
                             f"{', '.join(sorted(known))}")
    media_id = raw.get("mediaId")
    if media_id is not None and not isinstance(media_id, str):
        raise ExtensionError(400, "mediaId must be a string")
    encoding_id = raw.get("encodingId")
    if encoding_id is not None and not isinstance(encoding_id, str):
        raise ExtensionError(400, "encodingId must be a string (an encoding's rid)")
    ids: dict[str, int | None] = {}
    for name in LAYER_FIELDS:
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ExtensionError(400, f"{name} must be a non-negative integer")
        ids[name] = value
    if encoding_id is None and all(v is None for v in ids.values()):
        return LayerChoice()
    if not layers:
        raise ExtensionError(400, "this stream has no video layers to choose from")
    if encoding_id is None:
        layer = layers[0] if len(layers) == 1 else None
        if layer is None:
            raise ExtensionError(400, "encodingId is required: this stream has encodings "
                                 + ", ".join(repr(x.encoding_id) for x in layers))
    else:
        layer = next((x for x in layers if x.encoding_id == encoding_id), None)
        if layer is None:
            rids = [repr(x.encoding_id) for x in layers if x.encoding_id is not None]
            have = ", ".join(rids) if rids else "none (one layer without rid: omit encodingId)"
            raise ExtensionError(400, f"unknown encodingId {encoding_id!r}; this stream's "
                                 f"encodings: {have}")
    for name in LAYER_FIELDS:
        value = ids[name]
        limit = layer.spatial_layers if "Spatial" in name else layer.temporal_layers
        if value is not None and value >= limit:
            raise ExtensionError(400, f"{name} {value} is out of range: the encoding has "
                                 f"{limit} (ids 0-{limit - 1})")
    return LayerChoice(encoding_id, ids["spatialLayerId"], ids["temporalLayerId"],
                       ids["maxSpatialLayerId"], ids["maxTemporalLayerId"])


def format_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class SubscriptionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass
class Subscription:
    """One SSE subscription of one WHEP session."""

    id: str
    session: PeerSession
    events: frozenset[str]
    queue: asyncio.Queue[bytes | None] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))
    state: SubscriptionState = SubscriptionState.OPEN
    # what this subscriber was last told (None: nothing yet)
    active: bool | None = None
    viewercount: int | None = None
    viewercount_at: float = 0.0
    layers_key: tuple[tuple[str | None, int | None, int | None], ...] | None = None

    def push(self, name: str, data: dict[str, Any]) -> None:
        if self.state is not SubscriptionState.OPEN or name not in self.events:
            return
        try:
            self.queue.put_nowait(format_event(name, data))
        except asyncio.QueueFull:
            logger.info("SSE subscription %s fell behind: closed", self.id)
            self.close()

    def close(self) -> None:
        if self.state is SubscriptionState.CLOSED:
            return
        self.state = SubscriptionState.CLOSED
        while True:  # make room for the end marker
            try:
                self.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


class WhepEvents:
    """The SSE subscriptions and layer choices of one node's WHEP sessions."""

    def __init__(self, count_viewers: Callable[[str], int]) -> None:
        self._count_viewers = count_viewers
        self._subs: dict[str, Subscription] = {}
        self._choices: dict[str, LayerChoice] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.reconnects_sent = 0

    # --- layer choice ------------------------------------------------------------------------

    def wanted_layer(self, session_id: str) -> LayerChoice:
        """The layer the viewer of ``session_id`` asked for (automatic when it never asked)."""
        return self._choices.get(session_id, LayerChoice())

    def choose_layer(self, session: PeerSession, body: bytes) -> LayerChoice:
        choice = parse_layer_choice(body, stream_layers(session.stream))
        if choice.automatic:
            self._choices.pop(session.id, None)
        else:
            self._choices[session.id] = choice
        session.choose_layer(choice.encoding_id)
        return choice

    # --- subscriptions -----------------------------------------------------------------------

    def subscribe(self, session: PeerSession, body: bytes) -> Subscription:
        names = parse_event_list(body)
        sub = Subscription(secrets.token_urlsafe(12), session, frozenset(names))
        self._subs[sub.id] = sub
        stream = session.stream
        self._tell(sub, stream, time.monotonic())  # active/inactive with layers, viewercount
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.ensure_future(self._tick_forever())
        return sub

    def subscription(self, sub_id: str) -> Subscription | None:
        return self._subs.get(sub_id)

    def session_closed(self, session: PeerSession) -> None:
        """The session ended: its event streams end, its layer choice is forgotten."""
        self._choices.pop(session.id, None)
        for sub in [s for s in self._subs.values() if s.session is session]:
            self._drop(sub)

    def close_subscription(self, sub: Subscription) -> None:
        """End one event stream (its DELETE)."""
        self._drop(sub)

    def _drop(self, sub: Subscription) -> None:
        sub.close()
        self._subs.pop(sub.id, None)

    async def stream_events(self, sub: Subscription) -> AsyncIterator[bytes]:
        """The body of the event stream: queued events until the subscription closes."""
        try:
            yield b": lotcast whep events\n\n"
            while True:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if item is None:
                    return
                yield item
        finally:
            self._drop(sub)

    async def reconnect_all(self, next_url: Callable[[str], Awaitable[str | None]]) -> int:
        """Tell every subscriber to move (the node drains); ``next_url(stream)`` names the WHEP
        endpoint to POST to next (None: any node's placement, the client's own ladder)."""
        urls: dict[str, str | None] = {}
        told = 0
        for sub in list(self._subs.values()):
            stream_id = sub.session.stream.id
            if stream_id not in urls:
                try:
                    urls[stream_id] = await next_url(stream_id)
                except Exception as exc:  # the client still has its ladder
                    logger.warning("no reconnect URL for %s: %r", stream_id, exc)
                    urls[stream_id] = None
            url = urls[stream_id]
            if "reconnect" in sub.events and sub.state is SubscriptionState.OPEN:
                sub.push("reconnect", {"url": url} if url else {})
                told += 1
        self.reconnects_sent += told
        return told

    # --- state sampling ----------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        while self._subs:
            await asyncio.sleep(TICK_S)
            try:
                self._tick(time.monotonic())
            except Exception:  # a bug of ours: log it, keep the streams going
                logger.exception("WHEP events tick failed")

    def _tick(self, now: float) -> None:
        counts: dict[str, int] = {}
        for sub in list(self._subs.values()):
            stream = sub.session.stream
            if stream.id not in counts:
                counts[stream.id] = self._count_viewers(stream.id)
            self._tell(sub, stream, now, counts[stream.id])

    def _tell(self, sub: Subscription, stream: MediaStream, now: float,
              count: int | None = None) -> None:
        active = stream_active(stream, now)
        key = tuple((x.encoding_id, x.width, x.height) for x in stream_layers(stream))
        if active is not sub.active:
            sub.active = active
            sub.layers_key = key
            sub.push("active" if active else "inactive", {})
            sub.push("layers", layers_event(stream))
        elif active and key != sub.layers_key:  # a layer's size became known, or layers changed
            sub.layers_key = key
            sub.push("layers", layers_event(stream))
        viewers = self._count_viewers(stream.id) if count is None else count
        if viewers != sub.viewercount and now - sub.viewercount_at >= VIEWERCOUNT_INTERVAL_S:
            sub.viewercount = viewers
            sub.viewercount_at = now
            sub.push("viewercount", {"viewercount": viewers})

    async def close(self) -> None:
        for sub in list(self._subs.values()):
            self._drop(sub)
        self._choices.clear()
        await cancel_and_wait(self._ticker)
        self._ticker = None


def link_headers(location: str) -> list[str]:
    """The two extension links of a WHEP session at ``location``."""
    return [f'<{location}/sse>; rel="{SSE_REL}"; events="{",".join(EVENTS)}"',
            f'<{location}/layer>; rel="{LAYER_REL}"']


async def read_json_body(body: AsyncIterator[bytes], content_type: str) -> bytes:
    """The body of an extension POST: JSON, at most MAX_BODY_BYTES."""
    if content_type.split(";")[0].strip().lower() != JSON:
        raise ExtensionError(415, f"Content-Type must be {JSON}, got {content_type or 'nothing'!r}",
                             {"Accept-Post": JSON})
    chunks: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ExtensionError(413, f"body exceeds the {MAX_BODY_BYTES}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)

