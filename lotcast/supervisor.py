"""Starts lotcast service processes and keeps them running (used by `up` and tests).

`ServiceProcess` is one `python -m lotcast <command>` child: started, waited for until it prints
its ready line, stopped. `Supervisor` owns the children of `lotcast up`: a child that dies is
restarted on the port it had, with exponential backoff, and every exit and restart is logged; the
other children keep running. Stopping the supervisor stops every child in reverse start order.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

READY_PREFIX = "LOTCAST_READY "
PR_SET_PDEATHSIG = 1


def announce_ready(**info: Any) -> None:
    """Printed by a service once it accepts connections; `ServiceProcess` waits for it.

    One write of the whole line: a relay parent echoes its workers' output from other threads,
    and `print` writes the text and its newline separately."""
    sys.stdout.write(READY_PREFIX + json.dumps(info) + "\n")
    sys.stdout.flush()


def die_with_parent(sig: int) -> Callable[[], None]:
    """A `preexec_fn` for a supervised child: its own session (a terminal's Ctrl-C reaches only
    the supervisor, which stops the children in order) and `sig` when the supervisor dies, so a
    `kill -9` of `up` leaves no orphans (Linux; elsewhere only the session part applies).

    The kernel sends the death signal when the *thread* that forked exits, so supervised
    children must be started from the main thread.
    """
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name and sys.platform == "linux" else None

    def preexec() -> None:
        os.setsid()
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


class ServiceProcess:
    """A `python -m lotcast <command>` child process; `start()` may be called again after it exited."""

    def __init__(self, command: str, args: Sequence[str] = (), env: dict[str, str] | None = None,
                 echo: bool = False, name: str | None = None, supervised: bool = False) -> None:
        self.command = command
        self.name = name or command
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.echo = echo
        self.supervised = supervised
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

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        self.info = {}
        ready = self._ready = threading.Event()
        proc = self._proc = subprocess.Popen(
            [sys.executable, "-m", "lotcast", self.command, *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
            bufsize=1, preexec_fn=die_with_parent(signal.SIGINT) if self.supervised else None,
        )
        self._reader = threading.Thread(target=self._read, args=(proc, ready), daemon=True)
        self._reader.start()
        if not ready.wait(timeout):
            tail = "".join(self.output[-40:])
            self.stop()
            raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{tail}")
        if not self.info:
            tail = "".join(self.output[-40:])
            proc.wait()
            raise RuntimeError(f"{self.name} exited before ready:\n{tail}")
        self._pin_port()
        return self

    def _pin_port(self) -> None:
        """Replace `--port 0` by the port it got, so a restart comes back on the same URL."""
        port = self.url.rsplit(":", 1)[-1].rstrip("/")
        if "--port" in self.args and port.isdigit():
            i = self.args.index("--port")
            if i + 1 < len(self.args):
                self.args[i + 1] = port

    def _read(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY_PREFIX):
                self.info = json.loads(line[len(READY_PREFIX):])
                ready.set()
            self.output.append(line)
            if len(self.output) > 5000:
                del self.output[:1000]
            if self.echo:
                sys.stdout.write(f"[{self.name}] {line}")
        ready.set()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def describe(self) -> str:
        where = f" on {self.info['url']}" if self.info.get("url") else ""
        return f"pid {self._proc.pid if self._proc else '-'}{where}"

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


class Child(Protocol):
    """What the supervisor needs of a child (ServiceProcess, RedisServer)."""

    name: str

    def start(self, timeout: float = ...) -> object: ...

    def alive(self) -> bool: ...

    @property
    def returncode(self) -> int | None: ...

    def describe(self) -> str: ...

    def stop(self) -> None: ...


class ChildState(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    BACKOFF = "backoff"  # exited; a restart is scheduled


@dataclass
class _Slot:
    child: Child
    state: ChildState = ChildState.STOPPED
    restarts: int = 0
    delay: float = 0.0
    restart_at: float = 0.0
    running_since: float = 0.0


class Supervisor:
    """Keeps a fixed set of children running until `stop_all()`.

    A child that exits (crash, kill -9, a relay that drained) is restarted after a backoff that
    starts at `first_delay`, doubles on every further exit up to `max_delay`, and is forgotten once
    the child stayed up for `stable_after` seconds. A failed restart counts as another exit.
    """

    def __init__(self, log: Callable[[str], None], first_delay: float = 0.25,
                 max_delay: float = 10.0, stable_after: float = 10.0,
                 restart_timeout: float = 20.0) -> None:
        self._log = log
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.stable_after = stable_after
        self.restart_timeout = restart_timeout
        self._slots: list[_Slot] = []
        self._stopping = False

    def state_of(self, name: str) -> ChildState:
        return next(s.state for s in self._slots if s.child.name == name)

    def restarts_of(self, name: str) -> int:
        return next(s.restarts for s in self._slots if s.child.name == name)

    def start(self, child: Child) -> None:
        """Start a child now (a failure raises: `up` does not come up half started)."""
        slot = _Slot(child)
        self._slots.append(slot)
        child.start()
        self._set_running(slot)

    def _set_running(self, slot: _Slot) -> None:
        slot.state = ChildState.RUNNING
        slot.running_since = time.monotonic()

    def poll(self) -> None:
        """One supervision pass: notice exits, run restarts that are due (in start order, so Redis
        comes back before the services that need it)."""
        now = time.monotonic()
        for slot in self._slots:
            if self._stopping:
                return
            if slot.state is ChildState.RUNNING and not slot.child.alive():
                self._exited(slot, now, f"exited with code {slot.child.returncode}")
            elif slot.state is ChildState.BACKOFF and now >= slot.restart_at:
                self._restart(slot)

    def _exited(self, slot: _Slot, now: float, why: str) -> None:
        if now - slot.running_since >= self.stable_after:
            slot.delay = 0.0
        slot.delay = self.first_delay if slot.delay == 0.0 else min(self.max_delay, slot.delay * 2)
        slot.state = ChildState.BACKOFF
        slot.restart_at = now + slot.delay
        self._log(f"{slot.child.name} {why}; restarting in {slot.delay:.2f} s")

    def _restart(self, slot: _Slot) -> None:
        slot.restarts += 1
        try:
            slot.child.start(timeout=self.restart_timeout)
        except Exception as exc:  # any failure to come up counts as one more exit
            slot.running_since = time.monotonic()
            self._exited(slot, time.monotonic(),
                         f"restart {slot.restarts} failed ({str(exc).splitlines()[0]})")
            return
        self._set_running(slot)
        self._log(f"{slot.child.name} restarted ({slot.child.describe()}, restart {slot.restarts})")

    def run(self, stop: threading.Event, interval: float = 0.1) -> None:
        while not stop.is_set():
            self.poll()
            stop.wait(interval)

    def stop_all(self) -> None:
        self._stopping = True
        for slot in reversed(self._slots):
            slot.child.stop()
            slot.state = ChildState.STOPPED
