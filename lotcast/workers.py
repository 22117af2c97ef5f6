"""Relay workers: one relay node served by N processes, each a complete relay.

A Python process forwards media on one core, so a node uses its cores with worker processes
(as gunicorn does for HTTP). `lotcast relay --workers N` becomes a parent that:

- binds the node's TCP port once (port 0 resolved here) and never listens on it: the bound
  socket only reserves the port, so a worker restarted after a crash rebinds it even when no
  sibling is left and no other program can take it meanwhile. Each worker binds its own listener
  on that port with SO_REUSEPORT, so the kernel spreads new connections over the workers' accept
  queues by 4-tuple hash (one shared, inherited listener would let whichever worker's event loop
  wakes first take every connection). A worker that dies takes only its own queue with it.
- starts the workers (`WorkerSpec` in their environment) under a `Supervisor`: a worker that
  exits is restarted with backoff, the others keep serving;
- on SIGTERM forwards SIGTERM to every worker (each drains as a one-process relay does) and exits
  once all have; on SIGINT stops them at once.

Each worker also serves its app on a private unix socket in the parent's run directory
(`socket_path(i)`): its siblings forward what it owns there (relay/siblings.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from lotcast.config import Settings
from lotcast.supervisor import ServiceProcess, Supervisor, announce_ready

WORKER_ENV = "LOTCAST_WORKER"  # "<index>/<count>", set by the parent only
WORKER_DIR_ENV = "LOTCAST_WORKER_DIR"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# Seconds the parent waits for draining workers beyond their own drain timeout.
DRAIN_MARGIN = 15.0

log = logging.getLogger(__name__)


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its affinity mask, bounded by a cgroup v2 quota (what a
    Kubernetes CPU limit sets), rounded down (a worker is one busy core) and at least 1."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def resolve_workers(requested: int) -> int:
    """--workers: a positive count as given; 0 (the default) means one per usable CPU."""
    if requested < 0:
        raise SystemExit(f"--workers must be 0 (one per usable CPU) or more, not {requested}")
    return requested or usable_cpus()


@dataclass(frozen=True)
class WorkerSpec:
    """Which worker of which node this process is."""

    index: int
    count: int
    run_dir: Path

    @classmethod
    def from_env(cls) -> WorkerSpec | None:
        raw = os.environ.get(WORKER_ENV)
        if not raw:
            return None
        index, count = (int(x) for x in raw.split("/"))
        if not 0 <= index < count:
            raise SystemExit(f"{WORKER_ENV}={raw!r}: index out of range")
        return cls(index, count, Path(os.environ[WORKER_DIR_ENV]))

    def env(self) -> dict[str, str]:
        return {WORKER_ENV: f"{self.index}/{self.count}", WORKER_DIR_ENV: str(self.run_dir)}

    @property
    def name(self) -> str:
        return f"w{self.index}"

    def worker_id(self, node_id: str) -> str:
        """This worker's own id where per-process entries are kept (room socket counts, the
        registry's per-worker heartbeats): `<node-id>/w<i>`."""
        return f"{node_id}/{self.name}"

    def socket_path(self, index: int | None = None) -> Path:
        return self.run_dir / f"w{self.index if index is None else index}.sock"

    def siblings(self) -> Iterator[int]:
        """The other workers, starting after this one (full workers spread their overflow)."""
        for step in range(1, self.count):
            yield (self.index + step) % self.count

    def share(self, total: int) -> int:
        """This worker's part of a node-wide amount (max_viewers): the parts sum to `total`."""
        return total // self.count + (1 if self.index < total % self.count else 0)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never-listening SO_REUSEPORT socket holding the node's port (see module doc)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def bind_worker_listener(host: str, port: int) -> socket.socket:
    """A worker's own listener on the node's shared port."""
    sock = reserve_port(host, port)
    sock.set_inheritable(False)
    return sock


def bind_worker_socket(path: Path) -> socket.socket:
    """The worker's private unix socket (a stale file from a killed predecessor is replaced)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


# A worker whose parent died exits after this long even if its own shutdown is stuck.
ORPHAN_EXIT_S = 5.0


def exit_when_orphaned(poll: float = 0.5) -> threading.Thread:
    """In a worker: a daemon thread that ends the process once its parent (the node's parent
    process) is gone. The parent-death signal (SIGINT) asks for a clean shutdown first; a thread
    that only watches the parent id still ends a worker whose loop never finishes it, which
    would otherwise go on heartbeating as the node into the registry."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        log.warning("parent %d gone: exiting in %.0f s at the latest", parent, ORPHAN_EXIT_S)
        time.sleep(ORPHAN_EXIT_S)
        os._exit(1)

    thread = threading.Thread(target=watch, name="orphan-watch", daemon=True)
    thread.start()
    return thread


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as its LOTCAST_* variable: how the parent hands its whole configuration
    (flags and environment alike) to a worker started with no flags."""
    env: dict[str, str] = {}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, list):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        env[f"LOTCAST_{f.name.upper()}"] = text
    return env


def run_workers(settings: Settings, count: int) -> int:
    """The parent of a relay node with `count` workers; returns the exit status."""
    from lotcast.service import node_url

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s relay %(levelname)s %(name)s: %(message)s")
    reserved = reserve_port(settings.host, settings.port)
    settings.port = int(reserved.getsockname()[1])
    settings.public_url = node_url(settings, settings.port)
    if not settings.node_id:
        settings.node_id = f"relay-{settings.host}-{settings.port}"
    settings.workers = count
    run_dir = Path(tempfile.mkdtemp(prefix="lotcast-relay-workers-"))
    os.chmod(run_dir, 0o700)
    base_env = settings_env(settings)
    workers = [ServiceProcess("relay", [], env={**base_env, **WorkerSpec(i, count, run_dir).env()},
                              echo=True, name=f"w{i}", supervised=True) for i in range(count)]
    supervisor = Supervisor(lambda message: print(f"[relay] {message}", file=sys.stderr,
                                                  flush=True))
    stop = threading.Event()
    drain = threading.Event()

    def on_signal(sig: int, _frame: object) -> None:
        if sig == signal.SIGTERM:
            drain.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for worker in workers:
            supervisor.start(worker)
        announce_ready(kind="relay", url=settings.public_url, node_id=settings.node_id,
                       pid=os.getpid(), workers=count, worker_pids=[w.pid for w in workers])
        supervisor.run(stop)
        if drain.is_set():
            _drain(workers, settings.drain_timeout + DRAIN_MARGIN)
        return 0
    except RuntimeError as exc:
        log.error("cannot start the workers: %s", exc)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        supervisor.stop_all()
        reserved.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _drain(workers: list[ServiceProcess], timeout: float) -> None:
    """SIGTERM every live worker (each drains itself) and wait until all have exited."""
    for worker in workers:
        if worker.alive():
            worker.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(w.alive() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w.name for w in workers if w.alive()]
    log.warning("drained %d workers%s", len(workers) - len(left),
                f"; {left} still running, stopping them" if left else "")
