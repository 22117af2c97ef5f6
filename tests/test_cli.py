"""The command line a newcomer uses: `lotcast up`, `token`, and `--help` on every command."""

from __future__ import annotations

import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from up_support import UpProcess

from lotcast.auth import Role, TokenAuthority
from lotcast.interactive.client import RoomClient

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


def _token_cli(*args: str, env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-m", "lotcast", "token", *args], capture_output=True,
                          text=True, timeout=30, check=True, env=env).stdout.strip()


async def _role_welcomed(url: str, token: str) -> object:
    client = RoomClient(url, "main", token)
    try:
        welcome = await client.connect()
        return welcome.get("role")
    finally:
        await client.close()


async def test_up_keeps_one_dev_secret_and_token_uses_it(tmp_path: Path) -> None:
    """Item 11: the secret is created once (0600, path printed), reused by the next `up`, and
    `lotcast token` without a secret signs with it (found like `up` finds its data dir)."""
    data = tmp_path / "data"
    first = UpProcess(data)
    try:
        first.start()
        path = data / "jwt-secret"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert f"JWT secret:   {path} (created" in first.text()
        secret = path.read_text().strip()
        host_token = re.search(r"Host token:\s+(\S+)", first.text())
        assert host_token and TokenAuthority(secret).verify(host_token.group(1)).role is Role.HOST
        assert secret not in first.text()  # the path is printed, not the secret
        assert first.stop() == 0
    finally:
        first.close()

    second = UpProcess(data)
    try:
        second.start()
        assert f"JWT secret:   {path} (reused" in second.text()
        assert path.read_text().strip() == secret
        env = {k: v for k, v in second.env.items() if k != "LOTCAST_DATA_DIR"}
        # --data-dir, and LOTCAST_DATA_DIR from another working directory, both find the file.
        by_flag = _token_cli("host", "--data-dir", str(data), env=env)
        by_env = _token_cli("bidder", "--user-id", "u1", env={**env, "LOTCAST_DATA_DIR": str(data)})
        assert await _role_welcomed(second.urls["relay-0"], by_flag) == "host"
        assert await _role_welcomed(second.urls["broadcaster"], by_env) == "bidder"
        # An explicit secret wins over the file.
        other = "explicit-secret-0123456789-0123456789-x"
        by_var = _token_cli("host", "--data-dir", str(data), env={**env, "LOTCAST_JWT_SECRET": other})
        assert TokenAuthority(other).verify(by_var).role is Role.HOST
        assert await _role_welcomed(second.urls["relay-0"], by_var) != "host"
    finally:
        second.close()


def test_explicit_secret_overrides_the_file_for_up(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "jwt-secret").write_text("file-secret-0123456789-0123456789-abc\n")
    other = "env-secret-0123456789-0123456789-abcdef"
    up = UpProcess(data, env={"LOTCAST_JWT_SECRET": other})
    try:
        up.start()
        assert "JWT secret:   from LOTCAST_JWT_SECRET (not stored)" in up.text()
        token = re.search(r"Host token:\s+(\S+)", up.text())
        assert token and TokenAuthority(other).verify(token.group(1)).role is Role.HOST
        assert (data / "jwt-secret").read_text() == "file-secret-0123456789-0123456789-abc\n"
    finally:
        up.close()
