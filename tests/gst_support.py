"""GStreamer webrtcbin as a WHIP publisher (tests/gst_whip_publisher.py, run by Debian's python3
with python3-gi), and an aiortc WHEP viewer that decodes any source's frames.

Nothing here skips: missing GStreamer packages fail the test with the packages to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from media_support import Viewer

from lotcast.supervisor import die_with_parent

SYSTEM_PYTHON = os.environ.get("LOTCAST_GST_PYTHON", "/usr/bin/python3")
PUBLISHER_SCRIPT = Path(__file__).with_name("gst_whip_publisher.py")
PACKAGES = ("gstreamer1.0-plugins-bad gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly "
            "gstreamer1.0-nice gstreamer1.0-tools python3-gi gir1.2-gst-plugins-bad-1.0")


class GstPublisher:
    """One gst_whip_publisher.py process; its JSON event lines are collected as they come.

    webrtcbin's bundle policy is max-bundle, as in GStreamer's own WHIP sinks: its second m-line
    is offered bundle-only with port 0 (RFC 8843). LOTCAST_GST_BUNDLE_POLICY overrides it when
    debugging."""

    def __init__(self, whip_url: str, token: str, codec: str,
                 bundle_policy: str = os.environ.get("LOTCAST_GST_BUNDLE_POLICY", "max-bundle"),
                 ) -> None:
        self.whip_url = whip_url
        self.bundle_policy = bundle_policy
        self.token = token
        self.codec = codec
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._readers: list[threading.Thread] = []

    def start(self) -> GstPublisher:
        if not os.path.exists(SYSTEM_PYTHON):
            raise AssertionError(f"{SYSTEM_PYTHON} not found: the GStreamer publisher needs "
                                 f"Debian's python3 with {PACKAGES} (scripts/setup.sh --tests)")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env["GST_DEBUG"] = env.get("LOTCAST_GST_DEBUG", "1")
        env["NO_PROXY"] = "*"
        self._proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(PUBLISHER_SCRIPT), "--url", self.whip_url, "--token", self.token,
             "--codec", self.codec, "--bundle-policy", self.bundle_policy,
             "--max-seconds", "240"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            preexec_fn=die_with_parent(signal.SIGTERM))  # a killed test run leaves no publisher
        self._readers = [threading.Thread(target=self._read_events, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()
        return self

    def _read_events(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "output", "line": line.rstrip()}
            with self._lock:
                self.events.append(event)

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            with self._lock:
                self.stderr.append(line.rstrip())

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("event") == kind]

    def last(self, kind: str) -> dict[str, Any] | None:
        found = self.of(kind)
        return found[-1] if found else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def describe(self) -> str:
        with self._lock:
            shown = [e if e.get("event") not in ("offer", "answer") else
                     {"event": e["event"], "sdp": e.get("sdp", "")[:2000]} for e in self.events]
            lines = [json.dumps(e) for e in shown if e.get("event") != "stats"][-60:]
            stats = [e for e in self.events if e.get("event") == "stats"]
            if stats:
                lines.append(json.dumps(stats[-1]))
            lines += [f"stderr: {line}" for line in self.stderr[-30:]]
        code = self._proc.poll() if self._proc else None
        return f"gst publisher ({self.codec}, exit code {code}):\n" + "\n".join(lines)

    def check_alive(self) -> None:
        """Fail at once (with the publisher's own account) when it exited or gave up."""
        fatal = self.of("fatal") + self.of("error")
        if fatal or not self.alive:
            raise AssertionError(f"GStreamer publisher failed: {fatal[:3]}\n{self.describe()}")

    async def wait_for(self, what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                                     f"{self.describe()}")
            await asyncio.sleep(0.1)

    async def wait_connected(self, timeout: float = 30) -> None:
        await self.wait_for("webrtcbin connection-state connected",
                            lambda: any(e.get("state") == "connected"
                                        for e in self.of("connection")), timeout)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM (the publisher DELETEs its session and exits); kill -9 if it does not."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        for reader in self._readers:
            reader.join(timeout=5)
        return self._proc.returncode


class FrameViewer(Viewer):
    """A WHEP viewer that decodes whatever the source sends and records each frame's size."""

    def __init__(self, base_url: str, stream: str) -> None:
        super().__init__(base_url, stream)
        self.sizes: list[tuple[int, int]] = []

    async def _video(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame: Any = await track.recv()
                if self.first_frame_at is None:
                    self.first_frame_at = time.monotonic()
                self.sizes.append((frame.width, frame.height))
                self.counters.append(len(self.counters))  # wait_frames counts these
