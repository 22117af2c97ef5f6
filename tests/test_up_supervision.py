"""`lotcast up` supervises its children (issue 7 item 10): kill -9 of a relay or of redis-server
is followed by a restart on the same port, the other children keep serving, bids acknowledged
before the Redis kill come back from the AOF, and Ctrl-C / SIGTERM / the death of `up` itself
leave no child behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import redis.asyncio as aioredis
from up_support import UpProcess, pid_running, wait_gone

from lotcast import keys
from lotcast.auth import Role
from lotcast.interactive.client import RoomClient
from lotcast.supervisor import ChildState, Supervisor

ROOM = "main"
# No per-user bid limits: the test bids as fast as acks come back.
UNLIMITED = {"LOTCAST_BID_RATE": "0", "LOTCAST_WS_MSG_RATE": "0"}


async def _healthy(url: str) -> int:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        return (await http.get(f"{url}/healthz")).status_code


async def _bid_until_acked(client: RoomClient, lot: str, amount: int, within: float) -> dict[str, object]:
    """Bid `amount` (same idempotency key on every try) until acked; Redis may be coming back."""
    deadline = time.monotonic() + within
    key = f"k{amount}"
    while True:
        reply = await client.request("bid", lot=lot, amount=amount, key=key)
        if reply["type"] == "ack" or time.monotonic() > deadline:
            return reply
        assert reply["code"] == "unavailable", reply
        await asyncio.sleep(0.1)


@pytest.mark.timeout(240)
async def test_up_restarts_a_killed_relay_and_redis_and_keeps_acked_bids(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "data", relays=2, env=UNLIMITED)
    clients: list[RoomClient] = []
    try:
        up.start()
        authority = up.authority()
        host = RoomClient(up.urls["broadcaster"], ROOM, authority.mint(Role.HOST, "host", "Host"))
        bidder = RoomClient(up.urls["relay-1"], ROOM, authority.mint(Role.BIDDER, "b1", "B1"))
        clients = [host, bidder]
        for c in clients:
            await c.connect()
        lot = (await host.request("lot_create", title="Kept", start_price=10, increments=[[0, 1]],
                                  duration_ms=600_000, soft_close_ms=0))["lot"]
        assert (await host.request("lot_open", lot=lot))["type"] == "ack"

        acked: list[tuple[int, int]] = []  # (amount, offset)
        amount = 10
        for _ in range(10):
            amount += 5
            reply = await bidder.request("bid", lot=lot, amount=amount, key=f"k{amount}")
            assert reply["type"] == "ack", reply
            acked.append((amount, int(str(reply["offset"]))))

        # kill -9 relay-0: relay-1 keeps taking bids while relay-0 is down and restarting.
        relay0_url, relay0_pid = up.urls["relay-0"], up.pids["relay-0"]
        mark = up.kill_child("relay-0")
        for _ in range(5):
            amount += 5
            reply = await bidder.request("bid", lot=lot, amount=amount, key=f"k{amount}")
            assert reply["type"] == "ack", reply
            acked.append((amount, int(str(reply["offset"]))))
        new_pid, new_url = await asyncio.to_thread(up.wait_restart, "relay-0", 60, mark)
        assert new_pid != relay0_pid and not pid_running(relay0_pid)
        assert new_url == relay0_url  # same port: the printed URLs stay valid
        assert await _healthy(relay0_url) == 200
        assert "relay-0 exited with code -9; restarting in" in up.text()

        # kill -9 redis-server: it comes back on its port from its AOF with every acked bid.
        redis_url, redis_pid = up.urls["redis"], up.pids["redis"]
        mark = up.kill_child("redis")
        new_redis, new_redis_url = await asyncio.to_thread(up.wait_restart, "redis", 60, mark)
        assert new_redis != redis_pid and new_redis_url == redis_url
        check = aioredis.Redis.from_url(redis_url)
        try:
            entries = await check.xrange(keys.room_log(ROOM))
        finally:
            await check.aclose()
        log = {int(eid.split(b"-")[1]): msgpack.unpackb(f[b"e"], raw=False) for eid, f in entries}
        for bid_amount, offset in acked:
            assert (log[offset]["type"], log[offset]["bidder"], log[offset]["amount"]) == \
                ("bid", "b1", bid_amount)

        # The nodes reconnect to the restarted Redis by themselves: bidding works again.
        reply = await _bid_until_acked(bidder, lot, amount + 100, within=30)
        assert reply["type"] == "ack", reply
        # Only the killed children were restarted.
        assert all(pid_running(up.pids[n]) for n in ("broadcaster", "relay-1"))
        assert up.text().count(" restarted (pid ") == 2

        for c in clients:
            await c.close()
        clients = []
        assert await asyncio.to_thread(up.stop, signal.SIGINT) == 0
        assert wait_gone(up.every_pid, 10) == set()
    except BaseException:
        print(up.text())
        raise
    finally:
        for c in clients:
            await c.close()
        up.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["sigterm", "kill_up"])
def test_stopping_up_leaves_no_child_behind(tmp_path: Path, how: str) -> None:
    """SIGTERM stops every child in order; even a kill -9 of `up` takes its children with it."""
    up = UpProcess(tmp_path / "data", relays=1)
    try:
        up.start()
        children = set(up.pids.values())
        assert all(pid_running(p) for p in children)
        if how == "sigterm":
            assert up.stop(signal.SIGTERM) == 0
        else:
            assert up.stop(signal.SIGKILL) == -signal.SIGKILL
        assert wait_gone(children, 30) == set(), up.text()
    finally:
        up.close()


@pytest.mark.timeout(120)
def test_a_relay_that_drained_and_exited_is_restarted(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "data", relays=1)
    try:
        up.start()
        url, pid = up.urls["relay-0"], up.pids["relay-0"]
        mark = len(up.snapshot())
        os.kill(pid, signal.SIGTERM)  # drains (no viewers: at once) and exits 0
        up.wait_line(re.compile(r"^\[up\] relay-0 exited with code 0; restarting in"), 60, mark)
        new_pid, new_url = up.wait_restart("relay-0", 60, mark)
        assert new_pid != pid and new_url == url
        assert up.stop() == 0
        assert wait_gone(up.every_pid, 10) == set()
    finally:
        up.close()


class _FlakyChild:
    """Fault injection for the supervisor's bookkeeping: a child that "dies" on demand and whose
    restarts can be made to fail."""

    name = "flaky"

    def __init__(self) -> None:
        self.running = False
        self.starts = 0
        self.fail_next_start = False

    def start(self, timeout: float = 30.0) -> object:
        self.starts += 1
        if self.fail_next_start:
            self.fail_next_start = False
            raise RuntimeError("flaky exited before ready")
        self.running = True
        return self

    def alive(self) -> bool:
        return self.running

    @property
    def returncode(self) -> int | None:
        return None if self.running else -9

    def describe(self) -> str:
        return "pid 1"

    def stop(self) -> None:
        self.running = False


def _poll_until(supervisor: Supervisor, child: _FlakyChild, starts: int) -> None:
    for _ in range(400):
        supervisor.poll()
        if child.starts >= starts:
            return
        time.sleep(0.005)
    raise AssertionError(f"{child.starts} starts, wanted {starts}")


def test_restart_backoff_doubles_on_repeated_exits_and_resets_after_a_stable_run() -> None:
    logged: list[str] = []
    supervisor = Supervisor(logged.append, first_delay=0.01, max_delay=0.04, stable_after=0.3)
    child = _FlakyChild()
    supervisor.start(child)
    delays = []
    for restart in range(1, 5):
        child.running = False  # dies right after each start
        _poll_until(supervisor, child, restart + 1)
        delays.append(logged[-2].rsplit("restarting in ", 1)[1])
        assert supervisor.state_of("flaky") is ChildState.RUNNING
    assert delays == ["0.01 s", "0.02 s", "0.04 s", "0.04 s"]  # doubles, capped at max_delay
    assert logged[-1] == "flaky restarted (pid 1, restart 4)"

    # A restart that fails counts as one more exit (longer wait), then the next one succeeds.
    child.running = False
    child.fail_next_start = True
    _poll_until(supervisor, child, 7)
    assert any("restart 5 failed (flaky exited before ready); restarting in 0.04 s" in line
               for line in logged)
    assert supervisor.state_of("flaky") is ChildState.RUNNING and supervisor.restarts_of("flaky") == 6

    time.sleep(0.35)  # stayed up longer than stable_after: the backoff starts over
    child.running = False
    _poll_until(supervisor, child, 8)
    assert "flaky exited with code -9; restarting in 0.01 s" in logged

    supervisor.stop_all()
    assert not child.running and supervisor.state_of("flaky") is ChildState.STOPPED
