"""Raw `websockets` room clients that keep every server frame's bytes (native-writer tests)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import msgpack
import websockets.asyncio.client as wsclient
from websockets.exceptions import ConnectionClosed

from lotcast.config import DEV_JWT_SECRET
from lotcast.interactive import wswrite
from lotcast.interactive.devserver import DevServerProcess
from lotcast.interactive.outbox import SNDBUF_ENV
from lotcast.interactive.protocol import decode_server_frame


class Watcher:
    """A `websockets` client keeping every server frame's bytes; `pause()` stops reading."""

    def __init__(self, url: str, room: str, rcvbuf: int | None = None,
                 token: str | None = None) -> None:
        self.url, self.room, self.rcvbuf, self.token = url, room, rcvbuf, token
        self.frames: list[bytes] = []
        self.ws: Any = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> dict[str, Any]:
        parsed = urlparse(self.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf is not None:  # before connect: the kernel then never grows it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parsed.hostname, parsed.port))
        self.ws = await wsclient.connect(f"ws://{parsed.netloc}/ws/{self.room}", sock=sock,
                                         compression=None, max_size=None, max_queue=None)
        hello: dict[str, Any] = {"type": "hello", "cid": "h"}
        if self.token:
            hello["token"] = self.token
        await self.ws.send(msgpack.packb(hello))
        first = await self.ws.recv()
        self.frames.append(first)
        self._task = asyncio.create_task(self._read())
        return decode_server_frame(first)[0]

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                self.frames.append(frame)

    def pause(self) -> None:
        self.ws.transport.pause_reading()

    def resume(self) -> None:
        self.ws.transport.resume_reading()

    def reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), unannounced."""
        sock = self.ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.ws.transport.abort()

    def messages(self) -> list[dict[str, Any]]:
        return [m for f in self.frames for m in decode_server_frame(f)]

    def event_maps(self, kind: str | None = None) -> list[bytes]:
        """The raw bytes of every live `events` map (holding an event of type `kind`, if
        given). An outbox that queued several maps sends them in one frame, back to back: they
        are split by msgpack."""
        out = []
        for frame in self.frames:
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
            unpacker.feed(frame)
            start = 0
            for m in unpacker:
                end = unpacker.tell()
                if (m["type"] == "events" and not m.get("replay")
                        and (kind is None or any(e["type"] == kind for e in m["events"]))):
                    out.append(frame[start:end])
                start = end
        return out

    def bid_batches(self) -> list[bytes]:
        return self.event_maps("bid")

    def offsets(self) -> list[int]:
        return [e["offset"] for m in self.messages() if m["type"] == "events"
                for e in m["events"]]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.ws.close()


async def node_stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        return dict((await client.get(url + "/interactive/stats")).json())


async def hub_stats(url: str, room: str) -> dict[str, Any]:
    return dict((await node_stats(url))["hubs"][room])


async def until(predicate: Any, within: float = 20.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


def assert_native_writer_built() -> None:
    # setup.sh installs gcc and the Python headers, so a missing extension is a broken install
    assert wswrite.enabled(), (f"native writer not built ({wswrite.IMPORT_ERROR}); install gcc "
                               "and the Python headers, then pip install -e .")


@contextlib.contextmanager
def native_and_fallback_nodes(redis_url: str, args: tuple[str, ...],
                              sndbuf: int) -> Iterator[tuple[DevServerProcess, DevServerProcess]]:
    """Two devserver nodes with server send buffers of `sndbuf`: the native writer, and the
    Python fallback (LOTCAST_NATIVE_WS=0)."""
    native = DevServerProcess(redis_url, *args, jwt_secret=DEV_JWT_SECRET)
    fallback = DevServerProcess(redis_url, *args, jwt_secret=DEV_JWT_SECRET)
    saved = {k: os.environ.get(k) for k in (wswrite.ENV, SNDBUF_ENV)}
    os.environ[SNDBUF_ENV] = str(sndbuf)
    try:
        try:
            native.start()
            os.environ[wswrite.ENV] = "0"
            fallback.start()
        finally:  # the nodes keep what they inherited; this process's environment is restored
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        yield native, fallback
    finally:
        fallback.stop()
        native.stop()
