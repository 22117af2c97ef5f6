"""One UDP socket shared by many ICE connections (a worker's single media port).

Routing, as LiveKit's UDP mux and mediasoup's WebRtcServer do: a datagram from a remote address
already bound to a connection goes to it; otherwise only a STUN message (first byte 0-3,
RFC 7983) is considered, and routed by the local part of its USERNAME (`local-ufrag:remote-ufrag`,
RFC 8445 §7.2.2) to the connection registered under that ufrag. An address is bound to a
connection when that connection sends a STUN binding request or success response to it (a check
of its own, or the answer to a check it authenticated), first come first kept, so a spoofed
unauthenticated request cannot take over a viewer's address. Everything else is dropped and
counted.

This module knows nothing of aioice: the ICE side (lotcast/media/aiortc_hooks.py) registers an
`Endpoint` per connection and sends through the `MuxTransport` it gets back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any, Protocol, cast

logger = logging.getLogger(__name__)

_STUN_MAGIC = 0x2112A442
_STUN_USERNAME = 0x0006
_BINDING_REQUEST = 0x0001
_BINDING_SUCCESS = 0x0101
RCVBUF_BYTES = 4 * 1024 * 1024

Addr = tuple[str, int]


class Endpoint(Protocol):
    """What the mux delivers to: one ICE connection's protocol."""

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


def stun_local_ufrag(data: bytes) -> str | None:
    """The local-ufrag part of a STUN message's USERNAME, None if it is not STUN or has none."""
    if len(data) < 20 or data[0] > 3:
        return None
    _type, length, magic = struct.unpack_from("!HHI", data)
    if magic != _STUN_MAGIC or length + 20 > len(data):
        return None
    pos, end = 20, 20 + length
    while pos + 4 <= end:
        attr_type, attr_len = struct.unpack_from("!HH", data, pos)
        pos += 4
        if attr_type == _STUN_USERNAME:
            value = data[pos:pos + attr_len]
            try:
                return value.decode("utf-8").split(":", 1)[0]
            except UnicodeDecodeError:
                return None
        pos += (attr_len + 3) & ~3
    return None


def _binds(data: bytes) -> bool:
    return len(data) >= 20 and struct.unpack_from("!H", data)[0] in (_BINDING_REQUEST,
                                                                     _BINDING_SUCCESS)


class MuxTransport(asyncio.DatagramTransport):
    """One connection's view of the shared socket. `_sock` is the shared socket itself (what
    PacketSender and the native fan-out send on)."""

    def __init__(self, mux: UdpMux, ufrag: str, endpoint: Endpoint) -> None:
        super().__init__()
        self._mux = mux
        self._ufrag = ufrag
        self._endpoint = endpoint
        self._closing = False
        self._sock = mux.sock

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing:
            return
        if addr is not None and _binds(data):
            self._mux.bind(self, (addr[0], addr[1]))
        self._mux.send(data, addr)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._mux.unregister(self)
        asyncio.get_running_loop().call_soon(self._endpoint.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._mux.sockname
        return default

    @property
    def ufrag(self) -> str:
        return self._ufrag

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint


class UdpMux(asyncio.DatagramProtocol):
    """The shared socket and its routing tables."""

    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self._by_ufrag: dict[str, MuxTransport] = {}
        self._by_addr: dict[Addr, MuxTransport] = {}
        self.dropped = 0  # datagrams no connection claimed
        self._sock: socket.socket | None = None  # the raw socket, sent on directly

    @classmethod
    async def open(cls, host: str, port: int) -> UdpMux:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        _, mux = await loop.create_datagram_endpoint(cls, sock=sock)
        mux._sock = sock
        return mux

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    @property
    def sock(self) -> socket.socket:
        assert self._sock is not None
        return self._sock

    @property
    def sockname(self) -> tuple[Any, ...]:
        assert self._transport is not None
        name: tuple[Any, ...] = self._transport.get_extra_info("sockname")
        return name

    @property
    def closed(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def connections(self) -> int:
        return len(self._by_ufrag)

    def bound_addresses(self) -> int:
        return len(self._by_addr)

    def register(self, ufrag: str, endpoint: Endpoint) -> MuxTransport:
        if ufrag in self._by_ufrag:
            raise ValueError(f"ICE ufrag {ufrag!r} is already registered on this mux")
        transport = MuxTransport(self, ufrag, endpoint)
        self._by_ufrag[ufrag] = transport
        return transport

    def unregister(self, transport: MuxTransport) -> None:
        if self._by_ufrag.get(transport.ufrag) is transport:
            del self._by_ufrag[transport.ufrag]
        for addr in [a for a, t in self._by_addr.items() if t is transport]:
            del self._by_addr[addr]

    def bind(self, transport: MuxTransport, addr: Addr) -> None:
        if addr not in self._by_addr and self._by_ufrag.get(transport.ufrag) is transport:
            self._by_addr[addr] = transport

    def send(self, data: bytes, addr: Any) -> None:
        if self._transport is not None:
            self._transport.sendto(data, addr)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        target = self._by_addr.get((addr[0], addr[1]))
        if target is None:
            ufrag = stun_local_ufrag(data)
            target = self._by_ufrag.get(ufrag) if ufrag is not None else None
            if target is None:
                self.dropped += 1
                return
        target.endpoint.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        logger.debug("udp mux: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        for transport in list(self._by_ufrag.values()):
            transport.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
