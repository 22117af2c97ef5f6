"""A Python reference client of docs/protocol.md: RoomState (pure reducer), RoomClient (over a
WebSocket) and HttpRoomClient (over the HTTP fallback transport).

Used by the tests and load tools; a browser client follows the same rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets

from lotcast.interactive.protocol import (
    SESSION_HEADER,
    decode_server_frame,
    encode_client,
    split_records,
)

LOG_EVENT_LOT_FIELDS = ("price", "leader", "leader_name", "next_min", "bids", "reserve_met",
                        "ends_at")


@dataclass
class RoomState:
    """The room as a client sees it, rebuilt from snapshot + log events (the client rules)."""

    epoch: str = ""
    offset: int = 0
    lots: dict[str, dict[str, Any]] = field(default_factory=dict)
    polls: dict[str, dict[str, Any]] = field(default_factory=dict)
    viewers: int = 0
    applied: list[dict[str, Any]] = field(default_factory=list)
    snapshots: int = 0
    replayed: int = 0

    def apply(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "snapshot":
            self.epoch, self.offset = msg["epoch"], msg["offset"]
            self.lots = {lot["lot"]: dict(lot) for lot in msg["lots"]}
            self.polls = {poll["poll"]: dict(poll) for poll in msg["polls"]}
            self.viewers = msg["viewers"]
            self.snapshots += 1
        elif kind == "events":
            if msg["epoch"] != self.epoch:
                return  # wait for the snapshot
            for event in msg["events"]:
                if event["offset"] == self.offset + 1:
                    self._apply_event(event)
                    self.offset = event["offset"]
                    if msg.get("replay"):
                        self.replayed += 1
                elif event["offset"] > self.offset + 1:
                    raise AssertionError(f"gap: have {self.offset}, got {event['offset']}")
        elif kind == "tally":
            poll = self.polls.get(msg["poll"])
            if poll is not None and poll["status"] == "open" and msg["total"] >= poll["total"]:
                poll["counts"], poll["total"] = list(msg["counts"]), msg["total"]
        elif kind == "viewers":
            self.viewers = msg["count"]

    def _apply_event(self, ev: dict[str, Any]) -> None:
        self.applied.append(ev)
        kind = ev["type"]
        if kind == "lot_created":
            self.lots[ev["lot"]] = {k: v for k, v in ev.items() if k not in ("type", "offset", "ts")}
            return
        if kind == "poll_opened":
            self.polls[ev["poll"]] = {
                "poll": ev["poll"], "question": ev["question"], "options": list(ev["options"]),
                "status": "open", "ends_at": ev["ends_at"], "counts": [0] * len(ev["options"]),
                "total": 0}
            return
        if kind == "poll_closed":
            poll = self.polls[ev["poll"]]
            poll.update(status="closed", counts=list(ev["counts"]), total=ev["total"])
            return
        lot = self.lots.get(ev["lot"]) if "lot" in ev else None
        if lot is None:
            return  # not a lot event (chat, moderation, giveaway, ...): kept in `applied` only
        if kind == "lot_opened":
            lot.update(status="open", ends_at=ev["ends_at"], next_min=ev["next_min"])
        elif kind == "bid":
            lot.update({k: ev[k] for k in LOG_EVENT_LOT_FIELDS})
        elif kind == "lot_extended":
            lot["ends_at"] = ev["ends_at"]
        elif kind == "lot_sold":
            lot.update(status="sold", winner=ev["winner"], winner_name=ev["winner_name"],
                       price=ev["price"])
        elif kind == "lot_unsold":
            lot.update(status="unsold", reason=ev["reason"])


class RoomClient:
    """One WebSocket connection speaking the protocol; replies are matched by `cid`."""

    def __init__(self, base_url: str, room: str, token: str | None = None) -> None:
        self.url = base_url.replace("http://", "ws://").replace("https://", "wss://") + f"/ws/{room}"
        self.room = room
        self.token = token
        self.state = RoomState()
        self.welcome: dict[str, Any] = {}
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.close_code: int | None = None
        self._ws: Any = None
        self._cids = itertools.count(1)
        self._waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def connect(self, resume: tuple[str, int] | None = None, **hello: Any) -> dict[str, Any]:
        self._ws = await websockets.connect(self.url, max_size=None)
        self._reader = asyncio.create_task(self._read())
        fields: dict[str, Any] = dict(hello)
        if self.token:
            fields.setdefault("token", self.token)
        if resume is not None:
            self.state.epoch, self.state.offset = resume
            fields["epoch"], fields["offset"] = resume
        self.welcome = await self.request("hello", **fields)
        return self.welcome

    async def send_raw(self, frame: bytes | str) -> None:
        await self._ws.send(frame)

    async def request(self, kind: str, within: float = 10.0, **fields: Any) -> dict[str, Any]:
        cid = f"c{next(self._cids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = future
        await self._ws.send(encode_client(kind, cid=cid, **fields))
        try:
            return await asyncio.wait_for(future, within)
        finally:
            self._waiting.pop(cid, None)

    async def next_reply(self, within: float = 10.0) -> dict[str, Any]:
        """The next ack/error whose cid we did not ask for (for raw frames)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[None] = future
        try:
            return await asyncio.wait_for(future, within)
        finally:
            self._waiting.pop(None, None)

    async def wait_for(self, predicate: Any, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while not predicate(self.state):
                self._changed.clear()
                await self._changed.wait()

    async def _read(self) -> None:
        try:
            async for frame in self._ws:
                now = time.time()
                for msg in decode_server_frame(frame):
                    self.received.append((now, msg))
                    if msg["type"] in ("ack", "error", "pong", "welcome"):
                        cid = msg.get("cid")
                        future = self._waiting.get(cid) or self._waiting.get(None)
                        if future is not None and not future.done():
                            future.set_result(msg)
                        if msg["type"] != "welcome":
                            continue
                    self.state.apply(msg)
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self._ws.close_code
            self._changed.set()
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"closed with {self.close_code}"))

    async def wait_closed(self, within: float = 10.0) -> int | None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), within)
        return self.close_code

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


class HttpRoomClient:
    """The same protocol over the HTTP fallback: one stream response, one POST per message."""

    def __init__(self, base_url: str, room: str, token: str | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.room = room
        self.token = token
        self.state = RoomState()
        self.welcome: dict[str, Any] = {}
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.records: list[bytes] = []  # every record payload as received (b"": keepalive)
        self.session_id: str | None = None
        self.stream_status: int | None = None
        self.close_code: int | None = None  # from the `close` record
        self.ended = False  # the stream ended (with or without a `close` record)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        self._response: httpx.Response | None = None
        self._cids = itertools.count(1)
        self._waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._session = asyncio.Event()
        # ack/error/pong that no request waited for, in arrival order (for raw POSTs)
        self._unclaimed: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    @property
    def stream_url(self) -> str:
        return f"{self.base}/room/{self.room}/stream"

    @property
    def send_url(self) -> str:
        return f"{self.base}/room/{self.room}/send"

    async def open(self, first: bytes = b"") -> httpx.Response:
        """Open the stream with `first` as its body; returns once the response headers are in
        (and, for a 200, once the session record arrived)."""
        request = self._http.build_request("POST", self.stream_url, content=first)
        self._response = await self._http.send(request, stream=True)
        self.stream_status = self._response.status_code
        if self._response.status_code == 200:
            self._reader = asyncio.create_task(self._read(self._response))
            await asyncio.wait_for(self._session.wait(), 10.0)
        return self._response

    async def connect(self, resume: tuple[str, int] | None = None, **hello: Any) -> dict[str, Any]:
        fields: dict[str, Any] = dict(hello)
        if self.token:
            fields.setdefault("token", self.token)
        if resume is not None:
            self.state.epoch, self.state.offset = resume
            fields["epoch"], fields["offset"] = resume
        cid = f"c{next(self._cids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = future
        try:
            response = await self.open(encode_client("hello", cid=cid, **fields))
            if response.status_code != 200:
                raise ConnectionError(f"stream refused: {response.status_code}")
            self.welcome = await asyncio.wait_for(future, 10.0)
        finally:
            self._waiting.pop(cid, None)
        return self.welcome

    async def post(self, body: bytes, session: str | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        sent = {SESSION_HEADER: session if session is not None else (self.session_id or "")}
        return await self._http.post(self.send_url, content=body, headers={**sent,
                                                                           **(headers or {})})

    async def send_raw(self, frame: bytes) -> httpx.Response:
        return await self.post(frame)

    async def request(self, kind: str, within: float = 10.0, **fields: Any) -> dict[str, Any]:
        cid = f"c{next(self._cids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = future
        try:
            response = await self.post(encode_client(kind, cid=cid, **fields))
            if response.status_code != 202:
                raise ConnectionError(f"POST refused: {response.status_code} {response.text}")
            return await asyncio.wait_for(future, within)
        finally:
            self._waiting.pop(cid, None)

    async def next_reply(self, within: float = 10.0) -> dict[str, Any]:
        """The next ack/error whose cid no request waits for (for raw POSTs)."""
        return await asyncio.wait_for(self._unclaimed.get(), within)

    async def wait_for(self, predicate: Any, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while not predicate(self.state):
                self._changed.clear()
                await self._changed.wait()

    async def _read(self, response: httpx.Response) -> None:
        buffer = bytearray()
        try:
            async for chunk in response.aiter_raw():
                buffer += chunk
                now = time.time()
                for record in split_records(buffer):
                    self.records.append(record)
                    for msg in decode_server_frame(record) if record else []:
                        self._on_message(now, msg)
                self._changed.set()
        except (httpx.HTTPError, OSError):
            pass
        finally:
            self.ended = True
            self._changed.set()
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"stream ended ({self.close_code})"))

    def _on_message(self, now: float, msg: dict[str, Any]) -> None:
        self.received.append((now, msg))
        kind = msg["type"]
        if kind == "session":
            self.session_id = msg["session"]
            self._session.set()
            return
        if kind == "close":
            self.close_code = msg["code"]
            return
        if kind in ("ack", "error", "pong", "welcome"):
            future = self._waiting.get(msg.get("cid"))
            if future is not None and not future.done():
                future.set_result(msg)
            elif kind != "welcome":
                self._unclaimed.put_nowait(msg)
            if kind != "welcome":
                return
        self.state.apply(msg)

    async def wait_closed(self, within: float = 10.0) -> int | None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), within)
        return self.close_code

    async def drop(self) -> None:
        """End the stream from this side (as a network drop would); the client stays usable."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        if self._response is not None:
            await self._response.aclose()
            self._response = None
        self._session.clear()

    async def close(self) -> None:
        await self.drop()
        await self._http.aclose()
