"""WebRTC peer sessions: a publisher feeding a stream (ingest) or a viewer fed by one (egress).

Each session owns its RTCPeerConnection. A session is created whole or not at all: any failure
while negotiating closes the peer connection before the error reaches the HTTP layer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable

from aiortc import (
    RTCRtpCodecCapability,
    RTCRtpCodecParameters,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)

from lotcast.media.aiortc_hooks import (
    PacketSender,
    SenderFeedback,
    SilentTrack,
    answer_consent_checks_fast,
    hook_sender,
    negotiate_rid_extensions,
    negotiated_codecs,
    negotiated_extension_id,
    new_peer_connection,
    peer_cname,
    quiet_sender_rtcp,
    route_rtcp,
    take_over_consent,
    use_udp_mux,
)
from lotcast.media.auto_layer import AutoLayer
from lotcast.media.consent import consent_clock, lean_consent_enabled
from lotcast.media.forwarder import ForwardSink, TrackForwarder
from lotcast.media.sdp import (
    ABS_SEND_TIME_URI,
    IceCredentials,
    OfferSummary,
    SdpError,
    TrickleFragment,
    answer_simulcast,
    ice_credentials,
    parse_description,
    transport_mids,
    without_receive_estimate,
)
from lotcast.media.stream import MediaStream
from lotcast.media.viewer_rtcp import ViewerRtcp, lean_rtcp_enabled, viewer_estimate_enabled

logger = logging.getLogger(__name__)


class SessionState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class PeerSession:
    """Base: one peer connection, its HTTP resource identity and its lifecycle."""

    kind = "peer"

    def __init__(self, stream: MediaStream) -> None:
        self.id = secrets.token_urlsafe(12)
        self.etag = '"' + secrets.token_hex(8) + '"'
        self.stream = stream
        self.pc = new_peer_connection()
        self.state = SessionState.CONNECTING
        self.created = time.monotonic()
        self.last_alive = self.created
        self.connected_at: float | None = None
        self._on_close: list[Callable[[PeerSession], None]] = []
        self._closing: asyncio.Task[None] | None = None
        # the offer's ICE credentials (a PATCH repeating them is a trickle, not a restart)
        self.remote_ice: set[IceCredentials] = set()
        self._transport_mids: dict[str, str] = {}

        @self.pc.on("connectionstatechange")
        def _on_state() -> None:
            state = self.pc.connectionState
            if state == "connected":
                self._on_connected()
            elif state in ("failed", "closed"):
                self.close_soon(f"peer connection {state}")

    def _set_state(self, new: SessionState) -> None:
        if new is self.state:
            return
        if self.state is SessionState.CLOSED:
            raise RuntimeError(f"{self.kind} session {self.id} is closed")
        logger.info("%s %s/%s: %s -> %s", self.kind, self.stream.id, self.id, self.state.value,
                    new.value)
        self.state = new

    def _on_connected(self) -> None:
        if self.state is SessionState.CONNECTING:
            self.connected_at = time.monotonic()
            self.touch()
            self._set_state(SessionState.CONNECTED)
            self.started()

    def started(self) -> None:
        """Called once the peer is connected."""

    def touch(self) -> None:
        self.last_alive = time.monotonic()

    def on_close(self, callback: Callable[[PeerSession], None]) -> None:
        self._on_close.append(callback)

    def close_soon(self, reason: str) -> None:
        if self._closing is None and self.state is not SessionState.CLOSED:
            logger.info("%s %s/%s closing: %s", self.kind, self.stream.id, self.id, reason)
            self._closing = asyncio.ensure_future(self.close())

    async def close(self) -> None:
        if self.state is SessionState.CLOSED:
            return
        self._set_state(SessionState.CLOSED)
        self.stopped()
        for callback in self._on_close:
            callback(self)
        self._on_close.clear()
        try:
            await self.pc.close()
        except Exception:  # aiortc can trip over its own half-built state; the session is gone
            logger.exception("%s %s/%s: peer connection close failed", self.kind, self.stream.id,
                             self.id)

    def stopped(self) -> None:
        """Called once when the session closes, before the peer connection is torn down."""

    async def answer(self, offer_sdp: str) -> str:
        """Apply the remote offer; returns our answer SDP. Closes the session on failure."""
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            self.prepare()
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except SdpError:
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise SdpError(422, f"cannot negotiate this offer: {exc or type(exc).__name__}") from exc
        except BaseException:  # cancelled mid-negotiation: the session must not half exist
            await self.close()
            raise
        offer = parse_description(offer_sdp)
        self.remote_ice = ice_credentials(offer)
        self._transport_mids = transport_mids(offer)
        return str(self.pc.localDescription.sdp)

    def prepare(self) -> None:
        """Hook between setRemoteDescription and createAnswer."""

    def choose_layer(self, rid: str | None) -> None:
        """The viewer's wanted simulcast layer (None: automatic); only viewers have one."""

    async def add_trickle(self, fragment: TrickleFragment) -> None:
        """Apply a trickle-ice-sdpfrag (RFC 8840) that is not an ICE restart."""
        first = next(iter(self._transport_mids.values()), None)
        for mid in fragment.mids:
            if mid not in self._transport_mids:
                raise SdpError(422, f"trickle names mid {mid[:20]!r}, which this session lacks")
        for item in fragment.candidates:
            candidate = item.candidate
            # aiortc adds a candidate only to the transport that owns the mid (the BUNDLE tag)
            candidate.sdpMid = self._transport_mids.get(item.mid, first) if item.mid else first
            candidate.sdpMLineIndex = None
            await self.pc.addIceCandidate(candidate)
        if fragment.end_of_candidates:
            await self.pc.addIceCandidate(None)


def codec_capability(codec: RTCRtpCodecParameters) -> RTCRtpCodecCapability:
    return RTCRtpCodecCapability(mimeType=codec.mimeType, clockRate=codec.clockRate,
                                 channels=codec.channels, parameters=dict(codec.parameters))


def preferred_capabilities(kind: str, mime_type: str) -> list[RTCRtpCodecCapability]:
    """aiortc's capabilities for one codec (every profile of it) plus RTX."""
    capabilities = RTCRtpReceiver.getCapabilities(kind)
    assert capabilities is not None
    caps = capabilities.codecs
    chosen = [c for c in caps if c.mimeType.lower() == mime_type]
    rtx = [c for c in caps if c.mimeType.lower() == f"{kind}/rtx"]
    return chosen + rtx


class IngestSession(PeerSession):
    """A publisher (WHIP) or an upstream pull (relay WHEP client) feeding a stream."""

    kind = "ingest"

    def __init__(self, stream: MediaStream, summary: OfferSummary) -> None:
        carried = stream.codecs()
        chosen: dict[str, str] = {}
        for kind, offered in summary.kinds.items():
            if kind in carried:
                mime = carried[kind].mimeType.lower()
                if mime not in offered:
                    raise SdpError(422, f"this stream carries {mime}; the offer's {kind} lacks it")
            else:
                mime = offered[0] if kind == "audio" else _pick_video(offered)
            chosen[kind] = mime
        super().__init__(stream)
        self._generation: int | None = None
        # RFC 8853 simulcast: the video layers, each to a forwarder of its own (stream.py)
        self.simulcast = summary.simulcast
        for kind, mime in chosen.items():
            transceiver = self.pc.addTransceiver(kind, direction="recvonly")
            transceiver.setCodecPreferences(preferred_capabilities(kind, mime))

    def prepare(self) -> None:
        use_udp_mux(self.pc)  # the origin's one media port, when configured (--udp-port)
        receivers: dict[str, tuple[RTCRtpReceiver, RTCRtpCodecParameters]] = {}
        simulcast = self.simulcast
        for transceiver in self.pc.getTransceivers():
            codecs = negotiated_codecs(transceiver)
            if codecs and transceiver.kind not in receivers:
                receivers[transceiver.kind] = (transceiver.receiver, codecs[0])
                if transceiver.kind == "video" and simulcast is not None:
                    negotiate_rid_extensions(transceiver, simulcast.rid_ext_id,
                                             simulcast.repaired_rid_ext_id)
        rids = simulcast.rids if simulcast is not None and "video" in receivers else ()
        if rids:
            assert simulcast is not None
            self.stream.layer_sizes = dict(simulcast.sizes)
        self._generation = self.stream.attach_source(receivers, rids=rids)

    async def answer(self, offer_sdp: str) -> str:
        answer = await super().answer(offer_sdp)
        if self.simulcast is not None and self.stream.layers:
            answer = answer_simulcast(without_receive_estimate(answer), self.simulcast)
        return answer

    def stopped(self) -> None:
        if self._generation is not None:
            self.stream.detach_source(self._generation)

    @property
    def last_media(self) -> float:
        return max((t.last_packet_time for t in self.stream.tracks.values()), default=0.0)


def _pick_video(offered: list[str]) -> str:
    return "video/vp8" if "video/vp8" in offered else offered[0]


class EgressSession(PeerSession):
    """A viewer (or a downstream relay) receiving a stream's packets, forwarded as they are."""

    kind = "egress"

    def __init__(self, stream: MediaStream, summary: OfferSummary,
                 on_first_frame: Callable[[float], None] | None = None,
                 layer: str | None = None, auto_layer: bool = True,
                 on_estimate: Callable[[int], None] | None = None) -> None:
        tracks = dict(stream.tracks)
        # relay pulls carry a layer as it is: never chosen from their feedback
        self._auto_layer = auto_layer and layer is None
        if layer is not None:  # a child relay's pull of one lower simulcast layer
            pinned = stream.layers.get(layer)
            if pinned is None:
                have = ", ".join(stream.layers) or "none (one layer)"
                raise SdpError(422, f"stream has no simulcast layer {layer[:20]!r}; layers: {have}")
            tracks = {"video": pinned}
        served = [
            forwarder for kind, forwarder in tracks.items()
            if forwarder.codec.mimeType.lower() in summary.kinds.get(kind, [])
        ]
        if not served:
            carried = ", ".join(f.codec.mimeType for f in stream.tracks.values()) or "nothing yet"
            raise SdpError(422, f"the offer accepts none of what this stream carries ({carried})")
        super().__init__(stream)
        self._wiring: list[tuple[TrackForwarder, RTCRtpTransceiver]] = []
        self._sinks: list[tuple[TrackForwarder, ForwardSink]] = []
        self._on_first_frame = on_first_frame
        self._wanted_rid: str | None = None
        self.auto: AutoLayer | None = None  # the automatic layer choice (lean RTCP only)
        self._cancel_end_watch = stream.on_end(lambda: self.close_soon("stream ended"))
        # lean RTCP (viewer_rtcp.py): reports from one clock, feedback through our parser;
        # None: aiortc's per-sender RTCP tasks and parser (LOTCAST_LEAN_RTCP=0)
        self.rtcp = ViewerRtcp(on_alive=self.touch) if lean_rtcp_enabled() else None
        if self.rtcp is not None:
            self.rtcp.on_estimate = on_estimate
        # the viewer's REMB means something only with abs-send-time on our video (stamped by
        # the forwarder where negotiated); relay pulls never use it, so theirs is not stamped
        self._estimate = self._auto_layer and viewer_estimate_enabled()
        self._uses_estimate = False
        for forwarder in served:
            transceiver = self.pc.addTransceiver(SilentTrack(forwarder.kind), direction="sendonly")
            transceiver.setCodecPreferences([codec_capability(forwarder.codec)])
            if self.rtcp is not None:
                quiet_sender_rtcp(transceiver.sender, forwarder.output_ssrc)
            else:
                self._hook(forwarder, transceiver.sender)
            self._wiring.append((forwarder, transceiver))

    def prepare(self) -> None:
        use_udp_mux(self.pc)  # the worker's one media port, when configured (--udp-port)
        if self.rtcp is not None:
            seen: set[int] = set()
            for _, transceiver in self._wiring:
                dtls = transceiver.sender.transport
                if dtls is not None and id(dtls) not in seen:  # bundled: one transport
                    seen.add(id(dtls))
                    route_rtcp(dtls, self.rtcp.on_rtcp)

    def _hook(self, forwarder: TrackForwarder, sender: RTCRtpSender) -> None:
        session = self

        kind = forwarder.kind

        def current() -> tuple[TrackForwarder, ForwardSink] | None:
            # a video sink may have moved to another simulcast layer's forwarder
            return next(((f, s) for f, s in session._sinks if f.kind == kind), None)

        def on_nack(seqs: list[int]) -> None:
            found = current()
            if found is not None:
                found[0].retransmit(found[1], seqs)

        def on_keyframe_request() -> None:
            found = current()
            if found is None:
                forwarder.request_keyframe()
            else:
                found[0].request_keyframe_for(found[1])

        hook_sender(sender, forwarder.output_ssrc,
                    SenderFeedback(on_nack=on_nack, on_keyframe_request=on_keyframe_request,
                                   on_alive=self.touch))

    def choose_layer(self, rid: str | None) -> None:
        """Pin the video to simulcast layer ``rid`` (None: the top one), switched at that
        layer's next key frame (TrackForwarder.switch_in)."""
        layers = self.stream.layers
        self._wanted_rid = rid
        if self.auto is not None:
            self.auto.pinned = rid is not None
        found = next(((f, s) for f, s in self._sinks if f.kind == "video"), None)
        if found is None or not layers:
            return
        target = layers.get(rid) if rid is not None else next(iter(layers.values()))
        if target is None:
            return
        current, sink = found
        target.switch_in(sink, current)

    def _switched(self, sink: ForwardSink, forwarder: TrackForwarder) -> None:
        self._sinks = [(forwarder if s is sink else f, s) for f, s in self._sinks]
        if self.rtcp is not None:
            track = self.rtcp.tracks.get(forwarder.output_ssrc)
            if track is not None:
                track.forwarder = forwarder

    @property
    def video_layer(self) -> str | None:
        """The rid of the simulcast layer this viewer's video comes from (None: one layer)."""
        found = next((f for f, _ in self._sinks if f.kind == "video"), None)
        for rid, forwarder in self.stream.layers.items():
            if forwarder is found:
                return rid
        return None

    def started(self) -> None:
        for forwarder, transceiver in self._wiring:
            packet_sender = PacketSender(transceiver.sender.transport)
            if not packet_sender.resolve():
                self.close_soon("transport not ready after connect")
                return
            negotiated = negotiated_codecs(transceiver)
            first = self._first_packet if forwarder.kind == "video" else None
            pt = negotiated[0].payloadType
            assert pt is not None
            abs_send_time = 0
            if forwarder.kind == "video" and self._estimate:
                abs_send_time = negotiated_extension_id(transceiver, ABS_SEND_TIME_URI)
                self._uses_estimate = abs_send_time != 0
            sink = ForwardSink(packet_sender, transceiver.sender, pt, first,
                               aiortc_reports=self.rtcp is None, abs_send_time_id=abs_send_time)
            sink.on_switched = lambda fwd, s=sink: self._switched(s, fwd)
            sink.fixed_layer = not self._auto_layer
            self._sinks.append((forwarder, sink))
            if self.rtcp is not None:
                self.rtcp.add_track(forwarder, sink)
            forwarder.add_sink(sink)
        if self._wanted_rid is not None:
            self.choose_layer(self._wanted_rid)
        if self._auto_layer and self.rtcp is not None:
            self.auto = AutoLayer(lambda: list(self.stream.layers.values()), self.rtcp,
                                  f"{self.stream.id}/{self.id}", self._wanted_rid is not None,
                                  use_remb=self._uses_estimate)
        if self.rtcp is not None and self._sinks:
            self.rtcp.start(self._sinks[0][1].packet_sender.send_rtcp, peer_cname(self.pc))
            dtls = self._wiring[0][1].sender.transport
            answer_consent_checks_fast(dtls)
            if lean_consent_enabled():
                target = take_over_consent(dtls)
                if target is not None:
                    consent_clock().add(target)

    def _first_packet(self) -> None:
        if self._on_first_frame is not None:
            self._on_first_frame(time.monotonic() - self.created)

    def stopped(self) -> None:
        if self.auto is not None:
            self.auto.close()
        self._cancel_end_watch()
        if self.rtcp is not None:
            self.rtcp.stop()
        for forwarder, sink in self._sinks:
            forwarder.remove_sink(sink)
        self._sinks.clear()
