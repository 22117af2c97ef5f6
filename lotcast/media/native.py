"""The native fan-out path: protect + send of one packet for a whole group of sinks in one call.

`lotcast/media/_fanout.c` (built by `pip install` when a C compiler and the Python headers are
there; optional) walks a prepared `SinkSet`: per sink it copies the packet into a scratch buffer,
adds that sink's sequence-number/timestamp shift (a viewer that switched simulcast layers) and
calls libsrtp's `srtp_protect` on that sink's context; sinks that share a UDP socket go out
in one `sendmmsg` per 64, a sink on a socket of its own (today: aiortc binds one per peer
connection) with one `sendto`.
libsrtp is the one pylibsrtp ships, reached through the function address its cffi binding
exposes (aiortc_hooks.native_target builds the per-sink data); nothing here links it.

The pure-Python path in forwarder.py stays the fallback: taken when the extension is missing,
and forced with LOTCAST_NATIVE_FANOUT=0 (tests and benchmarks compare the two).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pylibsrtp

try:
    from lotcast.media import _fanout
except ImportError as exc:  # not built on this machine: the Python path serves
    _fanout = None  # type: ignore[assignment]
    IMPORT_ERROR: str | None = repr(exc)
else:
    IMPORT_ERROR = None

ENV = "LOTCAST_NATIVE_FANOUT"
_OFF = {"0", "false", "no", "off"}

FAIL_OS, FAIL_SRTP, FAIL_SIZE = 0, 1, 2

# (drops, ((sink index, failure kind, code), ...)) or None when every sink sent the packet
SendResult = tuple[int, tuple[tuple[int, int, int], ...]] | None


@dataclass(frozen=True, slots=True)
class NativeTarget:
    """What the C loop needs to protect and send for one sink; ``keep`` holds the objects the
    addresses belong to (the pylibsrtp session), alive as long as any SinkSet using them."""

    protect: int  # address of srtp_protect
    srtp: int  # the sink's srtp_t
    fd: int  # its UDP socket
    host: str
    port: int
    scope_id: int
    limit: int  # largest RTP packet its SRTP buffer takes (as the Python path computes it)
    keep: tuple[Any, ...]


def available() -> bool:
    """The extension imported on this machine."""
    return _fanout is not None


def enabled() -> bool:
    """Use the native path for sinks that have a NativeTarget (read at each rebuild)."""
    return _fanout is not None and os.environ.get(ENV, "1").strip().lower() not in _OFF


def disabled_reason() -> str:
    if _fanout is None:
        return f"extension not importable: {IMPORT_ERROR}"
    return f"{ENV}={os.environ.get(ENV, '')}"


class SinkSet:
    """Prepared sinks of one payload-type group; `send(packet)` is the per-packet call.
    ``shifts``: per target, the (seq_delta, ts_delta) added to its copy (None: none)."""

    __slots__ = ("_set", "send", "size", "syscalls")

    def __init__(self, targets: Sequence[NativeTarget], payload_type: int | None,
                 shifts: Sequence[tuple[int, int]] | None = None) -> None:
        if _fanout is None:
            raise RuntimeError(f"native fan-out is not built: {IMPORT_ERROR}")
        if _fanout.MAX_TRAILER < pylibsrtp.SRTP_MAX_TRAILER_LEN:
            raise RuntimeError("libsrtp's SRTP trailer outgrew the native scratch buffer")
        protects = {t.protect for t in targets}
        if len(protects) > 1:
            raise ValueError("every sink of a set must use the same srtp_protect")
        if shifts is None:
            shifts = [(0, 0)] * len(targets)
        if len(shifts) != len(targets):
            raise ValueError("one (seq_delta, ts_delta) per target")
        rows = [(t.srtp, t.fd, t.host, t.port, t.scope_id, t.limit, seq % (1 << 16),
                 ts % (1 << 32)) for t, (seq, ts) in zip(targets, shifts, strict=True)]
        keep = tuple(t.keep for t in targets)
        self._set = _fanout.SinkSet(protects.pop() if protects else 1, rows,
                                    -1 if payload_type is None else payload_type, keep)
        self.send = self._set.send
        self.syscalls = self._set.syscalls  # () -> (sendto calls, sendmmsg calls) so far
        self.size = len(targets)


def failure_exception(kind: int, code: int) -> Exception:
    """The exception the Python path would have raised for this failure."""
    if kind == FAIL_OS:
        if code in (errno.EAGAIN, errno.EWOULDBLOCK):
            return BlockingIOError(code, os.strerror(code))
        return OSError(code, os.strerror(code))
    if kind == FAIL_SRTP:
        return pylibsrtp.Error(f"srtp_protect failed (status {code})")
    return ValueError(f"RTP packet exceeds the {code}-byte SRTP buffer")


def protect_send_loop(target: NativeTarget, packets: Sequence[bytes], rounds: int,
                      first_seq: int = 0) -> int:
    """Benchmark floor: protect + sendto of every packet ``rounds`` times in plain C, with
    sequence numbers rewritten from ``first_seq`` on."""
    if _fanout is None:
        raise RuntimeError(f"native fan-out is not built: {IMPORT_ERROR}")
    return int(_fanout.protect_send_loop(target.protect, target.srtp, target.fd, target.host,
                                         target.port, list(packets), rounds, first_seq))
