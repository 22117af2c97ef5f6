"""Janus side by side with our relay, for load/fanout_bench.py --janus (benchmark only).

JanusServer starts Debian's janus (1.1.2, `bash scripts/bench-setup.sh` installs it) on loopback
from a generated config dir: only the HTTP transport and the streaming plugin, one RTP
mountpoint (VP8 + Opus) on free loopback ports, no STUN, ICE gathering restricted to lo.

OriginFeed is a WHEP viewer of our origin that sends every RTP packet it receives (after SRTP,
RTX unwrapped: the packets our relay gets) as plain RTP to the mountpoint's ports, so Janus and
our relay fan out the same source packets. JanusViewer (used by viewer_farm.py) is an aiortc
WebRTC viewer through Janus's HTTP API: create a session, attach janus.plugin.streaming, watch
the mountpoint, answer its JSEP offer, start, keepalives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import psutil
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtp import RtpPacket

from lotcast.media.aiortc_hooks import tap_receiver

JANUS_LIB = Path("/usr/lib/x86_64-linux-gnu/janus")
MOUNTPOINT = 1
VIDEO_PT, AUDIO_PT = 96, 111


def local_ipv4() -> str:
    """This machine's first non-loopback IPv4 address. Janus never gathers ICE candidates on a
    loopback interface (ice_enforce_list = "lo" or "127.0.0.1" leaves it none of lo's), so its
    ICE is restricted to this one local address instead; packets to a local address still go
    through the kernel's loopback path and never leave the machine."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    raise SystemExit("no non-loopback IPv4 address for Janus's ICE")


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_janus() -> str:
    """The janus binary, installed by scripts/bench-setup.sh (apt, as root) when missing."""
    found = shutil.which("janus")
    if found is None:
        setup = Path(__file__).resolve().parent.parent / "scripts" / "bench-setup.sh"
        subprocess.run(["bash", str(setup)], check=True, timeout=600)
        found = shutil.which("janus")
    if found is None:
        raise SystemExit("janus is not installed (bash scripts/bench-setup.sh as root)")
    return found


class JanusServer:
    def __init__(self, event_loops: int = 0) -> None:
        # 0: Janus's default, one GLib loop (and thread) per handle; N: a pool of N loops
        self.event_loops = event_loops
        self.binary = ensure_janus()
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-janus-")
        self.dir = Path(self._tmp.name)
        self.http_port = _free_port(socket.SOCK_STREAM)
        self.video_port = _free_port(socket.SOCK_DGRAM)
        self.audio_port = _free_port(socket.SOCK_DGRAM)
        self.url = f"http://127.0.0.1:{self.http_port}/janus"
        self.ice_ip = os.environ.get("BENCH_JANUS_ICE_IP") or local_ipv4()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _write_config(self) -> None:
        d = self.dir
        for kind, names in (("plugins", ["libjanus_streaming.so"]),
                            ("transports", ["libjanus_http.so"]),
                            ("events", []), ("loggers", [])):
            (d / kind).mkdir()
            for name in names:
                (d / kind / name).symlink_to(JANUS_LIB / kind / name)
        (d / "janus.jcfg").write_text(f"""
general: {{
    configs_folder = "{d}"
    plugins_folder = "{d}/plugins"
    transports_folder = "{d}/transports"
    events_folder = "{d}/events"
    loggers_folder = "{d}/loggers"
    debug_level = 3
    log_to_file = "{d}/janus.log"
    session_timeout = 60
    event_loops = {self.event_loops}
    server_name = "bench"
}}
media: {{
    ipv6 = false
    rtp_port_range = "40000-59999"
}}
nat: {{
    nice_debug = false
    ice_enforce_list = "{self.ice_ip}"
}}
""")
        (d / "janus.transport.http.jcfg").write_text(f"""
general: {{
    json = "compact"
    base_path = "/janus"
    http = true
    port = {self.http_port}
    ip = "127.0.0.1"
    https = false
}}
admin: {{
    admin_http = false
    admin_https = false
}}
""")
        (d / "janus.plugin.streaming.jcfg").write_text(f"""
general: {{
}}
bench: {{
    type = "rtp"
    id = {MOUNTPOINT}
    description = "bench"
    audio = true
    video = true
    audioiface = "127.0.0.1"
    audioport = {self.audio_port}
    audiopt = {AUDIO_PT}
    audiocodec = "opus"
    audiortpmap = "opus/48000/2"
    videoiface = "127.0.0.1"
    videoport = {self.video_port}
    videopt = {VIDEO_PT}
    videocodec = "vp8"
    videortpmap = "VP8/90000"
    videobufferkf = true
}}
""")

    def start(self) -> JanusServer:
        self._write_config()
        with open(self.dir / "stdout.log", "wb") as log:
            self._proc = subprocess.Popen([self.binary, "-C", str(self.dir / "janus.jcfg"),
                                           "-F", str(self.dir), "-o"],
                                          stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"janus exited {self._proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/info", timeout=1, trust_env=False).status_code == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"janus did not answer on {self.url}: {self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for name in ("stdout.log", "janus.log"):
            with contextlib.suppress(OSError):
                texts.append((self.dir / name).read_text(errors="replace"))
        return "\n".join("\n".join(t.splitlines()[-lines:]) for t in texts)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._tmp.cleanup()

    def __enter__(self) -> JanusServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class OriginFeed:
    """A WHEP viewer of the origin that re-sends its RTP, unencrypted, to Janus's mountpoint."""

    def __init__(self, origin_url: str, stream: str, janus: JanusServer) -> None:
        self.url = f"{origin_url}/whep/{stream}"
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.video_to = ("127.0.0.1", janus.video_port)
        self.audio_to = ("127.0.0.1", janus.audio_port)
        self.resource: str | None = None
        self.forwarded = 0

    def _send(self, packet: RtpPacket, pt: int, to: tuple[str, int]) -> None:
        packet.payload_type = pt
        packet.extensions = type(packet.extensions)()
        with contextlib.suppress(BlockingIOError):
            self.sock.sendto(packet.serialize(), to)
            self.forwarded += 1

    async def start(self) -> None:
        audio = self.pc.addTransceiver("audio", direction="recvonly")
        video = self.pc.addTransceiver("video", direction="recvonly")
        tap_receiver(audio.receiver, lambda p: self._send(p, AUDIO_PT, self.audio_to),
                     lambda *_: None)
        tap_receiver(video.receiver, lambda p: self._send(p, VIDEO_PT, self.video_to),
                     lambda *_: None)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient(verify=False, trust_env=False, timeout=30) as http:
            response = await http.post(self.url, content=self.pc.localDescription.sdp,
                                       headers={"Content-Type": "application/sdp"})
        if response.status_code != 201:
            raise RuntimeError(f"WHEP {response.status_code}: {response.text}")
        self.resource = urljoin(self.url, response.headers["Location"])
        await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))

    async def request_keyframes(self, seconds: float) -> None:
        """A PLI upstream every ``seconds``: Janus's mountpoint has no way to ask the source for
        a key frame, so joining Janus viewers start from its buffered one (videobufferkf)."""
        while True:
            await asyncio.sleep(seconds)
            for receiver in self.pc.getReceivers():
                if receiver.track.kind != "video":
                    continue
                active: dict[int, Any] = getattr(receiver, "_RTCRtpReceiver__active_ssrc", {})
                for ssrc in list(active):
                    await receiver._send_rtcp_pli(ssrc)

    async def stop(self) -> None:
        if self.resource:
            async with httpx.AsyncClient(verify=False, trust_env=False, timeout=10) as http:
                with contextlib.suppress(httpx.HTTPError):
                    await http.delete(self.resource)
        await self.pc.close()
        self.sock.close()


class JanusViewer:
    """An aiortc viewer of Janus's streaming mountpoint, counting packets like CountingViewer."""

    def __init__(self, janus_url: str, mountpoint: int) -> None:
        self.url = janus_url
        self.mountpoint = mountpoint
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.packets = 0
        self.started = 0.0
        self.first_video: float | None = None
        self.session: str | None = None
        self.handle: str | None = None
        self._keepalive: asyncio.Task[None] | None = None

    def _on_video(self, packet: RtpPacket) -> None:
        self.packets += 1
        if self.first_video is None:
            self.first_video = time.monotonic()

    def _on_audio(self, packet: RtpPacket) -> None:
        self.packets += 1

    async def _post(self, http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Any:
        body = {**body, "transaction": uuid.uuid4().hex}
        response = await http.post(f"{self.url}{path}", json=body)
        reply = response.json()
        if response.status_code != 200 or reply.get("janus") == "error":
            raise RuntimeError(f"janus {body['janus']}: {response.status_code} {reply}")
        return reply

    async def start(self, http: httpx.AsyncClient) -> None:
        self.started = time.monotonic()
        self.session = str((await self._post(http, "", {"janus": "create"}))["data"]["id"])
        self.handle = str((await self._post(http, f"/{self.session}", {
            "janus": "attach", "plugin": "janus.plugin.streaming"}))["data"]["id"])
        handle_path = f"/{self.session}/{self.handle}"
        await self._post(http, handle_path, {"janus": "message",
                                             "body": {"request": "watch", "id": self.mountpoint}})
        offer = await self._wait_jsep(http)
        await self.pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        for transceiver in self.pc.getTransceivers():
            on = self._on_video if transceiver.kind == "video" else self._on_audio
            tap_receiver(transceiver.receiver, on, lambda *_: None)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await self._post(http, handle_path, {
            "janus": "message", "body": {"request": "start"},
            "jsep": {"type": "answer", "sdp": self.pc.localDescription.sdp}})
        await self._post(http, handle_path, {"janus": "trickle",
                                             "candidate": {"completed": True}})
        self._keepalive = asyncio.create_task(self._keep_alive(http))

    async def _wait_jsep(self, http: httpx.AsyncClient) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            response = await http.get(f"{self.url}/{self.session}", params={"maxev": 5})
            events = response.json()
            for event in events if isinstance(events, list) else [events]:
                if "jsep" in event:
                    return dict(event["jsep"])
                if event.get("plugindata", {}).get("data", {}).get("error"):
                    raise RuntimeError(f"janus watch: {event}")
        raise RuntimeError("janus sent no offer in 30 s")

    async def _keep_alive(self, http: httpx.AsyncClient) -> None:
        while True:
            await asyncio.sleep(20)
            with contextlib.suppress(httpx.HTTPError, RuntimeError):
                await self._post(http, f"/{self.session}", {"janus": "keepalive"})

    async def stop(self, http: httpx.AsyncClient) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        if self.session:
            with contextlib.suppress(httpx.HTTPError, RuntimeError):
                await self._post(http, f"/{self.session}", {"janus": "destroy"})
        await self.pc.close()


if __name__ == "__main__":  # smoke: start Janus, print its info, stop
    with JanusServer() as server:
        print(httpx.get(f"{server.url}/info", trust_env=False).json()["version_string"],
              "on", server.url, "pid", server.pid, "config", os.fspath(server.dir))
