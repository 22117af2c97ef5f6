"""A relay's pull of a stream from its origin (or a parent relay) over WHEP.

The relay is an ordinary WHEP client of its upstream. One UpstreamPull per stream; it stays while
the stream has viewers, reconnects if the upstream connection drops, and lets go (DELETE) when the
last viewer has been gone for the linger period.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from urllib.parse import urljoin

import httpx
from aiortc import RTCPeerConnection, RTCRtpCodecParameters, RTCRtpReceiver
from aiortc import RTCSessionDescription as SessionDescription

from lotcast.media.aiortc_hooks import negotiated_codecs, new_peer_connection
from lotcast.media.stream import LAYERS_HEADER, MediaStream, StreamState
from lotcast.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


class NotLiveError(Exception):
    """The stream isn't live upstream; retry after ``retry_after`` seconds."""

    def __init__(self, reason: str, retry_after: int = 2) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


# The upstream's media (its video, or its audio when it carries no video) silent this long means
# the pull is broken, whatever the cause: the upstream died, or it stopped feeding us while its
# source is still live. 1.5 s of no video is ~45 missed frames; a tick of 0.25 s notices it
# within 2 s. A pull that came back and is still silent (the source really paused its video)
# is retried after doubling waits, not every 1.5 s.
STALL_TIMEOUT = 1.5
STALL_BACKOFF_MAX = 30.0
WATCH_INTERVAL = 0.25


def stall_wait(consecutive_stalls: int) -> float:
    """How long the watched track may be silent after this many re-pulls that brought nothing."""
    return float(min(STALL_TIMEOUT * 2.0 ** min(consecutive_stalls, 16), STALL_BACKOFF_MAX))


def watched_kind(kinds: set[str]) -> str | None:
    """The track whose silence means a broken pull: video when there is one."""
    if "video" in kinds:
        return "video"
    return "audio" if "audio" in kinds else None


class PullState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class UpstreamPull:
    """Owns the peer connection that feeds one stream on this relay."""

    def __init__(self, stream: MediaStream, upstream_url: str, http: httpx.AsyncClient,
                 retry_window: float, on_stall: Callable[[UpstreamPull, str], None] | None = None,
                 consecutive_stalls: int = 0, answer_timeout: float = 10.0) -> None:
        self.stream = stream
        self._answer_timeout = answer_timeout
        self.upstream_url = upstream_url.rstrip("/")
        self._http = http
        self._retry_window = retry_window
        self.state = PullState.IDLE
        self._pc: RTCPeerConnection | None = None
        self._resource: str | None = None
        self._generation: int | None = None
        self._lock = asyncio.Lock()
        self._retry_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        # called when the watched track goes silent; without it the pull reconnects itself
        self._on_stall = on_stall
        # re-pulls in a row that were followed by silence again (the source paused, or the
        # upstream keeps failing us): the next stall waits longer
        self.consecutive_stalls = consecutive_stalls
        self.stalls = 0
        self._kinds: set[str] = set()
        # the upstream's lower simulcast layers, one pull each (rid -> its peer connection)
        self._layer_pcs: dict[str, RTCPeerConnection] = {}
        self._layer_task: asyncio.Task[None] | None = None
        self._layer_generations: dict[str, int] = {}  # rid -> its source generation
        self.layer_pull_failures = 0

    @property
    def peer_connection(self) -> RTCPeerConnection | None:
        return self._pc

    @property
    def generation(self) -> int | None:
        """The stream's source generation of this pull's current connection."""
        return self._generation

    def _set_state(self, new: PullState) -> None:
        if new is not self.state:
            logger.info("upstream %s: %s -> %s", self.stream.id, self.state.value, new.value)
            self.state = new

    async def ensure(self) -> None:
        """Connected on return, or raises NotLiveError."""
        async with self._lock:
            if self.state is PullState.CONNECTED:
                return
            if self.state is PullState.CLOSED or self.stream.state is StreamState.ENDED:
                raise NotLiveError("stream ended")
            await self._connect()

    async def _connect(self) -> None:
        self._set_state(PullState.CONNECTING)
        pc = new_peer_connection()
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        try:
            await pc.setLocalDescription(await pc.createOffer())
            url = f"{self.upstream_url}/whep/{self.stream.id}"
            response = await self._http.post(
                url, params={"auto": "0"}, content=pc.localDescription.sdp.encode(),
                headers={"Content-Type": "application/sdp"}, follow_redirects=True,
                timeout=self._answer_timeout,
            )
            if response.status_code in (409, 503):
                retry = int(response.headers.get("Retry-After", "2"))
                raise NotLiveError(f"upstream says {response.status_code}: {response.text}", retry)
            if response.status_code != 201:
                raise NotLiveError(f"upstream answered {response.status_code}: {response.text}")
            self._resource = urljoin(str(response.url), response.headers["Location"])
            await pc.setRemoteDescription(SessionDescription(sdp=response.text, type="answer"))
            receivers: dict[str, tuple[RTCRtpReceiver, RTCRtpCodecParameters]] = {}
            for transceiver in pc.getTransceivers():
                codecs = negotiated_codecs(transceiver)
                if codecs and transceiver.currentDirection in ("recvonly", "sendrecv"):
                    receivers[transceiver.kind] = (transceiver.receiver, codecs[0])
            if not receivers:
                raise NotLiveError("upstream offered no media")
            if self.state is not PullState.CONNECTING or self.stream.state is StreamState.ENDED:
                # closed, or the stream ended (its last viewer gave up), while we negotiated
                raise NotLiveError("stream ended")
        except BaseException:
            await pc.close()
            self._set_state(PullState.IDLE)
            raise
        self._pc = pc
        self._kinds = set(receivers)
        # a pull that replaces another feeding the stream takes over at its first key frame
        self._generation = self.stream.attach_source(receivers, at_keyframe=True,
                                                     keep_layers=True)
        order = tuple(r.strip() for r in response.headers.get(LAYERS_HEADER, "").split(",")
                      if r.strip())
        self.stream.set_layer_order(order if "video" in receivers else ())
        self._set_state(PullState.CONNECTED)
        self._watchdog = asyncio.ensure_future(self._watch(pc))
        if len(order) > 1 and "video" in receivers:
            self._layer_task = asyncio.ensure_future(self._pull_layers(pc, order[1:]))

        @pc.on("connectionstatechange")
        def _changed() -> None:
            if pc.connectionState in ("failed", "closed") and self._pc is pc:
                self._lost()

    async def _pull_layers(self, main: RTCPeerConnection, rids: tuple[str, ...]) -> None:
        """One WHEP pull (video only, ``?layer=<rid>``) per lower simulcast layer, feeding that
        layer's forwarder; they live as long as the main pull ``main``. A layer whose pull
        fails stays unfed until the main pull reconnects (its viewers then see no video)."""
        old, self._layer_pcs = self._layer_pcs, {}
        for pc in old.values():
            await pc.close()
        for rid in rids:
            if self._pc is not main:
                return
            try:
                await self._pull_layer(main, rid)
            except (NotLiveError, httpx.HTTPError, ValueError) as exc:
                self.layer_pull_failures += 1
                logger.warning("upstream %s: pull of layer %s failed: %r", self.stream.id, rid, exc)

    async def _pull_layer(self, main: RTCPeerConnection, rid: str) -> None:
        pc = new_peer_connection()
        pc.addTransceiver("video", direction="recvonly")
        try:
            await pc.setLocalDescription(await pc.createOffer())
            response = await self._http.post(
                f"{self.upstream_url}/whep/{self.stream.id}", params={"layer": rid},
                content=pc.localDescription.sdp.encode(),
                headers={"Content-Type": "application/sdp"}, follow_redirects=True,
                timeout=self._answer_timeout)
            if response.status_code != 201:
                raise NotLiveError(f"upstream answered {response.status_code}: {response.text}")
            await pc.setRemoteDescription(SessionDescription(sdp=response.text, type="answer"))
            receiver = next((t.receiver for t in pc.getTransceivers()
                             if t.kind == "video" and negotiated_codecs(t)), None)
            if receiver is None or self._pc is not main:
                raise NotLiveError("no video layer negotiated, or the main pull went")
            generation = self.stream.attach_layer(rid, receiver)
        except BaseException:
            await pc.close()
            raise
        self._layer_pcs[rid] = pc
        self._layer_generations[rid] = generation

        @pc.on("connectionstatechange")
        def _changed() -> None:
            if pc.connectionState in ("failed", "closed"):
                self.stream.detach_layer(rid, generation)

    async def wait_layers(self, within: float) -> bool:
        """Wait, at most ``within`` s, until this pull's lower-layer pulls are attached and
        each one feeds its layer (its first key frame came, or its switch bound passed): the
        pull this one replaces is closed only then, so a lower layer's viewers never lose their
        source in between. True when every layer got there in time."""
        deadline = time.monotonic() + within
        if self._layer_task is not None:
            await asyncio.wait({self._layer_task}, timeout=within)
        while True:
            if all(self.stream.layer_switched(rid, generation)
                   for rid, generation in self._layer_generations.items()):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def _close_layers(self) -> None:
        await cancel_and_wait(self._layer_task)
        self._layer_task = None
        pcs, self._layer_pcs = self._layer_pcs, {}
        self._layer_generations = {}
        for pc in pcs.values():
            await pc.close()

    def _last_media(self, kind: str) -> float:
        """When this pull last brought media of ``kind``. A simulcast stream's publisher may
        pause its top layer (Chromium does when its bandwidth estimate or CPU cannot carry it;
        the lower layers come through pulls of their own): then the pull's audio tells that it
        is alive, not the top layer's silence."""
        if kind == "video" and self.stream.layers and "audio" in self.stream.tracks:
            return max(t.last_packet_time for t in self.stream.tracks.values())
        track = self.stream.tracks.get(kind)
        return track.last_packet_time if track is not None else 0.0

    async def _watch(self, pc: RTCPeerConnection) -> None:
        kind = watched_kind(self._kinds)
        if kind is None:
            return
        since = time.monotonic()
        wait = stall_wait(self.consecutive_stalls)
        while self._pc is pc:
            await asyncio.sleep(WATCH_INTERVAL)
            last = self._last_media(kind)
            if last > since and self.consecutive_stalls:
                self.consecutive_stalls = 0  # media came back: the next stall is news again
                wait = stall_wait(0)
            now = time.monotonic()
            if self._pc is pc and now - max(since, last) > wait:
                self.stalls += 1
                reason = f"no {kind} from upstream for {now - max(since, last):.1f}s"
                logger.warning("upstream %s: %s; pulling again", self.stream.id, reason)
                self.consecutive_stalls += 1
                if self._on_stall is not None:
                    self._on_stall(self, reason)
                else:
                    self._lost()
                return

    def stalled_fallback(self) -> None:
        """The owner could not replace a stalled pull: reconnect it in place."""
        if self.state is PullState.CONNECTED:
            self._lost()

    def _lost(self) -> None:
        logger.warning("upstream %s lost; reconnecting", self.stream.id)
        if self._generation is not None:
            self.stream.detach_source(self._generation)
        pc, self._pc = self._pc, None
        self._set_state(PullState.IDLE)
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.ensure_future(self._reconnect(pc))

    async def _reconnect(self, old: RTCPeerConnection | None) -> None:
        await self._close_layers()
        if old is not None:
            await old.close()
        deadline = time.monotonic() + self._retry_window
        delay = 0.25
        while (time.monotonic() < deadline and self.state is PullState.IDLE
               and self.stream.state is not StreamState.ENDED):
            try:
                await self.ensure()
                return
            except NotLiveError as exc:
                logger.info("upstream %s not back yet: %s", self.stream.id, exc.reason)
            except httpx.HTTPError as exc:
                logger.info("upstream %s unreachable: %r", self.stream.id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        if self.state is not PullState.CONNECTED:
            self.stream.end()

    async def close(self) -> None:
        if self.state is PullState.CLOSED:
            return
        self._set_state(PullState.CLOSED)
        await cancel_and_wait(self._watchdog)
        await cancel_and_wait(self._retry_task)
        await self._close_layers()
        pc, self._pc = self._pc, None
        if pc is not None:
            await pc.close()
        if self._resource is not None:
            try:
                await self._http.delete(self._resource)
            except httpx.HTTPError:
                pass
