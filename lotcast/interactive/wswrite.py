"""The hub's batch writer: one pre-framed batch to many room sockets in one native call.

`lotcast/interactive/_wswrite.c` (built by `pip install` when a C compiler and the Python
headers are there; optional) `send`s the same frame to every idle socket's fd with
MSG_DONTWAIT | MSG_NOSIGNAL, the GIL released, and reports the sockets that took only part of it
(or nothing: EAGAIN): their remainder goes into their transport's buffer, in order.

A socket takes the native path only when nothing of it is queued anywhere: its outbox is idle,
its transport's write buffer is empty and the transport is not paused. Otherwise it gets the
frame through `push` (outbox, then transport), so bytes on one socket never overtake each other.

The per-socket path (today's: `push` for every socket) is the fallback: taken when the
extension is missing, and forced with LOTCAST_NATIVE_WS=0 (tests compare the two).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from time import thread_time
from typing import Protocol

from lotcast.interactive.outbox import framed

try:
    from lotcast.interactive import _wswrite

    _wswrite.send_ready  # noqa: B018 (a stale build without it: the per-socket path serves)
except (ImportError, AttributeError) as exc:  # not built here: the per-socket path serves
    _wswrite = None  # type: ignore[assignment]
    IMPORT_ERROR: str | None = repr(exc)
else:
    IMPORT_ERROR = None

ENV = "LOTCAST_NATIVE_WS"
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


def enabled() -> bool:
    """The native path is built and not switched off by LOTCAST_NATIVE_WS."""
    return _wswrite is not None and os.environ.get(ENV, "1").strip().lower() not in _OFF


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
