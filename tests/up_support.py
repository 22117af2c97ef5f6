"""`lotcast up` as a real subprocess for the tests: started on free ports with its own data dir,
its printed URLs and child pids parsed, its log lines waited for, stopped with Ctrl-C (SIGINT).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from lotcast.auth import TokenAuthority
from lotcast.devsecret import read_secret, secret_path

CHILD_LINE = re.compile(r"^\s+(Redis|broadcaster|relay-\d+):\s+(\S+) \(pid (\d+)")
# Environment a developer's shell may carry that would change what `up` does.
SCRUBBED = ("LOTCAST_JWT_SECRET", "LOTCAST_DATA_DIR", "LOTCAST_REDIS_URL")


class UpProcess:
    """One `lotcast up --relays N` with every port free and its data dir under the test's tmp."""

    def __init__(self, data_dir: Path, relays: int = 1, env: dict[str, str] | None = None,
                 args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.relays = relays
        self.args = list(args)  # more `up` options (--tls, --turn, ...)
        base = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        self.env = {**base, "LOTCAST_LOG_LEVEL": "warning", **(env or {})}
        self.lines: list[str] = []
        self.urls: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.every_pid: set[int] = set()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = 90.0) -> UpProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lotcast", "up", "--broadcaster-port", "0", "--relay-port", "0",
             "--relays", str(self.relays), "--data-dir", str(self.data_dir), *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_line(re.compile(r"Press Ctrl-C to stop"), timeout)
        for line in self.snapshot():
            m = CHILD_LINE.match(line)
            if m:
                name = "redis" if m.group(1) == "Redis" else m.group(1)
                self.urls[name] = m.group(2)
                self.pids[name] = int(m.group(3))
                self.every_pid.add(int(m.group(3)))
        expected = {"redis", "broadcaster", *(f"relay-{i}" for i in range(self.relays))}
        assert set(self.pids) == expected, self.text()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._lock:
                self.lines.append(line)

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def text(self, tail: int = 200) -> str:
        return "".join(self.snapshot()[-tail:])

    def wait_line(self, pattern: re.Pattern[str], timeout: float, after: int = 0) -> re.Match[str]:
        """The first line at index >= `after` matching `pattern` (fails with the log otherwise)."""
        deadline = time.monotonic() + timeout
        seen = after
        while True:
            lines = self.snapshot()
            for line in lines[seen:]:
                m = pattern.search(line)
                if m:
                    return m
            seen = len(lines)
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern.pattern!r} in {timeout}s:\n"
                                     f"{self.text()}")
            if self._proc is not None and self._proc.poll() is not None:
                raise AssertionError(f"up exited ({self._proc.returncode}):\n{self.text()}")
            time.sleep(0.05)

    def wait_restart(self, name: str, timeout: float, after: int) -> tuple[int, str]:
        """Wait for `up` to log that `name` restarted; its new pid and URL."""
        m = self.wait_line(re.compile(rf"^\[up\] {re.escape(name)} restarted \(pid (\d+) on (\S+?)[,)]"),
                           timeout, after)
        pid = int(m.group(1))
        self.pids[name] = pid
        self.every_pid.add(pid)
        return pid, m.group(2)

    def authority(self) -> TokenAuthority:
        secret = read_secret(secret_path(self.data_dir))
        assert secret is not None, f"no secret file in {self.data_dir}"
        return TokenAuthority(secret)

    def kill_child(self, name: str) -> int:
        """kill -9 one child; the index of the next log line (to wait for what follows)."""
        mark = len(self.snapshot())
        os.kill(self.pids[name], signal.SIGKILL)
        return mark

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> int:
        """Signal `up` (Ctrl-C by default) and wait for it; its exit status."""
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
        try:
            return self._proc.wait(timeout)
        finally:
            if self._reader is not None:
                self._reader.join(timeout=5)

    def close(self) -> None:
        """Teardown whatever happened: stop `up`, then make sure no child outlives it."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self.stop(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for pid in self.every_pid:
            if pid_running(pid):
                os.kill(pid, signal.SIGKILL)


def pid_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """The pids still running after at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    left = {p for p in pids if pid_running(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {p for p in left if pid_running(p)}
    return left
