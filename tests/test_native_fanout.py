"""The native fan-out path (lotcast/media/_fanout.c via native.py) against the Python path.

Both must put the same SRTP bytes on the wire for the same input, count a full socket buffer and
a closed socket the same way, and the Python path must take over when the extension is missing
or switched off. Real pylibsrtp sessions, real sockets; the end-to-end test runs real aiortc
peers through a broadcaster and a relay.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pylibsrtp
import pytest
from aiortc import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket
from media_support import (
    Publisher,
    Viewer,
    assert_in_order,
    host_token,
    http_client,
    lose_every_20th_video_packet_once,
    running_cluster,
)

from lotcast.media import native
from lotcast.media.aiortc_hooks import (
    MAX_SRTP_PACKET,
    PacketSender,
    SilentTrack,
    _widen_srtp_session,
    check_hooks,
    fast_protect,
    native_target,
    negotiated_codecs,
    new_peer_connection,
    tap_receiver,
)
from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.media.rtp import shifted, stamped, with_payload_type
from lotcast.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
REPO = Path(__file__).resolve().parent.parent


def _session(key: bytes) -> Any:
    policy = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                              srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80)
    session = pylibsrtp.Session(policy)
    _widen_srtp_session(session)  # as every aiortc session is (install_transport_fixes)
    return session


def _receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.settimeout(5)
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(65536))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return out


class SocketSender:
    """Stands in for PacketSender (which needs a DTLS transport): the same fast_protect, a real
    non-blocking socket and pylibsrtp session, and the same native target the real one builds."""

    def __init__(self, key: bytes, dest: Any, family: int = socket.AF_INET) -> None:
        self.session = _session(key)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.addr = dest
        self.protect = fast_protect(self.session)
        self.sendto = self.sock.sendto
        self.native = native_target(self.session, self.sock.fileno(), dest)

    def send(self, data: bytes) -> None:
        try:
            self.sendto(self.protect(data), self.addr)
        except BlockingIOError:
            pass

    def alive(self) -> bool:
        return self.sock.fileno() != -1


def _packet(seq: int, size: int, marker: int = 0, pt: int = 96) -> bytes:
    payload = bytes((seq * 7 + i) & 0xFF for i in range(size - 12))
    return RtpPacket(payload_type=pt, sequence_number=seq, timestamp=3000 * seq, ssrc=0x1234,
                     marker=marker, payload=payload).serialize()


@pytest.fixture
def native_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(native.ENV, raising=False)
    assert native.enabled()
    yield


def test_the_extension_is_built_and_its_abi_checked() -> None:
    # pip install -e . builds it here (gcc and the Python headers are on every machine we use);
    # a failed build would silently leave every viewer on the Python path
    assert native.available(), native.IMPORT_ERROR
    fanout = native._fanout
    assert (native.FAIL_OS, native.FAIL_SRTP, native.FAIL_SIZE) == (
        fanout.FAIL_OS, fanout.FAIL_SRTP, fanout.FAIL_SIZE)
    assert fanout.MAX_TRAILER >= pylibsrtp.SRTP_MAX_TRAILER_LEN
    check_hooks()  # srtp_protect's cdef signature is the one the C side calls


def test_native_srtp_is_byte_identical_to_the_python_path_up_to_the_largest_packet(
    native_on: None,
) -> None:
    keys = [os.urandom(30) for _ in range(3)]
    python_sessions = [_session(k) for k in keys]
    native_sessions = [_session(k) for k in keys]
    receivers = [_receiver() for _ in keys]
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in keys]
    targets = [native_target(s, tx.fileno(), rx.getsockname())
               for s, tx, rx in zip(native_sessions, senders, receivers, strict=True)]
    limit = targets[0].limit
    assert limit >= MAX_SRTP_PACKET  # packets up to the receive path's largest are forwarded
    protects = [fast_protect(s) for s in python_sessions]
    base = native.SinkSet(targets, None)
    rtx = native.SinkSet(targets, 97)  # a payload-type rewrite, as for an RTX/other-PT group
    sizes = [13, 200, 1200, 1400, 1500, 4000, limit - 1, limit]
    seq = 65525  # across a sequence-number wrap
    for size in sizes:
        for sink_set, pt in ((base, None), (rtx, 97)):
            seq += 1  # libsrtp refuses to protect one index twice, on either path
            packet = _packet(seq & 0xFFFF, size, marker=seq % 2)
            assert sink_set.send(packet) is None
            source = packet if pt is None else with_payload_type(packet, pt)
            for protect, rx in zip(protects, receivers, strict=True):
                got = rx.recv(65536)
                assert got == protect(source), (size, pt)
                assert got[1] == source[1]  # marker kept, payload type rewritten
    for sock in (*receivers, *senders):
        sock.close()


def test_ipv6_destinations_get_the_same_srtp_as_on_the_python_path(native_on: None) -> None:
    key = os.urandom(30)
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    rx.bind(("::1", 0))
    rx.settimeout(5)
    tx_python = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    tx_native = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    protect = fast_protect(_session(key))
    sink_set = native.SinkSet([native_target(_session(key), tx_native.fileno(),
                                             rx.getsockname())], None)
    for seq in range(1, 4):
        packet = _packet(seq, 1400)
        tx_python.sendto(protect(packet), rx.getsockname())
        assert sink_set.send(packet) is None
        from_python, from_native = rx.recvfrom(65536), rx.recvfrom(65536)
        assert from_native[0] == from_python[0]
        assert from_native[1][1] == tx_native.getsockname()[1]  # sent on the sink's own socket
    for sock in (rx, tx_python, tx_native):
        sock.close()


SHIFTS = [(0, 0), (1, 0), (0, 1), (7, 9000), (65535, (1 << 32) - 1), (40000, 123456789)]


def test_each_native_copy_is_shifted_by_its_own_sink_as_the_python_path_shifts_it(
    native_on: None,
) -> None:
    keys = [os.urandom(30) for _ in SHIFTS]
    receivers = [_receiver() for _ in keys]
    shared = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one sendmmsg for them all
    targets = [native_target(_session(k), shared.fileno(), rx.getsockname())
               for k, rx in zip(keys, receivers, strict=True)]
    protects = [fast_protect(_session(k)) for k in keys]
    sets = [(native.SinkSet(targets, None, SHIFTS), 96), (native.SinkSet(targets, 97, SHIFTS), 97)]
    seq = 65530  # the copies' numbers wrap at different packets
    for size in (12, 100, 1200, 1400):
        for sink_set, pt in sets:
            seq += 1
            packet = _packet(seq & 0xFFFF, size, marker=seq % 2)
            # stamped (an abs-send-time block after the fixed header) or not: shifted alike
            for source in (packet, stamped(packet, 96, 3, 0x123456)):
                if source is not packet:
                    seq += 1
                    source = source[:2] + (seq & 0xFFFF).to_bytes(2, "big") + source[4:]
                assert sink_set.send(source) is None
                for (dseq, dts), protect, rx in zip(SHIFTS, protects, receivers, strict=True):
                    got = rx.recv(65536)
                    assert got == protect(shifted(source, pt, dseq, dts)), (size, pt, dseq, dts)
                    assert int.from_bytes(got[2:4], "big") == (seq + dseq) & 0xFFFF
    with pytest.raises(ValueError, match="seq_delta"):
        t = targets[0]
        native._fanout.SinkSet(t.protect, [(t.srtp, t.fd, t.host, t.port, 0, t.limit, 1 << 16, 0)])
    with pytest.raises(ValueError, match="not an RTP packet"):
        sets[0][0].send(bytes(11))
    for sock in (*receivers, shared):
        sock.close()


def _shifted_run(use_native: bool, keys: list[bytes],
                 monkeypatch: pytest.MonkeyPatch) -> tuple[TrackForwarder, list[list[bytes]]]:
    """Video sinks of three (payload type, abs-send-time id) pairs, each pair with sinks at
    several seq/timestamp shifts (viewers that switched layers at different moments); the same
    packets on the path asked for; what each sink got."""
    monkeypatch.setenv(native.ENV, "1" if use_native else "0")
    forwarder = TrackForwarder("video", VP8, output_ssrc=4321)
    # one value: the Python path reads the clock once per group, and has more groups
    forwarder.send_clock = lambda: 0xABCDEF
    receivers = [_receiver() for _ in keys]
    for index, (key, rx) in enumerate(zip(keys, receivers, strict=True)):
        pt, extension_id = ((96, 0), (97, 0), (96, 4))[index % 3]
        sink = ForwardSink(SocketSender(key, rx.getsockname()), SimpleNamespace(),  # type: ignore[arg-type]
                           pt, abs_send_time_id=extension_id)
        sink.seq_delta, sink.ts_delta = SHIFTS[index // 3]
        forwarder.add_sink(sink)
    for seq in range(65530, 65530 + 12):  # across the source's wrap too
        payload = bytes((0x10, 0 if seq == 65530 else 1)) + bytes((seq + i) & 0xFF
                                                                 for i in range(900))
        forwarder.on_source_packet(RtpPacket(payload_type=96, sequence_number=seq & 0xFFFF,
                                             timestamp=3000 * seq, ssrc=77, marker=seq % 2,
                                             payload=payload))
        forwarder._drain()
    got = [_drain(rx) for rx in receivers]
    for rx in receivers:
        rx.close()
    for sink in forwarder.sinks():
        sink.packet_sender.sock.close()  # type: ignore[attr-defined]
    return forwarder, got


async def test_sinks_with_different_shifts_share_one_native_call_and_send_the_python_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = [os.urandom(30) for _ in range(18)]  # every shift in every (pt, id) group
    python_fwd, python_got = _shifted_run(False, keys, monkeypatch)
    native_fwd, native_got = _shifted_run(True, keys, monkeypatch)
    # the Python path: one group (one rewrite) per distinct shift; native: one per (pt, id)
    assert len(python_fwd._groups) == 18
    assert len(native_fwd._groups) == 3
    assert all(g.native is not None and g.native.size == 6 and not g.entries
               for g in native_fwd._groups)
    assert native_fwd.native_packets_sent == native_fwd.packets_sent == 18 * 12
    assert python_fwd.packets_sent == native_fwd.packets_sent
    for index, (python_sink, native_sink) in enumerate(zip(python_got, native_got, strict=True)):
        assert len(native_sink) == 12
        assert native_sink == python_sink, index
        dseq, dts = SHIFTS[index // 3]
        assert [int.from_bytes(p[2:4], "big") for p in native_sink] == [
            (seq + dseq) & 0xFFFF for seq in range(65530, 65530 + 12)]
        assert [int.from_bytes(p[4:8], "big") for p in native_sink] == [
            (3000 * seq + dts) & 0xFFFFFFFF for seq in range(65530, 65530 + 12)]
        assert {p[0] for p in native_sink} == {0x90 if index % 3 == 2 else 0x80}
    python_fwd.close()
    native_fwd.close()


def _forwarder_run(use_native: bool, keys: list[bytes], sizes: list[int],
                   monkeypatch: pytest.MonkeyPatch) -> tuple[TrackForwarder, list[list[bytes]]]:
    """One forwarder, four sinks (two payload types), the same packets; what each sink got."""
    monkeypatch.setenv(native.ENV, "1" if use_native else "0")
    forwarder = TrackForwarder("audio", OPUS, output_ssrc=4321)
    receivers = [_receiver() for _ in keys]
    senders = [SocketSender(k, rx.getsockname()) for k, rx in zip(keys, receivers, strict=True)]
    for i, sender in enumerate(senders):
        pt = 111 if i % 2 == 0 else 112
        forwarder.add_sink(ForwardSink(sender, SimpleNamespace(), pt))  # type: ignore[arg-type]
    for seq, size in enumerate(sizes, start=1000):
        forwarder.on_source_packet(RtpPacket(payload_type=111, sequence_number=seq,
                                             timestamp=960 * seq, ssrc=77, marker=seq % 3 == 0,
                                             payload=bytes((seq + i) & 0xFF for i in range(size))))
        forwarder._drain()
    got = [_drain(rx) for rx in receivers]
    for rx in receivers:
        rx.close()
    for sender in senders:
        sender.sock.close()
    forwarder.close()
    return forwarder, got


async def test_the_forwarder_sends_the_same_srtp_on_both_paths_with_payload_type_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = [os.urandom(30) for _ in range(4)]
    limit = native_target(_session(keys[0]), 0, ("127.0.0.1", 9)).limit
    # payload sizes: small, 1400-byte packets, near the largest, and one over it
    sizes = [60, 1388, 1388, 8000, limit - 12, limit - 11, 300]
    python_fwd, python_got = _forwarder_run(False, keys, sizes, monkeypatch)
    native_fwd, native_got = _forwarder_run(True, keys, sizes, monkeypatch)
    assert python_fwd.native_packets_sent == 0
    assert native_fwd.native_packets_sent == native_fwd.packets_sent == 4 * len(sizes)
    assert python_fwd.packets_sent == native_fwd.packets_sent
    for python_sink, native_sink in zip(python_got, native_got, strict=True):
        assert len(python_sink) == len(sizes) - 1  # the oversize packet skipped on both
        assert native_sink == python_sink
    # odd sinks are on payload type 112: rewritten, in both paths
    assert {p[1] & 0x7F for p in native_got[1]} == {112}
    assert {p[1] & 0x7F for p in native_got[0]} == {111}
    assert python_fwd.send_errors == native_fwd.send_errors == 4  # one skip per sink
    assert python_fwd.send_drops == native_fwd.send_drops == 0


class SharedSocketSender(SocketSender):
    """A sink on a socket other sinks use too (one UDP port for many viewers)."""

    def __init__(self, key: bytes, dest: Any, sock: socket.socket) -> None:
        self.session = _session(key)
        self.sock = sock
        self.addr = dest
        self.protect = fast_protect(self.session)
        self.sendto = sock.sendto
        self.native = native_target(self.session, sock.fileno(), dest)


async def test_sinks_sharing_a_socket_go_out_by_sendmmsg_with_the_same_bytes(
    native_on: None,
) -> None:
    keys = [os.urandom(30) for _ in range(100)]
    receivers = [_receiver() for _ in range(5)]
    shared = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dests = [receivers[i % 5].getsockname() for i in range(100)]
    native_sinks = [SharedSocketSender(k, d, shared) for k, d in zip(keys, dests, strict=True)]
    python_sinks = [SharedSocketSender(k, d, shared) for k, d in zip(keys, dests, strict=True)]
    sink_set = native.SinkSet([s.native for s in native_sinks], None)  # type: ignore[misc]
    for seq in (1, 2):
        packet = _packet(seq, 1400)
        assert sink_set.send(packet) is None
        from_native = [_drain(rx) for rx in receivers]
        for sink in python_sinks:
            sink.send(packet)
        assert [_drain(rx) for rx in receivers] == from_native
        assert [len(got) for got in from_native] == [20] * 5
    assert sink_set.syscalls() == (0, 4)  # 64 + 36 sinks per packet, two packets
    for sock in (*receivers, shared):
        sock.close()


async def test_a_shared_socket_that_fills_or_closes_is_handled_per_sink_as_on_the_python_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    results = []
    for use_native in (False, True):
        monkeypatch.setenv(native.ENV, "1" if use_native else "0")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "viewers")
            unread = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            unread.bind(path)
            shared = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            shared.setblocking(False)
            forwarder = TrackForwarder("audio", OPUS, output_ssrc=5)
            for i in range(3):
                sender = SharedSocketSender(bytes([i]) * 30, path, shared)
                forwarder.add_sink(ForwardSink(sender, SimpleNamespace(), 111))  # type: ignore[arg-type]
            for seq in range(200):
                forwarder.on_source_packet(RtpPacket(payload_type=111, sequence_number=seq,
                                                     ssrc=9, payload=bytes(500)))
            forwarder._drain()
            queued = len(_drain(unread))
            full = (forwarder.send_drops, forwarder.send_errors, forwarder.sink_count, queued)
            shared.close()  # the one socket goes away: every sink on it is gone
            forwarder.on_source_packet(RtpPacket(payload_type=111, sequence_number=200, ssrc=9,
                                                 payload=bytes(500)))
            forwarder._drain()
            await asyncio.sleep(0.01)
            results.append((full, forwarder.sink_count, forwarder.send_errors))
            forwarder.close()
            unread.close()
    python_result, native_result = results
    (drops, errors, sinks, queued), sinks_after, errors_after = python_result
    assert drops > 300 and errors == 0 and sinks == 3 and drops + queued == 600
    assert sinks_after == 0 and errors_after == 0
    assert native_result == python_result


def _run(code: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env={**os.environ, **env}, check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


FALLBACK_SCRIPT = """
import asyncio, json, os, socket, sys
from types import SimpleNamespace
if os.environ.get("BLOCK_FANOUT"):
    sys.modules["lotcast.media._fanout"] = None  # the import fails as on a machine without gcc
sys.path.insert(0, "tests")
from test_native_fanout import OPUS, SocketSender, _drain, _receiver
from aiortc.rtp import RtpPacket
from lotcast.media import native
from lotcast.media.forwarder import ForwardSink, TrackForwarder

rx = _receiver()
sender = SocketSender(b"k" * 30, rx.getsockname())
forwarder = TrackForwarder("audio", OPUS, output_ssrc=1)
forwarder.add_sink(ForwardSink(sender, SimpleNamespace(), 111))
async def feed():
    for seq in range(5):
        forwarder.on_source_packet(RtpPacket(payload_type=111, sequence_number=seq, ssrc=2,
                                             payload=bytes(100)))
    await asyncio.sleep(0.01)
asyncio.run(feed())
print(json.dumps({"available": native.available(), "enabled": native.enabled(),
                  "reason": native.disabled_reason(), "received": len(_drain(rx)),
                  "native_sent": forwarder.native_packets_sent, "sent": forwarder.packets_sent}))
"""


def test_the_python_path_serves_when_the_extension_cannot_be_imported_or_is_switched_off() -> None:
    blocked = _run(FALLBACK_SCRIPT, {"BLOCK_FANOUT": "1"})
    assert blocked["available"] is False and blocked["enabled"] is False
    assert "extension not importable" in blocked["reason"]
    assert blocked["received"] == blocked["sent"] == 5 and blocked["native_sent"] == 0
    off = _run(FALLBACK_SCRIPT, {native.ENV: "0"})
    assert off["available"] is True and off["enabled"] is False
    assert off["received"] == off["sent"] == 5 and off["native_sent"] == 0
    on = _run(FALLBACK_SCRIPT, {native.ENV: "1"})
    assert on["enabled"] is True
    assert on["received"] == on["sent"] == on["native_sent"] == 5


async def test_a_full_socket_buffer_is_a_counted_drop_on_both_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # loopback UDP never reports EAGAIN; a unix datagram socket nobody reads does, from the
    # kernel, once its queue is full: the same errno a full UDP send buffer gives
    results = []
    for use_native in (False, True):
        monkeypatch.setenv(native.ENV, "1" if use_native else "0")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "viewer")
            unread = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            unread.bind(path)
            healthy_rx = _receiver()
            full = SocketSender(b"f" * 30, path, socket.AF_UNIX)
            healthy = SocketSender(b"h" * 30, healthy_rx.getsockname())
            forwarder = TrackForwarder("audio", OPUS, output_ssrc=5)
            for sender in (full, healthy):
                forwarder.add_sink(ForwardSink(sender, SimpleNamespace(), 111))  # type: ignore[arg-type]
            for seq in range(300):
                forwarder.on_source_packet(RtpPacket(payload_type=111, sequence_number=seq,
                                                     ssrc=9, payload=bytes(1000)))
            forwarder._drain()
            delivered = len(_drain(healthy_rx))
            results.append((forwarder.send_drops, forwarder.send_errors, forwarder.sink_count,
                            delivered, forwarder.native_packets_sent))
            forwarder.close()
            for sock in (unread, healthy_rx, full.sock, healthy.sock):
                sock.close()
    (py_drops, py_errors, py_sinks, py_delivered, py_native), native_result = results
    assert py_drops > 200 and py_errors == 0 and py_sinks == 2 and py_native == 0
    assert py_delivered == 300  # the other viewer lost nothing
    assert native_result == (py_drops, 0, 2, 300, 600)


async def test_a_closed_socket_drops_its_sink_on_both_paths_and_a_reused_fd_gets_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for use_native in (False, True):
        monkeypatch.setenv(native.ENV, "1" if use_native else "0")
        receivers = [_receiver() for _ in range(3)]
        senders = [SocketSender(os.urandom(30), rx.getsockname()) for rx in receivers]
        forwarder = TrackForwarder("audio", OPUS, output_ssrc=5)
        for sender in senders:
            forwarder.add_sink(ForwardSink(sender, SimpleNamespace(), 111))  # type: ignore[arg-type]

        async def feed(first: int, count: int, fwd: TrackForwarder = forwarder) -> None:
            for seq in range(first, first + count):
                fwd.on_source_packet(RtpPacket(payload_type=111, sequence_number=seq, ssrc=9,
                                               payload=bytes(200)))
            for _ in range(5):
                await asyncio.sleep(0)

        await feed(0, 10)
        assert [len(_drain(rx)) for rx in receivers] == [10, 10, 10]
        # the middle viewer's socket is closed under the forwarder (its transport went away),
        # and its fd number is taken at once by a new socket sending somewhere else
        stale_fd = senders[1].sock.fileno()
        senders[1].sock.close()
        reused = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if reused.fileno() != stale_fd:
            os.dup2(reused.fileno(), stale_fd)
            reused.close()
            reused = socket.socket(fileno=stale_fd)
        bystander_rx = _receiver()
        reused.connect(bystander_rx.getsockname())
        await feed(10, 10)
        await asyncio.sleep(0.01)
        assert forwarder.sink_count == 2, use_native
        assert forwarder.send_errors == 0  # a dead transport is a dropped sink, not an error
        assert [len(_drain(rx)) for rx in receivers] == [10, 0, 10]
        assert _drain(bystander_rx) == [], "SRTP went out through another socket's fd"
        assert forwarder.packets_sent == 60  # copies attempted, as the Python path counts
        assert forwarder.native_packets_sent == (60 if use_native else 0)
        forwarder.close()
        for sock in (*receivers, bystander_rx, reused, senders[0].sock, senders[2].sock):
            sock.close()


async def _connected_pair() -> tuple[Any, Any]:
    sender_pc, receiver_pc = new_peer_connection(), new_peer_connection()
    sender_pc.addTransceiver(SilentTrack("audio"), direction="sendonly")
    await sender_pc.setLocalDescription(await sender_pc.createOffer())
    await receiver_pc.setRemoteDescription(sender_pc.localDescription)
    await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
    await sender_pc.setRemoteDescription(receiver_pc.localDescription)
    deadline = time.monotonic() + 20
    while sender_pc.connectionState != "connected" or receiver_pc.connectionState != "connected":
        assert time.monotonic() < deadline, (sender_pc.connectionState, receiver_pc.connectionState)
        await asyncio.sleep(0.05)
    return sender_pc, receiver_pc


async def test_a_real_packet_sender_resolves_a_native_target_on_its_ice_socket(native_on: None) -> None:
    # asyncio's selector transport here (the relay runs uvloop: the end-to-end test covers it)
    sender_pc, receiver_pc = await _connected_pair()
    try:
        transceiver = sender_pc.getTransceivers()[0]
        packet_sender = PacketSender(transceiver.sender.transport)
        assert packet_sender.resolve()
        target = packet_sender.native
        assert target is not None
        pair = transceiver.sender.transport.transport._connection._nominated[1]
        assert target.fd == pair.protocol.transport.get_extra_info("socket").fileno()
        assert (target.host, target.port) == pair.remote_addr
        got: list[RtpPacket] = []
        receiver = receiver_pc.getTransceivers()[0].receiver
        tap_receiver(receiver, got.append, lambda *_: None)
        pt = negotiated_codecs(transceiver)[0].payloadType
        sink_set = native.SinkSet([target], None)
        sizes = [100, 1200, 1400]
        for seq, size in enumerate(sizes, start=1):
            assert sink_set.send(_packet(seq, size, pt=pt)) is None
        deadline = time.monotonic() + 10
        while len(got) < len(sizes):
            assert time.monotonic() < deadline, f"received {len(got)} of {len(sizes)}"
            await asyncio.sleep(0.02)
        # decrypted by aiortc's own SRTP receive path: the same packets
        assert [(p.sequence_number, len(p.payload)) for p in got] == [(1, 88), (2, 1188), (3, 1388)]
        assert got[2].payload == _packet(3, 1400, pt=pt)[12:]
        # a forwarder re-prepares its native set whenever the sender resolves again
        forwarder = TrackForwarder("audio", OPUS, output_ssrc=5)
        assert OPUS.payloadType is not None
        forwarder.add_sink(ForwardSink(packet_sender, transceiver.sender, OPUS.payloadType))
        before = forwarder._groups[0].native
        assert before is not None and not forwarder._groups[0].entries
        assert packet_sender.resolve()
        assert forwarder._groups[0].native is not before
        forwarder.close()
        assert packet_sender.resolve() and not packet_sender._on_resolve  # unhooked on close
    finally:
        await sender_pc.close()
        await receiver_pc.close()


@pytest.mark.timeout(180)
async def test_viewers_decode_through_a_relay_on_the_native_path_and_nacks_are_answered(
    redis_server: RedisServer,
) -> None:
    with running_cluster(redis_server, relay_args=["--log-level", "info"]) as cluster:
        publisher = Publisher(cluster.origin.url, "native", host_token())
        await publisher.start()
        group = [Viewer(cluster.relay.url, "native") for _ in range(3)]
        try:
            await asyncio.gather(*(v.start() for v in group))
            lossy = group[0]
            loss = lose_every_20th_video_packet_once(lossy)
            dropped, recovered = loss.dropped, loss.recovered
            for viewer in group:
                await viewer.wait_frames(60, timeout=60)
            for viewer in group[1:]:
                assert_in_order(viewer.counters)
                assert viewer.audio_frames > 0
            async with http_client() as http:
                stats = (await http.get(f"{cluster.relay.url}/api/stats")).json()
            stream = stats["streams"][0]
            assert len(dropped) >= 3
            assert len(recovered) >= len(dropped) - 2, (sorted(dropped), sorted(recovered))
            # each recovered packet was resent: on its NACK, or in the key frame the viewer
            # started on, sent again on its PLI (forwarder.request_keyframe_for)
            assert (stream["video_nacks_served"] + stream["video_keyframe_resent_packets"]
                    >= len(recovered)), stream
            assert stream["video_send_errors"] == 0 and stream["audio_send_errors"] == 0
            log = "".join(cluster.relay.output)
            # the viewers' tracks went on the native path, none on the Python loop
            for kind in ("video", "audio"):
                assert re.search(rf"{kind} fan-out: [1-3] sinks on the native path, 0 on the "
                                 r"Python path\n", log), log[-3000:]
            assert "native off" not in log
        finally:
            await asyncio.gather(*(v.stop() for v in group), return_exceptions=True)
            await publisher.stop()
