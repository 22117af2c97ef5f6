"""Starts lotcast service processes and waits for their ready line (used by `up` and tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

READY_PREFIX = "LOTCAST_READY "


def announce_ready(**info: Any) -> None:
    """Printed by a service once it accepts connections; `ServiceProcess` waits for it."""
    print(READY_PREFIX + json.dumps(info), flush=True)


class ServiceProcess:
    """A `python -m lotcast <command>` child process."""

    def __init__(self, command: str, args: Sequence[str] = (), env: dict[str, str] | None = None,
                 echo: bool = False) -> None:
        self.command = command
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.echo = echo
        self.info: dict[str, Any] = {}
        self.output: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def url(self) -> str:
        return str(self.info["url"])

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lotcast", self.command, *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            tail = "".join(self.output[-40:])
            self.stop()
            raise RuntimeError(f"{self.command} not ready in {timeout}s:\n{tail}")
        if not self.info:
            tail = "".join(self.output[-40:])
            raise RuntimeError(f"{self.command} exited before ready:\n{tail}")
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(READY_PREFIX):
                self.info = json.loads(line[len(READY_PREFIX):])
                self._ready.set()
            self.output.append(line)
            if len(self.output) > 5000:
                del self.output[:1000]
            if self.echo:
                sys.stdout.write(f"[{self.command}] {line}")
        self._ready.set()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self._proc is not None
        self._proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        assert self._proc is not None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + timeout
            while self._proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._proc.poll() is None:
                self._proc.kill()
        self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
