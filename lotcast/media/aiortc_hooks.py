"""Every place lotcast reaches into aiortc/aioice private internals, and nowhere else.

aiortc decodes what it receives and encodes what it sends; a relay must do neither. These hooks
tap RTP after SRTP decryption (at the receiver's jitter buffer, after RTX unwrap and NACK
generation), send pre-built RTP through a peer's SRTP context and UDP socket directly (in Python,
or by handing the native fan-out the srtp_protect address, the session's srtp_t and the socket's
fd), and catch RTCP feedback (NACK, PLI/FIR, SR) that aiortc would otherwise route to its encoder.

The versions are pinned in pyproject.toml. `check_hooks()` fails loudly if a name moved; it runs at
service start and in tests/test_aiortc_hooks.py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from collections.abc import Callable
from typing import Any

import aioice.candidate
import aioice.ice
import aioice.stun
import pylibsrtp
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceGatherer,
    RTCPeerConnection,
    RTCRtpCodecParameters,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
from aiortc.rtp import (
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    RtpPacket,
)
from pylibsrtp import _binding as pylibsrtp_binding

from lotcast.media.native import NativeTarget
from lotcast.media.stun_fast import binding_success
from lotcast.media.udpmux import UdpMux

_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"
_RTCP_STARTED = "_RTCRtpSender__rtcp_started"
_RTCP_EXITED = "_RTCRtpSender__rtcp_exited"
_SR_FIELDS = (
    "_RTCRtpSender__ntp_timestamp",
    "_RTCRtpSender__rtp_timestamp",
    "_RTCRtpSender__packet_count",
    "_RTCRtpSender__octet_count",
)

logger = logging.getLogger(__name__)

# The largest SRTP/SRTCP datagram a peer connection accepts, and so the largest RTP packet that
# is forwarded. pylibsrtp sizes its buffer at 1500 bytes for everything, which leaves 1356 bytes
# for a packet to protect: less than the 1400-byte packets of GStreamer and many encoders, so
# those were refused on the forwarding path. Datagrams above this are dropped (counted), never
# allowed to raise into aiortc's receive loop, which would end the transport.
MAX_SRTP_PACKET = 8192
SRTP_BUFFER_SIZE = MAX_SRTP_PACKET + pylibsrtp.SRTP_MAX_SRTCP_TRAILER_LEN

# aiortc offers only ECDHE-ECDSA suites, which is enough while its own (ECDSA) certificate is the
# server's; as DTLS client facing an RSA server certificate (GStreamer's webrtcbin answering an
# actpass offer, or offering actpass to us) the handshake fails with "no shared cipher".
DTLS_CIPHERS = b":".join((
    b"ECDHE-ECDSA-AES128-GCM-SHA256", b"ECDHE-RSA-AES128-GCM-SHA256",
    b"ECDHE-ECDSA-AES256-GCM-SHA384", b"ECDHE-RSA-AES256-GCM-SHA384",
    b"ECDHE-ECDSA-CHACHA20-POLY1305", b"ECDHE-RSA-CHACHA20-POLY1305",
    b"ECDHE-ECDSA-AES128-SHA", b"ECDHE-RSA-AES128-SHA",
    b"ECDHE-ECDSA-AES256-SHA", b"ECDHE-RSA-AES256-SHA",
))

RtpTap = Callable[[RtpPacket], None]
SenderReportTap = Callable[[int, int, int], None]  # ssrc, ntp timestamp, rtp timestamp


class HookError(RuntimeError):
    """aiortc/aioice no longer look the way these hooks expect: re-check after an upgrade."""


def check_hooks() -> None:
    """Raise HookError if any private name these hooks use is missing."""
    problems: list[str] = []
    if not callable(getattr(aioice.ice, "get_host_addresses", None)):
        problems.append("aioice.ice.get_host_addresses")
    if not hasattr(aioice.ice.Connection, "sendto"):
        problems.append("aioice.ice.Connection.sendto")
    for cls, names in (
        (RTCRtpReceiver, ("_handle_rtp_packet", "_handle_rtcp_packet", "_send_rtcp_pli")),
        (RTCRtpSender, ("_handle_rtcp_packet", "_run_rtcp")),
        (RTCDtlsTransport, ("_send_rtp", "_setup_srtp")),
        (RTCCertificate, ("_create_ssl_context",)),
    ):
        for name in names:
            if not hasattr(cls, name):
                problems.append(f"{cls.__name__}.{name}")
    receiver_src = inspect.getsource(RTCRtpReceiver.__init__)
    if "self.__jitter_buffer" not in receiver_src:
        problems.append("RTCRtpReceiver.__jitter_buffer")
    sender_src = inspect.getsource(RTCRtpSender.__init__)
    for field in (*_SR_FIELDS, "_RTCRtpSender__rtp_history"):
        if "self.__" + field.split("__", 1)[1] not in sender_src:
            problems.append(field)
    if "self._ssrc" not in sender_src:
        problems.append("RTCRtpSender._ssrc")
    for field in (_RTCP_STARTED, _RTCP_EXITED):
        if "self.__" + field.split("__", 1)[1] + " = asyncio.Event()" not in sender_src:
            problems.append(field)
    if "self._run_rtcp()" not in inspect.getsource(RTCRtpSender.send):
        problems.append("RTCRtpSender.send starts _run_rtcp")
    transceiver_src = inspect.getsource(RTCRtpTransceiver.__init__)
    for name in ("self._codecs", "self._headerExtensions"):
        if name not in transceiver_src:
            problems.append(f"RTCRtpTransceiver.{name[5:]}")
    if "self.__cname = " not in inspect.getsource(RTCPeerConnection.__init__):
        problems.append("RTCPeerConnection.__cname")
    dtls_src = inspect.getsource(RTCDtlsTransport)
    for name in ("self._tx_srtp = Session(", "self._rx_srtp = Session(", "self._rx_srtp.unprotect(",
                 "await self._handle_rtcp_data(data)"):
        if name not in dtls_src:
            problems.append(f"RTCDtlsTransport.{name.split('.')[1].split(' ')[0]}")
    if "set_cipher_list" not in inspect.getsource(RTCCertificate._create_ssl_context):
        problems.append("RTCCertificate._create_ssl_context cipher list")
    ice_src = inspect.getsource(aioice.ice.Connection)
    if "self._nominated" not in ice_src:
        problems.append("aioice.ice.Connection._nominated")
    stun_side = ice_src + inspect.getsource(aioice.ice.StunProtocol)
    for needle in ("def request_received(", "def _valid_username(self, username: str) -> bool:",
                   "self.receiver.request_received(message, addr, self)",
                   'response.attributes["XOR-MAPPED-ADDRESS"] = addr',
                   'response.add_message_integrity(self.local_password.encode("utf8"))',
                   "self.check_incoming(message, addr, protocol)", "if self._closing:"):
        if needle not in stun_side:
            problems.append(f"aioice.ice.Connection {needle}")
    if "def data_received(self, data: bytes, component: int) -> None:\n        self._queue.put_nowait(" \
            not in ice_src or "self.receiver.data_received(data" not in inspect.getsource(
                aioice.ice.StunProtocol):
        problems.append("aioice.ice.Connection.data_received")
    if "self._connection = Connection(" not in inspect.getsource(RTCIceGatherer):
        problems.append("RTCIceGatherer._connection")
    pair_src = inspect.getsource(aioice.ice.CandidatePair)
    if "self.remote_candidate = " not in pair_src or "def local_candidate" not in pair_src:
        problems.append("aioice.ice.CandidatePair candidates")
    import asyncio.selector_events as selector_events

    selector_transport = getattr(selector_events, "_SelectorTransport", None)
    if selector_transport is None or "self._sock = sock" not in inspect.getsource(selector_transport):
        problems.append("asyncio _SelectorTransport._sock")
    session_src = inspect.getsource(pylibsrtp.Session.__init__)
    for name in ("self._cdata", "self._buffer", "self._srtp"):
        if name not in session_src:
            problems.append(f"pylibsrtp.Session.{name[5:]}")
    process_src = inspect.getsource(pylibsrtp.Session)
    if "len(self._cdata) - trailer" not in process_src:
        problems.append("pylibsrtp.Session buffer limit")
    if not hasattr(pylibsrtp, "SRTP_MAX_TRAILER_LEN"):
        problems.append("pylibsrtp.SRTP_MAX_TRAILER_LEN")
    # the native fan-out calls srtp_protect through its address: the C side assumes this ABI
    try:
        signature = pylibsrtp_binding.ffi.getctype(pylibsrtp_binding.ffi.typeof(
            pylibsrtp_binding.lib.srtp_protect))
        status = pylibsrtp_binding.ffi.typeof("srtp_err_status_t")
        unprotect_rtcp = pylibsrtp_binding.ffi.getctype(pylibsrtp_binding.ffi.typeof(
            pylibsrtp_binding.lib.srtp_unprotect_rtcp))
        if unprotect_rtcp != _SRTP_PROTECT_CTYPE:
            problems.append(f"pylibsrtp srtp_unprotect_rtcp signature {unprotect_rtcp!r}")
        if (signature != _SRTP_PROTECT_CTYPE or status.kind != "enum"
                or pylibsrtp_binding.ffi.sizeof(status) != 4 or not srtp_protect_address()):
            problems.append(f"pylibsrtp srtp_protect signature {signature!r}")
    except (AttributeError, TypeError) as exc:
        problems.append(f"pylibsrtp srtp_protect address ({exc})")
    problems += _udp_mux_problems()
    problems += check_simulcast_hooks()
    problems += _consent_problems()
    if problems:
        raise HookError("aiortc/aioice internals changed: " + ", ".join(problems))


def new_peer_connection() -> RTCPeerConnection:
    """Every peer connection lotcast creates: no ICE servers (the default public STUN server
    adds seconds and is unreachable here), with the DTLS and SRTP fixes below installed."""
    install_transport_fixes()
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


_fixes_installed = False


def install_transport_fixes() -> None:
    """Patch aiortc once per process: RSA-capable DTLS suites, and SRTP buffers that fit every
    packet the receive path accepts (on receive, protect and both RTCP directions)."""
    global _fixes_installed
    if _fixes_installed:
        return
    _fixes_installed = True
    original_context = RTCCertificate._create_ssl_context
    original_setup = RTCDtlsTransport._setup_srtp

    def create_ssl_context(self: RTCCertificate, *args: Any, **kwargs: Any) -> Any:
        ctx = original_context(self, *args, **kwargs)
        ctx.set_cipher_list(DTLS_CIPHERS)
        return ctx

    def setup_srtp(self: RTCDtlsTransport) -> None:
        original_setup(self)
        for session in (self._rx_srtp, self._tx_srtp):
            if session is not None:
                _widen_srtp_session(session)

    RTCCertificate._create_ssl_context = create_ssl_context  # type: ignore[method-assign]
    RTCDtlsTransport._setup_srtp = setup_srtp  # type: ignore[method-assign]


oversize_datagrams = 0  # SRTP datagrams dropped for exceeding MAX_SRTP_PACKET (process-wide)


def _widen_srtp_session(session: Any) -> None:
    ffi = pylibsrtp_binding.ffi
    session._cdata = ffi.new("char[]", SRTP_BUFFER_SIZE)
    session._buffer = ffi.buffer(session._cdata)
    for name in ("unprotect", "unprotect_rtcp"):
        setattr(session, name, _refuse_oversize(getattr(session, name)))


def _refuse_oversize(unprotect: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    def guarded(data: bytes) -> bytes:
        if len(data) > MAX_SRTP_PACKET:
            global oversize_datagrams
            oversize_datagrams += 1
            # aiortc's receive loop drops a packet on pylibsrtp.Error and goes on
            raise pylibsrtp.Error(f"datagram of {len(data)} bytes exceeds {MAX_SRTP_PACKET}")
        return unprotect(data)

    return guarded


def negotiated_codecs(transceiver: RTCRtpTransceiver) -> list[RTCRtpCodecParameters]:
    """The media codecs (no RTX) a transceiver settled on, in preference order."""
    return [c for c in transceiver._codecs if not c.mimeType.lower().endswith("/rtx")]


def negotiated_extension_id(transceiver: RTCRtpTransceiver, uri: str) -> int:
    """The id the remote side gave header extension ``uri`` on this transceiver (0: none)."""
    return next((e.id for e in transceiver._headerExtensions if e.uri == uri), 0)


def selected_candidate_types(pc: RTCPeerConnection) -> tuple[str, str] | None:
    """The (local, remote) ICE candidate types ("host", "srflx", "prflx", "relay") of the pair
    ICE nominated for ``pc``'s media (bundled: the first transport), None until there is one."""
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        if dtls is None:
            continue
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None:
            return None
        return pair.local_candidate.type, pair.remote_candidate.type
    return None


def relayed_through_turn(pc: RTCPeerConnection) -> bool:
    """Does ``pc``'s media go through a TURN server (either side's candidate is a relay)?"""
    types = selected_candidate_types(pc)
    return types is not None and "relay" in types


def restrict_host_addresses(addresses: list[str]) -> None:
    """Gather ICE host candidates only on these addresses (aioice otherwise uses every
    interface and skips loopback)."""
    fixed = list(addresses)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in fixed if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses  # type: ignore[assignment]


class _ForwardingTap:
    """Stands in for the receiver's jitter buffer: hands every (RTX-unwrapped, in-order or not)
    packet to the forwarder and never releases a frame, so nothing is decoded."""

    def __init__(self, on_packet: RtpTap) -> None:
        self._on_packet = on_packet

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        self._on_packet(packet)
        return False, None


def tap_receiver(receiver: RTCRtpReceiver, on_packet: RtpTap, on_sr: SenderReportTap) -> None:
    """Route a receiver's packets to ``on_packet`` instead of its decoder."""
    if not hasattr(receiver, _JITTER_ATTR):
        raise HookError("RTCRtpReceiver has no jitter buffer attribute")
    setattr(receiver, _JITTER_ATTR, _ForwardingTap(on_packet))
    original = receiver._handle_rtcp_packet

    async def handle_rtcp(packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            info = packet.sender_info
            on_sr(packet.ssrc, info.ntp_timestamp, info.rtp_timestamp)
        await original(packet)

    receiver._handle_rtcp_packet = handle_rtcp  # type: ignore[method-assign]


def request_keyframe(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    """Send a PLI for ``media_ssrc`` to whoever sends us this stream."""
    task = asyncio.ensure_future(receiver._send_rtcp_pli(media_ssrc))
    _in_flight.add(task)
    task.add_done_callback(_in_flight.discard)


_in_flight: set[asyncio.Future[None]] = set()


class SenderFeedback:
    """Callbacks for RTCP a viewer sends back about one of our forwarded streams."""

    def __init__(self, on_nack: Callable[[list[int]], None],
                 on_keyframe_request: Callable[[], None], on_alive: Callable[[], None]) -> None:
        self.on_nack = on_nack
        self.on_keyframe_request = on_keyframe_request
        self.on_alive = on_alive


def hook_sender(sender: RTCRtpSender, ssrc: int, feedback: SenderFeedback) -> None:
    """Make ``sender`` announce ``ssrc`` (set before createAnswer) and route NACK/PLI/FIR to the
    forwarder instead of aiortc's (empty) history and (absent) encoder."""
    sender._ssrc = ssrc
    original = sender._handle_rtcp_packet

    async def handle_rtcp(packet: Any) -> None:
        feedback.on_alive()
        if isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            feedback.on_nack(list(packet.lost))
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            feedback.on_keyframe_request()
        else:
            await original(packet)

    sender._handle_rtcp_packet = handle_rtcp  # type: ignore[method-assign]


def set_sender_report(sender: RTCRtpSender, ntp: int, rtp_timestamp: int, packets: int,
                      octets: int) -> None:
    """The values aiortc's RTCP loop puts in this sender's next Sender Report."""
    for name, value in zip(_SR_FIELDS, (ntp, rtp_timestamp, packets, octets), strict=True):
        setattr(sender, name, value)


def quiet_sender_rtcp(sender: RTCRtpSender, ssrc: int) -> None:
    """Lean RTCP (lotcast/media/viewer_rtcp.py): make ``sender`` announce ``ssrc`` and replace
    its RTCP task (a wake-up and a Sender Report every 0.5-1.5 s, per sender) by one that only
    waits to be cancelled, keeping the started/exited events `RTCRtpSender.stop()` awaits. Call
    before the sender starts. No RTCP BYE is sent when it stops (the viewer's DTLS ends too)."""
    sender._ssrc = ssrc
    started: asyncio.Event = getattr(sender, _RTCP_STARTED)
    exited: asyncio.Event = getattr(sender, _RTCP_EXITED)

    async def run_rtcp() -> None:
        started.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            pass
        exited.set()

    sender._run_rtcp = run_rtcp  # type: ignore[method-assign]


def route_rtcp(dtls: RTCDtlsTransport, on_rtcp: Callable[[bytes], None]) -> None:
    """Lean RTCP: hand every decrypted RTCP compound packet ``dtls`` receives to ``on_rtcp``
    instead of aiortc's parser and router (which then never see it).

    SRTCP datagrams are taken as aioice hands them to the ICE connection, decrypted and handled
    there and then, so they skip the connection's queue and the wake-up of the DTLS receive
    task (per datagram, most of what a viewer's RTCP cost). Anything else (STUN answered by
    aioice before this, DTLS, SRTCP before SRTP keys exist) goes the usual way, where the
    decrypted RTCP also lands in ``on_rtcp``."""

    async def handle_rtcp_data(data: bytes) -> None:
        on_rtcp(data)

    dtls._handle_rtcp_data = handle_rtcp_data  # type: ignore[method-assign]
    connection = dtls.transport._connection
    queue_datagram = connection.data_received
    unprotect: list[Any] = [None, None]  # (the rx session, its fast unprotect)

    def data_received(data: bytes, component: int) -> None:
        srtp = dtls._rx_srtp
        if srtp is not None and len(data) >= 2 and 127 < data[0] < 192 and 192 <= data[1] <= 208:
            if unprotect[0] is not srtp:
                unprotect[:] = [srtp, fast_unprotect_rtcp(srtp)]
            try:
                plain = unprotect[1](data)
            except pylibsrtp.Error:  # a replay, a forgery or too large: dropped, as aiortc does
                return
            on_rtcp(plain)
            return
        queue_datagram(data, component)

    connection.data_received = data_received  # type: ignore[method-assign]


consent_answers_fast = 0  # ICE checks answered by answer_consent_checks_fast (process-wide)


def answer_consent_checks_fast(dtls: RTCDtlsTransport) -> bool:
    """Lean per-viewer path: answer the ICE checks the peer keeps sending on the nominated pair
    (consent freshness) with `stun_fast.binding_success`, skipping aioice's generic response
    building. Only a check aioice would answer the same way is taken: a Binding request on the
    nominated pair's socket from its remote address, authenticated (USERNAME and
    MESSAGE-INTEGRITY checked as aioice does), with no USE-CANDIDATE and no role conflict; for
    such a check aioice's incoming-check bookkeeping has nothing left to do. Anything else goes to
    aioice. Call once connected; False if no pair is nominated yet."""
    connection = dtls.transport._connection
    pair = connection._nominated.get(1)
    if pair is None:
        return False
    original = connection.request_received
    protocol, remote = pair.protocol, tuple(pair.remote_addr[:2])
    password = connection.local_password.encode("utf8")
    role_conflict = "ICE-CONTROLLING" if connection.ice_controlling else "ICE-CONTROLLED"

    def request_received(message: Any, addr: tuple[str, int], via: Any) -> None:
        attributes = message.attributes
        global consent_answers_fast
        if (via is protocol and addr == remote and not connection._closing
                and message.message_method == aioice.stun.Method.BINDING
                and connection.ice_controlling is (role_conflict == "ICE-CONTROLLING")
                and "USE-CANDIDATE" not in attributes and role_conflict not in attributes
                and "MESSAGE-INTEGRITY" in attributes and "USERNAME" in attributes
                and connection._valid_username(attributes["USERNAME"])
                and message.check_message_integrity(password)):
            protocol.transport.sendto(binding_success(message.transaction_id, addr, password),
                                      addr)
            consent_answers_fast += 1
            return
        original(message, addr, via)

    connection.request_received = request_received  # type: ignore[method-assign,assignment]
    return True


class ConsentTarget:
    """What one connection's consent checks need (lotcast/media/consent.py), taken from its
    aioice Connection and nominated pair: who we are to the peer, how to send to it, and how to
    hear its answer to a transaction id."""

    __slots__ = ("_connection", "_protocol", "_remote", "controlling", "password", "priority",
                 "tie_breaker", "username")

    def __init__(self, connection: aioice.ice.Connection, pair: aioice.ice.CandidatePair) -> None:
        self._connection = connection
        self._protocol = pair.protocol
        self._remote = tuple(pair.remote_addr[:2])
        self.username = f"{connection.remote_username}:{connection.local_username}"
        self.password = str(connection.remote_password).encode("utf8")
        self.priority = aioice.candidate.candidate_priority(pair.component, "prflx")
        self.controlling = bool(connection.ice_controlling)
        self.tie_breaker = int(connection._tie_breaker)

    @property
    def closed(self) -> bool:
        transport = self._protocol.transport
        return bool(self._connection._closing or transport is None or transport.is_closing())

    def send(self, data: bytes) -> None:
        self._protocol.transport.sendto(data, self._remote)

    def expect(self, transaction_id: bytes, answered: Callable[[bool], None]) -> None:
        """Call ``answered(ok)`` when the peer's response to ``transaction_id`` arrives: ok for
        a success response authenticated with the peer's password, False for an error one."""
        self._protocol.transactions[transaction_id] = _ConsentAnswer(  # type: ignore[assignment]
            answered, self.password)

    def forget(self, transaction_id: bytes) -> None:
        self._protocol.transactions.pop(transaction_id, None)

    def close(self) -> None:
        """Consent expired: close the connection (aiortc then closes the peer connection)."""
        task = asyncio.ensure_future(self._connection.close())
        _in_flight.add(task)
        task.add_done_callback(_in_flight.discard)


class _ConsentAnswer:
    """Sits in aioice's StunProtocol.transactions like a Transaction: its datagram_received
    hands it the parsed response."""

    __slots__ = ("_answered", "_password")

    def __init__(self, answered: Callable[[bool], None], password: bytes) -> None:
        self._answered = answered
        self._password = password

    def response_received(self, message: aioice.stun.Message, addr: tuple[str, int]) -> None:
        if message.message_class == aioice.stun.Class.RESPONSE:
            if message.check_message_integrity(self._password):
                self._answered(True)  # else: a forgery; the check times out
        else:
            self._answered(False)


def take_over_consent(dtls: RTCDtlsTransport) -> ConsentTarget | None:
    """Stop aioice's consent task of ``dtls``'s connection (a task and a transaction with its
    timer per check, per connection) and hand its checks to the caller's clock; None when no
    pair is nominated yet."""
    connection = dtls.transport._connection
    pair = connection._nominated.get(1)
    if pair is None or connection.remote_password is None or pair.protocol.transport is None:
        return None
    task = connection._query_consent_task
    if task is not None:
        task.cancel()
        connection._query_consent_task = None
    return ConsentTarget(connection, pair)


def _consent_problems() -> list[str]:
    problems: list[str] = []
    connect_src = inspect.getsource(aioice.ice.Connection.connect)
    if "self._query_consent_task = asyncio.create_task(self.query_consent())" not in connect_src:
        problems.append("aioice.ice.Connection._query_consent_task")
    for needle in ("self._tie_breaker", "self.remote_password", "self.remote_username"):
        if needle not in inspect.getsource(aioice.ice.Connection):
            problems.append(f"aioice.ice.Connection {needle}")
    received = inspect.getsource(aioice.ice.StunProtocol.datagram_received)
    if ("transaction = self.transactions[message.transaction_id]" not in received
            or "transaction.response_received(message, addr)" not in received):
        problems.append("aioice.ice.StunProtocol.transactions")
    return problems


def observe_rtcp(dtls: RTCDtlsTransport, observer: Callable[[bytes], None]) -> None:
    """Tests: show ``observer`` every decrypted RTCP compound packet ``dtls`` receives, then let
    aiortc handle it as usual."""
    original = dtls._handle_rtcp_data

    async def handle_rtcp_data(data: bytes) -> None:
        observer(data)
        await original(data)

    dtls._handle_rtcp_data = handle_rtcp_data  # type: ignore[method-assign]


def peer_cname(pc: RTCPeerConnection) -> str | None:
    """The RTCP CNAME aiortc announces for ``pc``'s senders (its SDP's a=ssrc cname)."""
    cname = getattr(pc, "_RTCPeerConnection__cname", None)
    return cname if isinstance(cname, str) else None


def fast_protect(session: Any) -> Callable[[bytes], bytes]:
    """SRTP protect for one pylibsrtp Session without its per-call checks and allocation.

    Same libsrtp call on the session's own buffer; about a third of pylibsrtp's per-packet Python
    overhead goes away, which matters at one call per packet per viewer.
    """
    ffi, lib = pylibsrtp_binding.ffi, pylibsrtp_binding.lib
    srtp, cdata, buffer = session._srtp[0], session._cdata, session._buffer
    protect_fn = lib.srtp_protect
    limit = len(cdata) - pylibsrtp.SRTP_MAX_TRAILER_LEN
    length = ffi.new("int *")

    def protect(data: bytes, _session: Any = session) -> bytes:  # holds the srtp_t alive
        size = len(data)
        if size > limit:
            raise ValueError(f"RTP packet of {size} bytes exceeds the {limit}-byte SRTP buffer")
        length[0] = size
        buffer[0:size] = data
        if protect_fn(srtp, cdata, length) != 0:
            raise pylibsrtp.Error("srtp_protect failed")
        return bytes(buffer[0:length[0]])

    return protect


_SRTP_PROTECT_CTYPE = "srtp_err_status_t(*)(struct srtp_ctx_t_ *, void *, int *)"


def fast_unprotect_rtcp(session: Any) -> Callable[[bytes], bytes]:
    """SRTCP unprotect for one (widened) pylibsrtp Session without its per-call checks: the
    same libsrtp call on the session's own buffer, as `fast_protect` does for RTP. Raises
    pylibsrtp.Error for a datagram libsrtp refuses or one above MAX_SRTP_PACKET."""
    ffi, lib = pylibsrtp_binding.ffi, pylibsrtp_binding.lib
    srtp, cdata, buffer = session._srtp[0], session._cdata, session._buffer
    unprotect_fn = lib.srtp_unprotect_rtcp
    limit = min(MAX_SRTP_PACKET, len(cdata))
    length = ffi.new("int *")

    def unprotect(data: bytes, _session: Any = session) -> bytes:  # holds the srtp_t alive
        size = len(data)
        if size > limit:
            global oversize_datagrams
            oversize_datagrams += 1
            raise pylibsrtp.Error(f"datagram of {size} bytes exceeds {limit}")
        length[0] = size
        buffer[0:size] = data
        if unprotect_fn(srtp, cdata, length) != 0:
            raise pylibsrtp.Error("srtp_unprotect_rtcp failed")
        return bytes(buffer[0:length[0]])

    return unprotect


def srtp_protect_address() -> int:
    """Address of srtp_protect in the libsrtp that pylibsrtp ships (for the native path)."""
    ffi, lib = pylibsrtp_binding.ffi, pylibsrtp_binding.lib
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, "srtp_protect")))


def native_target(session: Any, fd: int, addr: tuple[Any, ...]) -> NativeTarget:
    """Everything the native fan-out needs to protect and send for one sink: the session's
    srtp_t (kept alive through the target), its buffer limit as `fast_protect` computes it,
    the socket's fd and the destination address (IPv4, IPv6 with scope, or an AF_UNIX path)."""
    ffi = pylibsrtp_binding.ffi
    srtp = int(ffi.cast("uintptr_t", session._srtp[0]))
    limit = len(session._cdata) - pylibsrtp.SRTP_MAX_TRAILER_LEN
    if isinstance(addr, str):
        host, port, scope_id = addr, 0, 0
    else:
        host, port = str(addr[0]), int(addr[1])
        scope_id = int(addr[3]) if len(addr) >= 4 else 0
        if "%" in host and not scope_id:  # fe80::1%eth0: the zone as an interface index
            zone = host.split("%", 1)[1]
            scope_id = int(zone) if zone.isdigit() else socket.if_nametoindex(zone)
    return NativeTarget(srtp_protect_address(), srtp, fd, host, port, scope_id, limit, (session,))


class PacketSender:
    """Sends already-built RTP on one peer connection: SRTP protect, then UDP sendto.

    Resolved once the DTLS transport is connected; `protect` and `sendto` are the Python
    per-packet path. `sendto` is the raw socket's (asyncio's transport wrapper costs more than
    the send); a full socket buffer raises BlockingIOError, which callers count as a loss, as UDP
    would. `native` is the same session, socket and address for the native fan-out
    (lotcast/media/native.py); a forwarder reads it when it rebuilds its sink sets, and rebuilds
    them whenever `resolve()` runs again (`on_resolve`).
    """

    __slots__ = ("_dtls", "_on_resolve", "_protect_rtcp", "_transport", "addr", "native",
                 "protect", "sendto")

    def __init__(self, dtls: RTCDtlsTransport) -> None:
        self._dtls = dtls
        self._transport: Any = None
        self._protect_rtcp: Callable[[bytes], bytes] | None = None
        self.protect: Callable[[bytes], bytes] | None = None
        self.sendto: Callable[[bytes, Any], Any] | None = None
        self.addr: tuple[str, int] | None = None
        # what the native fan-out needs (None: this sink stays on the Python path)
        self.native: NativeTarget | None = None
        self._on_resolve: list[Callable[[], None]] = []

    def on_resolve(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after every successful `resolve()`; returns its canceller."""
        self._on_resolve.append(callback)

        def cancel() -> None:
            if callback in self._on_resolve:
                self._on_resolve.remove(callback)

        return cancel

    def alive(self) -> bool:
        """The transport can still carry packets (a failed send on a live one is one lost
        packet, not a dead viewer)."""
        transport = self._transport
        return (self._dtls.state == "connected" and transport is not None
                and not transport.is_closing())

    def resolve(self) -> bool:
        """Bind to the current SRTP context and selected ICE pair; False if not connected."""
        dtls = self._dtls
        srtp = getattr(dtls, "_tx_srtp", None)
        if dtls.state != "connected" or srtp is None:
            return False
        pair = dtls.transport._connection._nominated.get(1)
        transport = None if pair is None else pair.protocol.transport
        if pair is None or transport is None:
            return False
        # asyncio's selector transport: its raw socket; uvloop's (C) transport: its own sendto
        sock = getattr(transport, "_sock", None)
        self._transport = transport
        self.protect = fast_protect(srtp)
        self._protect_rtcp = srtp.protect_rtcp
        self.sendto = sock.sendto if sock is not None else transport.sendto
        self.addr = pair.remote_addr
        # the UDP socket under either transport; the C loop sends on its fd and checks, per
        # send, that the fd still is this socket (not a closed one's number reused)
        raw = sock if sock is not None else transport.get_extra_info("socket")
        fd = raw.fileno() if raw is not None else -1
        self.native = native_target(srtp, fd, pair.remote_addr) if fd >= 0 else None
        for callback in list(self._on_resolve):
            callback()
        return True

    def send(self, packet: bytes) -> None:
        assert self.protect is not None and self.sendto is not None
        try:
            self.sendto(self.protect(packet), self.addr)
        except BlockingIOError:
            pass

    def send_rtcp(self, packet: bytes) -> None:
        """SRTCP-protect and send one RTCP compound packet (a full socket buffer: lost)."""
        if self._protect_rtcp is None or self.sendto is None or not self.alive():
            return
        try:
            self.sendto(self._protect_rtcp(packet), self.addr)
        except BlockingIOError:
            pass


class SilentTrack(MediaStreamTrack):
    """A track whose recv never yields: keeps a sendonly transceiver (and its RTCP/DTLS) alive
    while RTP is forwarded around aiortc's encoder."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._never: asyncio.Future[None] | None = None

    async def recv(self) -> Any:
        self._never = asyncio.get_running_loop().create_future()
        await self._never
        raise MediaStreamError

    def stop(self) -> None:
        super().stop()
        if self._never is not None and not self._never.done():
            self._never.cancel()


def set_encoder_bitrate(sender: RTCRtpSender, bitrate: int) -> bool:
    """Benchmark publishers: pin aiortc's encoder target bitrate (no REMB ramp); False until
    the encoder exists (it is created with the first frame)."""
    encoder = getattr(sender, "_RTCRtpSender__encoder", None)
    if encoder is None or not hasattr(encoder, "target_bitrate"):
        return False
    encoder.target_bitrate = bitrate
    return True


def drop_incoming_rtp(dtls: RTCDtlsTransport, should_drop: Callable[[bytes], bool]) -> None:
    """Fault injection for tests: discard incoming SRTP datagrams for which ``should_drop`` is
    true (it sees the cleartext RTP header) before decryption, as if the network lost them."""
    ice = dtls.transport
    original = ice._recv

    async def recv() -> bytes:
        while True:
            data: bytes = await original()
            is_rtp = len(data) >= 12 and 128 <= data[0] < 192 and not 192 <= data[1] <= 223
            if not (is_rtp and should_drop(data)):
                return data

    ice._recv = recv


def ignore_binding_requests(dtls: RTCDtlsTransport) -> None:
    """Fault injection for tests: ``dtls``'s ICE connection stops answering STUN Binding
    requests, as a peer that withdrew consent (RFC 7675) or whose path back is gone."""
    connection = dtls.transport._connection

    def request_received(message: Any, addr: tuple[str, int], via: Any) -> None:
        return None

    connection.request_received = request_received  # type: ignore[method-assign,assignment]


# --- One UDP port per worker (lotcast/media/udpmux.py) ---------------------------------------
# A peer connection put on the mux (`use_udp_mux`, before its local description is set) gathers
# its host candidate on the worker's one shared socket instead of a socket of its own: aioice's
# host gathering for that Connection is replaced by one StunProtocol whose transport is the mux's
# per-connection MuxTransport, registered under the Connection's local ufrag. STUN, DTLS, SRTP
# and SRTCP then all flow through aioice as before (StunProtocol.datagram_received), and the
# pair's `protocol.transport._sock` is the shared socket, so PacketSender and the native fan-out
# send every viewer's packets on one fd. TURN relay candidates, if configured, are still
# gathered by aioice on their own sockets.

_mux_address: tuple[str, int] | None = None
_mux_announce: str | None = None  # the host candidates' address, if not the bound one
_mux: UdpMux | None = None
_mux_loop: asyncio.AbstractEventLoop | None = None
_mux_lock: asyncio.Lock | None = None


def _udp_mux_problems() -> list[str]:
    problems: list[str] = []
    ice_src = inspect.getsource(aioice.ice.Connection)
    for needle in ("self._protocols", "self.get_component_candidates(",
                   "def get_component_candidates(", "def local_username("):
        if needle not in ice_src:
            problems.append(f"aioice.ice.Connection {needle}")
    stun_src = inspect.getsource(aioice.ice.StunProtocol)
    for needle in ("def datagram_received(self, data", "def connection_made(self, transport",
                   "self.transport.sendto(", "self.receiver.protocol_lost(self)"):
        if needle not in stun_src:
            problems.append(f"aioice.ice.StunProtocol {needle}")
    for name in ("candidate_foundation", "candidate_priority", "Candidate"):
        if not hasattr(aioice.candidate, name):
            problems.append(f"aioice.candidate.{name}")
    return problems


def configure_udp_mux(host: str, port: int, announce: str | None = None) -> None:
    """Serve every peer connection put on the mux from one UDP socket bound to (host, port),
    opened by `open_udp_mux()` at service start, else with the first of them (port 0: any
    free port, for tests). With ``announce``, their host candidates carry that address (and the
    bound port) instead of the bound one: a NAT in front (a k8s hostPort) maps it to ours."""
    global _mux_address, _mux_announce
    _mux_address = (host, port)
    _mux_announce = announce or None


def udp_mux_enabled() -> bool:
    return _mux_address is not None


def current_udp_mux() -> UdpMux | None:
    """The open mux of this process, if any (its routing tables, for stats and tests)."""
    return _mux if _mux is not None and not _mux.closed else None


async def _shared_mux() -> UdpMux:
    global _mux, _mux_loop, _mux_lock
    loop = asyncio.get_running_loop()
    if _mux_loop is not loop:  # a new event loop (tests): the old mux died with the old loop
        _mux, _mux_loop, _mux_lock = None, loop, asyncio.Lock()
    assert _mux_lock is not None and _mux_address is not None
    async with _mux_lock:
        if _mux is None or _mux.closed:
            _mux = await UdpMux.open(*_mux_address)
            logger.info("udp mux: serving peer connections on %s:%d", *_mux.sockname[:2])
        return _mux


async def open_udp_mux() -> UdpMux | None:
    """Open this process's mux socket now (service start: a port in use fails the start, not
    the first viewer); None when no mux is configured."""
    if _mux_address is None:
        return None
    return await _shared_mux()


def close_udp_mux() -> None:
    """Close this process's mux socket (service shutdown, tests); connections on it close."""
    global _mux
    if _mux is not None:
        _mux.close()
        _mux = None


def use_udp_mux(pc: RTCPeerConnection) -> bool:
    """Put ``pc``'s ICE transports on the shared socket, if a mux is configured; call after
    setRemoteDescription (which settles the bundled transports) and before setLocalDescription
    (which gathers). False when no mux is configured."""
    if _mux_address is None:
        return False
    seen: set[int] = set()
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    for dtls in transports:
        if dtls is None or id(dtls.transport) in seen:
            continue
        seen.add(id(dtls.transport))
        _gather_on_mux(dtls.transport._connection)
    return True


def _gather_on_mux(connection: aioice.ice.Connection) -> None:
    original = connection.get_component_candidates

    async def get_component_candidates(component: int, addresses: list[str],
                                       timeout: int = 5,  # noqa: ASYNC109 (aioice's own)
                                       ) -> list[aioice.candidate.Candidate]:
        if component != 1 or not addresses:  # rtcp-mux: component 1 only; relay-only policy
            return await original(component=component, addresses=addresses, timeout=timeout)
        mux = await _shared_mux()
        protocol = aioice.ice.StunProtocol(connection)
        protocol.connection_made(mux.register(connection.local_username, protocol))
        host, port = _mux_announce or mux.sockname[0], int(mux.sockname[1])
        protocol.local_candidate = aioice.candidate.Candidate(
            foundation=aioice.candidate.candidate_foundation("host", "udp", host),
            component=component, transport="udp",
            priority=aioice.candidate.candidate_priority(component, "host"),
            host=host, port=port, type="host")
        connection._protocols.append(protocol)
        # no host sockets of its own; TURN (if any) as aioice does it
        others = await original(component=component, addresses=[], timeout=timeout)
        return [protocol.local_candidate, *others]

    connection.get_component_candidates = get_component_candidates  # type: ignore[method-assign]


# --- Simulcast ingest (RFC 8853) ---------------------------------------------------------------
# aiortc's RTCRtpReceiver is built for one incoming stream: its router hands every SSRC of the
# video payload type to the one receiver, whose single NACK generator and RTX table assume one
# SSRC, and its SDP ignores a=simulcast/a=rid and the rid header extensions. For a simulcast
# publisher lotcast negotiates the rid extensions itself (`negotiate_rid_extensions`), answers the
# simulcast lines (lotcast/media/sdp.py `answer_simulcast`), and `tap_simulcast_receiver` sorts
# packets into layers before aiortc's receive path: the rid (or repaired rid, for RTX) header
# extension names a packet's layer, and its SSRC is remembered, since a browser stops sending the
# extensions once our receiver reports acknowledge that SSRC. aiortc's path then does per-SSRC
# work as before (receiver statistics and reports, REMB), RTX unwrap through the RTX table the
# demux fills in, and NACKs from one generator per SSRC.

_RTX_SSRC_ATTR = "_RTCRtpReceiver__rtx_ssrc"
_NACK_ATTR = "_RTCRtpReceiver__nack_generator"

LayerTap = Callable[[str, RtpPacket], None]
LayerReportTap = Callable[[str, int, int, int], None]  # rid, ssrc, ntp timestamp, rtp timestamp


def check_simulcast_hooks() -> list[str]:
    problems: list[str] = []
    receiver_src = inspect.getsource(RTCRtpReceiver)
    for needle in ("self.__rtx_ssrc: dict[int, int] = {}",
                   "original_ssrc = self.__rtx_ssrc.get(packet.ssrc)",
                   "self.__nack_generator.add(packet)", "sorted(self.__nack_generator.missing)"):
        if needle not in receiver_src:
            problems.append(f"RTCRtpReceiver {needle}")
    pc_src = inspect.getsource(RTCPeerConnection)
    if "headerExtensions=transceiver._headerExtensions" not in pc_src:
        problems.append("RTCPeerConnection transceiver._headerExtensions")
    from aiortc.rtp import HeaderExtensions

    for field_name in ("rtp_stream_id", "repaired_rtp_stream_id"):
        if field_name not in HeaderExtensions.__dataclass_fields__:
            problems.append(f"aiortc.rtp.HeaderExtensions.{field_name}")
    return problems


def negotiate_rid_extensions(transceiver: RTCRtpTransceiver, rid_id: int,
                             repaired_id: int | None) -> None:
    """Add the offer's rid header extensions to what ``transceiver`` negotiated (call between
    setRemoteDescription and createAnswer): the answer lists them and the transport parses
    them into RtpPacket.extensions."""
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters

    from lotcast.media.sdp import REPAIRED_RID_URI, RID_URI

    have = {ext.uri for ext in transceiver._headerExtensions}
    wanted = [(RID_URI, rid_id)] + ([(REPAIRED_RID_URI, repaired_id)] if repaired_id else [])
    for uri, ext_id in wanted:
        if uri not in have:
            transceiver._headerExtensions.append(RTCRtpHeaderExtensionParameters(id=ext_id, uri=uri))


class _PerSsrcNacks:
    """aiortc's NackGenerator interface (`add`, then `missing`) with one generator per SSRC."""

    def __init__(self) -> None:
        self._generators: dict[int, Any] = {}
        self.missing: set[int] = set()

    def add(self, packet: RtpPacket) -> bool:
        from aiortc.rtcrtpreceiver import NackGenerator

        generator = self._generators.get(packet.ssrc)
        if generator is None:
            generator = self._generators[packet.ssrc] = NackGenerator()
        missed: bool = generator.add(packet)
        self.missing = generator.missing
        return missed


class SimulcastDemux:
    """Which layer (rid) each SSRC of one simulcast video receiver carries."""

    def __init__(self, rids: tuple[str, ...]) -> None:
        self.rids = rids
        self.layer_of: dict[int, str] = {}  # media SSRC -> rid
        self.ssrc_of: dict[str, int] = {}  # rid -> media SSRC
        self.rtx_layer_of: dict[int, str] = {}  # RTX SSRC -> rid
        self.unknown_dropped = 0  # packets of an SSRC no rid named yet

    def classify(self, packet: RtpPacket, rtx_table: dict[int, int]) -> bool:
        """Learn from ``packet``'s rid extensions; False: drop it (its layer is unknown)."""
        ext = packet.extensions
        rid = ext.rtp_stream_id
        if rid is not None and rid in self.rids and self.layer_of.get(packet.ssrc) != rid:
            old = self.ssrc_of.get(rid)
            if old is not None:
                self.layer_of.pop(old, None)
            self.layer_of[packet.ssrc] = rid
            self.ssrc_of[rid] = packet.ssrc
            for rtx_ssrc, rtx_rid in self.rtx_layer_of.items():
                if rtx_rid == rid:
                    rtx_table[rtx_ssrc] = packet.ssrc
        repaired = ext.repaired_rtp_stream_id
        if repaired is not None and repaired in self.rids:
            self.rtx_layer_of[packet.ssrc] = repaired
            media = self.ssrc_of.get(repaired)
            if media is not None:
                rtx_table[packet.ssrc] = media
        if packet.ssrc in self.layer_of or packet.ssrc in self.rtx_layer_of:
            return True
        self.unknown_dropped += 1
        return False


def tap_simulcast_receiver(receiver: RTCRtpReceiver, rids: tuple[str, ...], on_packet: LayerTap,
                           on_sr: LayerReportTap) -> SimulcastDemux:
    """Route a simulcast receiver's packets, by layer, to ``on_packet(rid, packet)`` instead
    of its decoder (RTX unwrapped, NACKs generated per SSRC), and SRs to ``on_sr``."""
    if not hasattr(receiver, _JITTER_ATTR) or not hasattr(receiver, _RTX_SSRC_ATTR):
        raise HookError("RTCRtpReceiver has no jitter buffer / RTX table attribute")
    demux = SimulcastDemux(rids)
    layer_of = demux.layer_of

    def on_unwrapped(packet: RtpPacket) -> None:
        rid = layer_of.get(packet.ssrc)
        if rid is not None:
            on_packet(rid, packet)

    setattr(receiver, _JITTER_ATTR, _ForwardingTap(on_unwrapped))
    original_rtp = receiver._handle_rtp_packet
    rtx_table: dict[int, int] = getattr(receiver, _RTX_SSRC_ATTR)

    async def handle_rtp(packet: RtpPacket, arrival_time_ms: int) -> None:
        if not isinstance(getattr(receiver, _NACK_ATTR, None), (_PerSsrcNacks, type(None))):
            setattr(receiver, _NACK_ATTR, _PerSsrcNacks())  # created by receive(): swap once
        if demux.classify(packet, rtx_table):
            await original_rtp(packet, arrival_time_ms)

    receiver._handle_rtp_packet = handle_rtp  # type: ignore[method-assign]
    original_rtcp = receiver._handle_rtcp_packet

    async def handle_rtcp(packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            rid = layer_of.get(packet.ssrc)
            if rid is not None:
                info = packet.sender_info
                on_sr(rid, packet.ssrc, info.ntp_timestamp, info.rtp_timestamp)
        await original_rtcp(packet)

    receiver._handle_rtcp_packet = handle_rtcp  # type: ignore[method-assign]
    return demux
