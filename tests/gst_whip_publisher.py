"""A WHIP publisher built on GStreamer's webrtcbin: a second WebRTC stack for the interop tests.

Runs under Debian's /usr/bin/python3 (python3-gi), not the project's venv, as its own process:

    /usr/bin/python3 tests/gst_whip_publisher.py --url http://127.0.0.1:PORT/whip/STREAM \\
        --token JWT --codec vp8|h264

webrtcbin makes its own offer (setup:actpass, RSA certificate) with no candidates; this script
POSTs it (RFC 9725), then trickles every local candidate with PATCH
(application/trickle-ice-sdpfrag, If-Match: the session's ETag), and DELETEs the session on
SIGTERM/SIGINT. Payloaders keep their default 1400-byte MTU. libnice is bound to 127.0.0.1 with
UPnP and ICE-TCP off, so no packet leaves the machine.

Everything it learns is printed as one JSON object per line on stdout ({"event": ...}): the test
reads them. A fatal problem is printed as {"event": "fatal", ...} and the exit code is 2.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import queue
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urljoin

try:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstWebRTC", "1.0")
    gi.require_version("GstSdp", "1.0")
    from gi.repository import GLib, Gst, GstSdp, GstWebRTC
except (ImportError, ValueError) as exc:  # ValueError: typelib missing
    print(json.dumps({"event": "fatal", "error": f"GStreamer Python bindings missing: {exc}. "
                      "Install python3-gi gir1.2-gst-plugins-bad-1.0 gstreamer1.0-plugins-bad "
                      "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly gstreamer1.0-nice "
                      "(scripts/setup.sh --tests)"}), flush=True)
    sys.exit(2)

SDPFRAG = "application/trickle-ice-sdpfrag"
WIDTH, HEIGHT = 640, 360

VIDEO = {
    "vp8": ("vp8enc deadline=1 cpu-used=8 target-bitrate=1200000 keyframe-max-dist=30 "
            "error-resilient=partitions ! rtpvp8pay pt=96 picture-id-mode=15-bit ! "
            "application/x-rtp,media=video,encoding-name=VP8,payload=96,clock-rate=90000"),
    "h264": ("x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 bitrate=1200 ! "
             "video/x-h264,profile=constrained-baseline,stream-format=byte-stream ! "
             "rtph264pay pt=102 config-interval=-1 aggregate-mode=zero-latency ! "
             "application/x-rtp,media=video,encoding-name=H264,payload=102,clock-rate=90000,"
             "packetization-mode=(string)1,profile-level-id=(string)42e01f"),
}
AUDIO = ("audiotestsrc is-live=true wave=sine freq=440 ! audioconvert ! audioresample ! "
         "opusenc ! rtpopuspay pt=111 ! "
         "application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000")


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def bind_libnice_to_loopback(webrtc: Any) -> None:
    """Make libnice gather only 127.0.0.1 (it skips loopback unless told), over UDP, no UPnP.

    The NiceAgent has no typelib here, so nice_agent_add_local_address is called via ctypes on
    the agent's GObject pointer."""
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    ice = webrtc.get_property("ice-agent")
    # webrtcbin 1.22's getter hands out its own reference (g_value_take_object): without this
    # extra one the agent is freed when the wrapper goes and the next stream crashes webrtcbin
    gobject = ctypes.CDLL("libgobject-2.0.so.0")
    gobject.g_object_ref.argtypes = [ctypes.c_void_p]
    gobject.g_object_ref.restype = ctypes.c_void_p
    gobject.g_object_ref(get_pointer(ice.__gpointer__, None))
    ice.set_property("ice-tcp", False)
    agent = ice.get_property("agent")
    agent.set_property("upnp", False)
    agent.set_property("ice-tcp", False)
    libnice = ctypes.CDLL("libnice.so.10")
    libnice.nice_address_new.restype = ctypes.c_void_p
    libnice.nice_address_set_from_string.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    libnice.nice_address_set_from_string.restype = ctypes.c_int
    libnice.nice_agent_add_local_address.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    libnice.nice_agent_add_local_address.restype = ctypes.c_int
    libnice.nice_address_free.argtypes = [ctypes.c_void_p]
    address = libnice.nice_address_new()
    if not libnice.nice_address_set_from_string(address, b"127.0.0.1"):
        raise RuntimeError("nice_address_set_from_string(127.0.0.1) failed")
    agent_ptr = get_pointer(agent.__gpointer__, None)
    if not libnice.nice_agent_add_local_address(agent_ptr, address):
        raise RuntimeError("nice_agent_add_local_address(127.0.0.1) failed")
    libnice.nice_address_free(address)


class WhipClient:
    """The HTTP side: POST, PATCH (from a worker thread, in candidate order), DELETE."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.resource: str | None = None
        self.etag: str | None = None
        self.ufrag = ""
        self.pwd = ""
        self.mids: list[str] = []  # by m-line index
        self._trickles: queue.Queue[tuple[int, str] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._trickle_forever, daemon=True)

    def _request(self, method: str, url: str, body: bytes | None,
                 headers: dict[str, str]) -> tuple[int, Any, bytes]:
        """(status, headers (case-insensitive), body); HTTP errors are answers, not raised."""
        request = urllib.request.Request(url, data=body, method=method, headers={
            "Authorization": f"Bearer {self.token}", **headers})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=20) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    def post_offer(self, sdp: str) -> str:
        status, headers, body = self._request("POST", self.url, sdp.encode(),
                                              {"Content-Type": "application/sdp"})
        emit("posted", status=status, body=body.decode("utf-8", "replace")[:500])
        if status != 201:
            raise RuntimeError(f"WHIP POST answered {status}: {body.decode('utf-8', 'replace')}")
        location = headers.get("Location")
        if not location:
            raise RuntimeError("WHIP 201 without a Location header")
        self.resource = urljoin(self.url, location)
        self.etag = headers.get("ETag")
        emit("location", url=self.resource, etag=self.etag)
        self._worker.start()
        return body.decode()

    def trickle(self, mline: int, candidate: str) -> None:
        self._trickles.put((mline, candidate))

    def _trickle_forever(self) -> None:
        while True:
            item = self._trickles.get()
            if item is None:
                return
            mline, candidate = item
            # RFC 9725 §4.3.1: the session's current credentials, then the m-line's candidates
            mid = self.mids[mline] if mline < len(self.mids) else str(mline)
            lines = [f"a=ice-ufrag:{self.ufrag}", f"a=ice-pwd:{self.pwd}", f"a=mid:{mid}"]
            lines.append(f"a={candidate}" if candidate else "a=end-of-candidates")
            fragment = "\r\n".join(lines) + "\r\n"
            assert self.resource is not None
            status, _, body = self._request("PATCH", self.resource, fragment.encode(),
                                            {"Content-Type": SDPFRAG,
                                             "If-Match": self.etag or "*"})
            emit("patched", status=status, candidate=candidate,
                 body=body.decode("utf-8", "replace")[:300])

    def delete(self) -> None:
        self._trickles.put(None)
        if self.resource is None:
            return
        status, _, _ = self._request("DELETE", self.resource, None, {})
        emit("deleted", status=status)


class Publisher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = GLib.MainLoop()
        self.whip = WhipClient(args.url, args.token)
        self.pipeline = Gst.parse_launch(
            f"webrtcbin name=webrtc bundle-policy={args.bundle_policy} latency=50 "
            f"videotestsrc is-live=true pattern=smpte horizontal-speed=4 ! "
            f"video/x-raw,width={WIDTH},height={HEIGHT},framerate=30/1 ! videoconvert ! "
            f"queue max-size-buffers=2 leaky=downstream ! {VIDEO[args.codec]} ! "
            f"identity name=video_rtp ! webrtc. "
            f"{AUDIO} ! queue ! webrtc. "
        )
        self.webrtc = self.pipeline.get_by_name("webrtc")
        bind_libnice_to_loopback(self.webrtc)
        self.packets = 0
        self.max_packet = 0
        self.sizes_over_1356 = 0
        self.pending: list[tuple[int, str]] = []
        self.posted = False
        self.failed: str | None = None
        probe_pad = self.pipeline.get_by_name("video_rtp").get_static_pad("src")
        probe_pad.add_probe(Gst.PadProbeType.BUFFER, self._on_video_packet)
        self.webrtc.connect("on-negotiation-needed", self._on_negotiation_needed)
        self.webrtc.connect("on-ice-candidate", self._on_ice_candidate)
        self.webrtc.connect("notify::connection-state", self._on_state)
        self.webrtc.connect("notify::ice-gathering-state", self._on_gathering)
        bus = self.pipeline.get_bus()
        bus.add_signal_watch()
        bus.connect("message::error", self._on_error)

    # --- media --------------------------------------------------------------------------

    def _on_video_packet(self, pad: Any, info: Any) -> Any:
        size = info.get_buffer().get_size()
        self.packets += 1
        self.max_packet = max(self.max_packet, size)
        if size > 1356:
            self.sizes_over_1356 += 1
        return Gst.PadProbeReturn.OK

    def _report(self) -> bool:
        state = self.webrtc.get_property("connection-state").value_nick
        emit("stats", video_packets=self.packets, max_video_packet=self.max_packet,
             video_packets_over_1356=self.sizes_over_1356, connection=state)
        return True

    # --- signaling ----------------------------------------------------------------------

    def _on_negotiation_needed(self, element: Any) -> None:
        promise = Gst.Promise.new_with_change_func(self._on_offer, None)
        element.emit("create-offer", None, promise)

    def _on_offer(self, promise: Any, _data: Any) -> None:
        reply = promise.get_reply()
        offer = reply.get_value("offer")
        self.webrtc.emit("set-local-description", offer, Gst.Promise.new())
        sdp = offer.sdp.as_text()
        for line in sdp.splitlines():
            if line.startswith("a=ice-ufrag:") and not self.whip.ufrag:
                self.whip.ufrag = line.split(":", 1)[1]
            elif line.startswith("a=ice-pwd:") and not self.whip.pwd:
                self.whip.pwd = line.split(":", 1)[1]
            elif line.startswith("a=mid:"):
                self.whip.mids.append(line.split(":", 1)[1])
        emit("offer", sdp=sdp)
        # POST from a worker so the GLib loop (and candidate gathering) keeps running
        threading.Thread(target=self._post, args=(sdp,), daemon=True).start()

    def _post(self, sdp: str) -> None:
        try:
            answer_sdp = self.whip.post_offer(sdp)
        except Exception as exc:
            GLib.idle_add(self._fail, f"WHIP POST failed: {exc}")
            return
        GLib.idle_add(self._apply_answer, answer_sdp)

    def _apply_answer(self, answer_sdp: str) -> bool:
        emit("answer", sdp=answer_sdp)
        result, message = GstSdp.SDPMessage.new_from_text(answer_sdp)
        if result != GstSdp.SDPResult.OK:
            self._fail("cannot parse the WHIP answer")
            return False
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
        self.webrtc.emit("set-remote-description", answer, Gst.Promise.new())
        self.posted = True
        for mline, candidate in self.pending:
            self.whip.trickle(mline, candidate)
        self.pending.clear()
        return False

    def _on_ice_candidate(self, _element: Any, mline: int, candidate: str) -> None:
        emit("candidate", mline=mline, candidate=candidate)
        GLib.idle_add(self._queue_candidate, mline, candidate)

    def _queue_candidate(self, mline: int, candidate: str) -> bool:
        if self.posted:
            self.whip.trickle(mline, candidate)
        else:
            self.pending.append((mline, candidate))
        return False

    def _on_gathering(self, element: Any, _pspec: Any) -> None:
        state = element.get_property("ice-gathering-state").value_nick
        emit("gathering", state=state)
        if state == "complete":
            GLib.idle_add(self._queue_candidate, 0, "")

    def _on_state(self, element: Any, _pspec: Any) -> None:
        state = element.get_property("connection-state").value_nick
        emit("connection", state=state)
        if state == "connected":
            GLib.idle_add(self._report_certificate)
        if state == "failed":
            GLib.idle_add(self._fail, "webrtcbin connection failed")

    def _report_certificate(self) -> bool:
        """The DTLS certificate webrtcbin used (PEM), so the test can check its key type."""
        transceiver = self.webrtc.emit("get-transceiver", 0)
        transport = transceiver.get_property("sender").get_property("transport")
        emit("certificate", pem=transport.get_property("certificate"))
        return False

    def _on_error(self, _bus: Any, message: Any) -> None:
        err, debug = message.parse_error()
        self._fail(f"pipeline error: {err.message} ({debug})")

    def _fail(self, reason: str) -> bool:
        if self.failed is None:
            self.failed = reason
            emit("error", error=reason)
            self.loop.quit()
        return False

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, self._stop)
        GLib.timeout_add(500, self._report)
        if self.args.max_seconds:
            GLib.timeout_add(int(self.args.max_seconds * 1000), self._stop)
        if self.pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            emit("error", error="pipeline would not start")
            return 1
        self.loop.run()
        self._report()
        self.whip.delete()
        self.pipeline.set_state(Gst.State.NULL)
        emit("exit", failed=self.failed)
        return 1 if self.failed else 0

    def _stop(self) -> bool:
        emit("stopping")
        self.loop.quit()
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True, help="WHIP endpoint, http://host:port/whip/<stream>")
    parser.add_argument("--token", required=True, help="host JWT (sent as Bearer)")
    parser.add_argument("--codec", choices=sorted(VIDEO), default="vp8")
    parser.add_argument("--bundle-policy", choices=("max-bundle", "max-compat", "balanced"),
                        default="max-bundle",
                        help="webrtcbin's; max-bundle (what GStreamer's whipsink uses) offers "
                        "the second m-line bundle-only with port 0")
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="stop by itself after this long (a leaked process cannot linger)")
    args = parser.parse_args()
    Gst.init(None)
    missing = [name for name in ("webrtcbin", "nicesrc", "dtlssrtpenc", "videotestsrc", "vp8enc",
                                 "rtpvp8pay", "x264enc", "rtph264pay", "opusenc", "rtpopuspay")
               if Gst.ElementFactory.find(name) is None]
    if missing:
        emit("fatal", error=f"GStreamer elements missing: {', '.join(missing)}. Install "
             "gstreamer1.0-plugins-bad/-good/-ugly and gstreamer1.0-nice (scripts/setup.sh --tests)")
        return 2
    started = time.monotonic()
    code = Publisher(args).run()
    emit("ran", seconds=round(time.monotonic() - started, 2))
    return code


if __name__ == "__main__":
    sys.exit(main())
