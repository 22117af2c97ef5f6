"""The hub's batch writer: one pre-framed batch to many room sockets in one native call.

`lotcast/interactive/_wswrite.c` (built by `pip install` when a C compiler and the Python
headers are there; optional) `send`s the same frame to every idle socket's fd with
MSG_DONTWAIT | MSG_NOSIGNAL, the GIL released, and reports the sockets that took only part of it
(or nothing: EAGAIN): their remainder goes into their transport's buffer, in order.

A socket takes the native path only when nothing of it is queued anywhere: its outbox is idle,
its transport's write buffer is empty and the transport is not paused. Otherwise it gets the
frame through `push` (outbox, then transport), so bytes on one socket never overtake each other.

Two ways to know, per batch, which sockets may take the raw write:
- asked (`BatchSubscriber.native_fd`): every socket's answer, one Python call per socket per
  batch (its outbox, transport and connection are read each time);
- told (`LinkedSubscriber.native_link`, the ReadySet): the socket tells the hub once whenever its
  own side flips (its outbox idle and the session live, or not), the hub keeps one byte per
  socket, and per batch the extension only asks each ready socket's transport, in C, whether it
  holds bytes or is closing (what uvicorn writes on its own: pings, pongs, closes; a lost
  connection). No Python runs per socket on that path.

The per-socket path (today's: `push` for every socket) is the fallback: taken when the
extension is missing, and forced with LOTCAST_NATIVE_WS=0 (tests compare the two).
"""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Callable, Sequence
from time import thread_time
from typing import Any, Protocol

from lotcast.interactive.outbox import framed

try:
    from lotcast.interactive import _wswrite

    _wswrite.send_slots  # noqa: B018 (a stale build without it: the per-socket path serves)
except (ImportError, AttributeError) as exc:  # not built here: the per-socket path serves
    _wswrite = None  # type: ignore[assignment]
    IMPORT_ERROR: str | None = repr(exc)
else:
    IMPORT_ERROR = None

ENV = "LOTCAST_NATIVE_WS"
READY_ENV = "LOTCAST_WS_READY_SET"
_OFF = {"0", "false", "no", "off"}
# Tests only (a fault): every native call then takes this many seconds more, as if the kernel
# were slow, so one fan-out spans many loop turns (tests/test_ws_ack_order.py).
FAULT_SLICE_ENV = "LOTCAST_WS_FAULT_SLICE_S"
_FAULT_SLICE_S = float(os.environ.get(FAULT_SLICE_ENV) or 0)


class BatchSubscriber(Protocol):
    def push(self, frame: bytes) -> None: ...

    def native_fd(self) -> int:
        """The socket's fd if a raw write now cannot overtake anything queued for it, else -1."""
        ...

    def native_rest(self, wire: bytes, result: int) -> None:
        """`wire` went out natively only in part: `result` bytes taken, or -errno."""
        ...


class LinkedSubscriber(BatchSubscriber, Protocol):
    def native_link(self, ready: Callable[[bool], None]) -> tuple[int, Any] | None:
        """(fd, transport) for the life of the connection, or None if it never takes raw writes.
        From then on the socket calls `ready(ok)` (at once, and then synchronously at every
        flip): ok while its own side may take a raw write now (live, not closing, nothing of it
        queued outside the transport). The transport's own state is the hub's to check."""
        ...


def enabled() -> bool:
    """The native path is built and not switched off by LOTCAST_NATIVE_WS."""
    return _wswrite is not None and os.environ.get(ENV, "1").strip().lower() not in _OFF


def ready_set_enabled() -> bool:
    """Linked sockets are told (ReadySet), unless LOTCAST_WS_READY_SET=0 makes the hub ask them
    (native_fd) like the others: tests and load/ws_bench.py compare the two."""
    return os.environ.get(READY_ENV, "1").strip().lower() not in _OFF


def deliver_native(payload: bytes, subs: Sequence[BatchSubscriber],
                   probes: Sequence[Callable[[], int]]) -> tuple[int, int, float, float]:
    """Write one server frame (`payload`, framed once) to `subs`, whose `native_fd` methods are
    `probes` (looked up once, when the socket joined the hub). Returns (native writes, short
    ones, CPU seconds of this thread spent asking the sockets whether they may take it, and in
    the native call): the per-socket and the kernel part of the fan-out, in the hub's stats.

    Per socket only its own answer runs in Python (one call, collected by a comprehension);
    skipping the sockets that said no, and listing them, is the extension's job."""
    assert _wswrite is not None
    began = thread_time()
    wire = framed(payload)
    fds = [probe() for probe in probes]
    probed = thread_time()
    # Native first: nothing between the checks above and this call can close an fd.
    shorts, queued = _wswrite.send_ready(wire, fds)
    sent = thread_time()
    if _FAULT_SLICE_S:
        time.sleep(_FAULT_SLICE_S)
    for index, result in shorts:
        subs[index].native_rest(wire, result)
    for index in queued:
        subs[index].push(payload)
    return len(fds) - len(queued), len(shorts), probed - began, sent - probed


class ReadySet:
    """A hub's linked sockets as slots: per slot its fd (-1: free), one ready byte the socket
    keeps up to date, and its transport; `live` maps each socket to its slot in joining order.

    A slot freed while a batch naming it may still be pending is reused only after `recycle`
    (the hub calls it when no batch is pending), so a batch never reaches a later socket."""

    def __init__(self) -> None:
        self.subs: list[LinkedSubscriber | None] = []
        self.fds = array("i")
        self.ready = bytearray()
        self.transports: list[Any] = []
        self.live: dict[LinkedSubscriber, int] = {}
        self._free: list[int] = []
        self._freed: list[int] = []

    def add(self, sub: LinkedSubscriber) -> bool:
        """Link `sub`; False if it never takes raw writes (it is then not in the set)."""
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self.subs)
            self.subs.append(None)
            self.fds.append(-1)
            self.ready.append(0)
            self.transports.append(None)
        self.subs[slot] = sub
        subs, ready = self.subs, self.ready

        def on_ready(ok: bool) -> None:
            if subs[slot] is sub:  # a socket that left may still call: not its slot any more
                ready[slot] = 1 if ok else 0

        link = sub.native_link(on_ready)
        if link is None:
            self.subs[slot] = None
            self.ready[slot] = 0
            self._free.append(slot)
            return False
        self.fds[slot], self.transports[slot] = link
        self.live[sub] = slot
        return True

    def remove(self, sub: LinkedSubscriber) -> bool:
        slot = self.live.pop(sub, None)
        if slot is None:
            return False
        self.subs[slot] = None
        self.fds[slot] = -1
        self.ready[slot] = 0
        self.transports[slot] = None
        self._freed.append(slot)
        return True

    def clear(self) -> None:
        for sub in list(self.live):
            self.remove(sub)

    def recycle(self) -> None:
        """No batch names a freed slot any more: they may be reused."""
        if self._freed:
            self._free += self._freed
            self._freed.clear()

    def slots(self) -> array[int]:
        return array("i", self.live.values())


def deliver_slots(payload: bytes, slots: array[int], ready: ReadySet
                  ) -> tuple[int, int, float, float]:
    """Write one server frame to the sockets in `slots` of `ready` (the told path): the same
    figures as deliver_native. The ready ones whose transport is idle take the raw write; the
    others get the frame through `push`; slots freed meanwhile are skipped."""
    assert _wswrite is not None
    began = thread_time()
    wire = framed(payload)
    shorts, pushes, _gone, check_s = _wswrite.send_slots(wire, slots, ready.fds, ready.ready,
                                                         ready.transports)
    sent = thread_time()
    if _FAULT_SLICE_S:
        time.sleep(_FAULT_SLICE_S)
    subs = ready.subs
    for index, result in shorts:
        sub = subs[slots[index]]
        if sub is not None:  # always: a socket leaves the set only from its own task
            sub.native_rest(wire, result)
    for index in pushes:
        sub = subs[slots[index]]
        if sub is not None:
            sub.push(payload)
    written = len(slots) - len(pushes) - len(_gone)
    return written, len(shorts), check_s, max(0.0, sent - began - check_s)
