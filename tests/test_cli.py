"""The command line a newcomer uses: `lotcast up`, `token`, and `--help` on every command."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lotcast.auth import Role, TokenAuthority

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("command", ["up", "broadcaster", "relay", "token"])
def test_every_command_has_help(command: str) -> None:
    out = subprocess.run([sys.executable, "-m", "lotcast", command, "--help"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert "usage: lotcast " + command in out
    if command in ("broadcaster", "relay"):
        assert "LOTCAST_REDIS_URL" in out and "--ice-ip" in out


def test_token_mints_a_verifiable_jwt() -> None:
    secret = "cli-test-secret-0123456789-0123456789"
    out = subprocess.run(
        [sys.executable, "-m", "lotcast", "token", "bidder", "--name", "Alice", "--user-id", "u7",
         "--jwt-secret", secret], capture_output=True, text=True, timeout=30, check=True).stdout
    identity = TokenAuthority(secret).verify(out.strip())
    assert identity.role is Role.BIDDER and identity.user_id == "u7"
    assert identity.display_name == "Alice"


def test_up_runs_redis_broadcaster_and_relay_and_stops_them(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lotcast", "up", "--broadcaster-port", "0", "--relay-port", "0",
         "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        text = "".join(lines)
        host = re.search(r"Host page:\s+(\S+)", text)
        viewer = re.search(r"Viewer page:\s+(\S+)", text)
        token = re.search(r"Host token:\s+(\S+)", text)
        assert host and viewer and token, text
        assert "#token=" in host.group(1)
        with httpx.Client() as http:
            assert http.get(host.group(1).split("#")[0]).status_code == 200
            assert http.get(viewer.group(1)).status_code == 200
            relay_base = viewer.group(1).split("/watch")[0]
            # nobody is live yet: the relay says so and asks the player to retry
            probe = http.head(f"{relay_base}/whep/main")
            assert probe.status_code == 409 and "Retry-After" in probe.headers
        assert (tmp_path / "redis" / "appendonlydir").exists()  # AOF on
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
