"""Property tests: the real Redis Function vs a pure-Python reference model of the auction rules."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lotcast.auth import Identity, Role
from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.protocol import CloseLot, CreateLot, OpenLot, PlaceBid, ProtocolError
from lotcast.interactive.store import AuctionStore, RateLimit
from lotcast.redis_server import RedisServer

Outcome = tuple[str, ...]


@dataclass
class ReferenceLot:
    """docs/protocol.md "Auction rules", written as plainly as possible."""

    start: int
    incs: list[tuple[int, int]]
    reserve: int = 0
    buy_now: int = 0
    status: str = "open"
    price: int = 0
    leader: str | None = None
    lmax: int = 0
    bids: int = 0
    seen_keys: dict[tuple[str, str], Outcome] = field(default_factory=dict)

    def inc(self, p: int) -> int:
        return [step for threshold, step in self.incs if threshold <= p][-1]

    def next_min(self) -> int:
        return self.start if self.leader is None else self.price + self.inc(self.price)

    def bid(self, user: str, amount: int, maxb: int, key: str) -> Outcome:
        if key and (user, key) in self.seen_keys:
            return self.seen_keys[(user, key)]
        result = self._bid(user, amount, maxb)
        if key:
            self.seen_keys[(user, key)] = result
        return result

    def _bid(self, user: str, amount: int, maxb: int) -> Outcome:
        if self.status != "open":
            return ("err", "lot_closed")
        if amount < self.next_min():
            return ("err", "bid_too_low")
        status = "winning"
        if self.buy_now and self.bids == 0 and amount >= self.buy_now:
            self.price, self.leader, self.lmax, status = self.buy_now, user, self.buy_now, "bought"
            self.status = "sold"
        elif self.leader is None:
            self.price, self.leader, self.lmax = amount, user, maxb
        elif self.leader == user:
            self.lmax = max(self.lmax, maxb)
        elif maxb > self.lmax:
            proxy = min(maxb, self.lmax + self.inc(self.lmax))
            self.price, self.leader, self.lmax = max(amount, proxy), user, maxb
        else:
            self.price = min(self.lmax, maxb + self.inc(maxb))
            status = "outbid"
        if status != "bought" and self.reserve and self.price < self.reserve <= self.lmax:
            self.price = self.reserve
        self.bids += 1
        return ("ok", status, str(self.price), str(self.leader))

    def close(self) -> Outcome:
        if self.status == "sold":
            return ("sold", str(self.price), str(self.leader))
        if self.leader is not None and (not self.reserve or self.price >= self.reserve):
            return ("sold", str(self.price), str(self.leader))
        return ("unsold", "reserve_not_met" if self.leader else "no_bids")


@st.composite
def lots(draw: st.DrawFn) -> ReferenceLot:
    thresholds = sorted(draw(st.sets(st.integers(1, 3000), max_size=2)))
    incs = [(0, draw(st.integers(1, 300)))] + [(t, draw(st.integers(1, 500))) for t in thresholds]
    start = draw(st.integers(1, 1000))
    buy_now = draw(st.one_of(st.just(0), st.integers(start + 1, 8000)))
    reserve = draw(st.one_of(st.just(0), st.integers(1, buy_now or 6000)))
    return ReferenceLot(start=start, incs=incs, reserve=reserve, buy_now=buy_now)


bid_steps = st.lists(st.tuples(st.sampled_from(["u1", "u2", "u3", "u4"]),
                               st.integers(1, 7000), st.integers(0, 4000),
                               st.sampled_from(["", "", "", "k1", "k2"])),
                     min_size=1, max_size=25)


async def run_against_redis(url: str, ref: ReferenceLot,
                            steps: list[tuple[str, int, int, str]]) -> None:
    redis = aioredis.Redis.from_url(url)
    try:
        await redis.flushall()
        functions = RoomFunctions(redis, 10000)
        await functions.load()
        store = AuctionStore(functions, RateLimit(0, 0))
        created = await store.create_lot("prop", CreateLot(
            cid=1, title="lot", start_price=ref.start, increments=tuple(ref.incs),
            duration_ms=3_600_000, soft_close_ms=0, reserve=ref.reserve or None,
            buy_now=ref.buy_now or None))
        lot = created["lot"]
        await store.open_lot("prop", OpenLot(cid=1, lot=lot))
        last_price = 0
        for user, amount, extra, key in steps:
            before_min = ref.next_min()
            expected = ref.bid(user, amount, amount + extra, key)
            try:
                out = await store.place_bid("prop", Identity(Role.BIDDER, user, user),
                                            PlaceBid(cid=1, lot=lot, amount=amount,
                                                     max=amount + extra, key=key or None))
                got: Outcome = ("ok", out.status, str(out.price), out.leader)
            except ProtocolError as err:
                got = ("err", str(err.code))
            assert got == expected, (user, amount, extra, key)
            if got[0] == "ok" and not out.duplicate:
                assert amount >= before_min  # every accepted bid >= previous price + increment
                assert out.price >= last_price  # the price never decreases
                last_price = out.price
        if ref.status == "open":
            closed = await store.close_lot("prop", CloseLot(cid=1, lot=lot))
            final = await redis.hgetall(f"lotcast:{{prop}}:lot:{lot}")
            if closed["status"] == "sold":
                got_final: Outcome = ("sold", final[b"price"].decode(), final[b"winner"].decode())
            else:
                got_final = ("unsold", final[b"reason"].decode())
        else:
            final = await redis.hgetall(f"lotcast:{{prop}}:lot:{lot}")
            got_final = ("sold", final[b"price"].decode(), final[b"winner"].decode())
        assert got_final == ref.close()
    finally:
        await redis.aclose()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ref=lots(), steps=bid_steps)
def test_script_matches_reference_model(redis_server: RedisServer, ref: ReferenceLot,
                                        steps: list[tuple[str, int, int, str]]) -> None:
    asyncio.run(run_against_redis(redis_server.url, ref, steps))


def test_known_proxy_sequence(redis_server: RedisServer) -> None:
    """eBay example: A max 300 leads at 100; B bids 150 -> A at 160; B max 600 -> B at 310."""
    ref = ReferenceLot(start=100, incs=[(0, 10)])
    steps = [("A", 100, 200, ""), ("B", 150, 0, ""), ("B", 170, 430, "")]
    asyncio.run(run_against_redis(redis_server.url, ref, steps))
    assert (ref.price, ref.leader) == (310, "B")
