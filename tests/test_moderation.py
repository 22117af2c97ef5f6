"""Moderation on two real nodes and one real Redis: mute and ban reach every node and the
sockets a user already has open; who may act on whom; every action in the room log."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from chat_support import caught_up, client, state, two_nodes

from lotcast import redisconn
from lotcast.auth import Identity, Role
from lotcast.interactive.client import RoomClient
from lotcast.interactive.devserver import DevServerProcess
from lotcast.interactive.functions import RoomFunctions
from lotcast.interactive.polls import PollStore
from lotcast.interactive.protocol import PlaceBid, ProtocolError, Vote
from lotcast.interactive.store import AuctionStore, RateLimit
from lotcast.redis_server import RedisServer

LOT = {"title": "Vase", "start_price": 100, "increments": [[0, 10]], "duration_ms": 600_000,
       "soft_close_ms": 0}
BANNED_CLOSE = 4503


@pytest.fixture(scope="module")
def nodes(redis_server: RedisServer) -> Iterator[tuple[DevServerProcess, DevServerProcess]]:
    with two_nodes(redis_server.url, "--ws-msg-rate", "0", "--bid-rate", "0") as pair:
        yield pair


class Room:
    """A host on node a, a moderator on node b, a watcher on each node, a room with an open lot
    and an open poll."""

    def __init__(self, a: DevServerProcess, b: DevServerProcess, redis_url: str) -> None:
        self.name = f"mod-{uuid.uuid4().hex[:8]}"
        self.a, self.b, self.redis_url = a, b, redis_url
        self.host = client(a.url, self.name, Role.HOST, "host", "Host")
        self.mod = client(b.url, self.name, Role.MODERATOR, "mo", "Mo")
        self.watchers = [client(a.url, self.name), client(b.url, self.name)]
        self.others: list[RoomClient] = []
        self.lot = self.poll = ""

    def user(self, node: DevServerProcess, user: str, role: Role = Role.BIDDER) -> RoomClient:
        c = client(node.url, self.name, role, user, user.title())
        self.others.append(c)
        return c

    async def start(self) -> None:
        for c in (self.host, self.mod, *self.watchers):
            await c.connect()
        self.lot = (await self.host.request("lot_create", **LOT))["lot"]
        await self.host.request("lot_open", lot=self.lot)
        self.poll = (await self.host.request("poll_open", question="?", options=["a", "b"],
                                             duration_ms=600_000))["poll"]

    async def close(self) -> None:
        for c in (self.host, self.mod, *self.watchers, *self.others):
            await c.close()


@pytest.fixture
async def room(nodes: tuple[DevServerProcess, DevServerProcess],
               redis_server: RedisServer) -> AsyncIterator[Room]:
    r = Room(*nodes, redis_server.url)
    await r.start()
    yield r
    await r.close()


async def test_mute_refuses_chat_bids_and_votes_on_every_node_at_once(room: Room) -> None:
    on_a, on_b = room.user(room.a, "eve"), room.user(room.b, "eve")
    await on_a.connect()
    await on_b.connect()
    assert (await on_b.request("chat", text="before"))["type"] == "ack"

    muted = await room.mod.request("user_mute", user="eve", duration_ms=60_000)
    assert muted["type"] == "ack" and muted["user"] == "eve"
    acked = time.monotonic()
    # The mute is state in Redis, checked inside the chat, bid and vote Functions: the very next
    # request on any node, on sockets opened before the mute, is refused.
    replies = await asyncio.gather(
        on_a.request("chat", text="after"), on_b.request("chat", text="after"),
        on_a.request("bid", lot=room.lot, amount=100), on_b.request("bid", lot=room.lot, amount=100),
        on_a.request("vote", poll=room.poll, option=0), on_b.request("vote", poll=room.poll,
                                                                       option=1))
    took = time.monotonic() - acked
    print(f"mute: first refusal on both nodes {took * 1000:.0f} ms after the ack")
    for r in replies:
        assert (r["type"], r["code"], r["until"]) == ("error", "muted", muted["until"]), r
    assert [r["for"] for r in replies] == ["chat", "chat", "bid", "bid", "vote", "vote"]

    # everyone sees the mute in the log: who, whom, until when
    await caught_up(room.redis_url, room.name, *room.watchers)
    for w in room.watchers:
        ev = next(e for e in state(w).log if e["type"] == "user_muted")
        assert (ev["user"], ev["by"], ev["by_name"], ev["until"]) == ("eve", "mo", "Mo",
                                                                     muted["until"])
        assert ev["ts"] <= ev["until"] - 59_000
        assert state(w).moderation["muted"] == {"eve": muted["until"]}
    assert (await room.host.request("user_unmute", user="eve"))["type"] == "ack"
    assert (await on_a.request("chat", text="back"))["type"] == "ack"
    assert (await on_b.request("bid", lot=room.lot, amount=100))["type"] == "ack"


async def test_ban_closes_the_users_sockets_on_every_node_and_refuses_new_ones(
        room: Room) -> None:
    sockets = [room.user(room.a, "troll"), room.user(room.b, "troll"),
               room.user(room.a, "troll")]
    for s in sockets:
        await s.connect()
    bystander = room.user(room.b, "nice")
    await bystander.connect()

    banned = await room.mod.request("user_ban", user="troll")
    assert banned["type"] == "ack" and banned["user"] == "troll"
    acked = time.monotonic()
    codes = await asyncio.gather(*(s.wait_closed(within=10) for s in sockets))
    took = time.monotonic() - acked
    print(f"ban: {len(sockets)} sockets on 2 nodes closed {took * 1000:.0f} ms after the ack")
    assert codes == [BANNED_CLOSE] * 3
    assert took < 5.0  # generous: the close follows the ban event, well under 1 s when idle
    assert (await bystander.request("chat", text="still here"))["type"] == "ack"

    # a new socket of the banned user: `banned` to its hello, then close 4503
    again = room.user(room.b, "troll")
    refusal = await again.connect()
    assert (refusal["type"], refusal["code"], refusal["for"]) == ("error", "banned", "hello")
    assert await again.wait_closed() == BANNED_CLOSE
    await caught_up(room.redis_url, room.name, *room.watchers)
    for w in room.watchers:
        ev = next(e for e in state(w).log if e["type"] == "user_banned")
        assert (ev["user"], ev["by"], ev["by_name"]) == ("troll", "mo", "Mo")

    assert (await room.host.request("user_unban", user="troll"))["type"] == "ack"
    back = room.user(room.a, "troll")
    await back.connect()
    assert (await back.request("chat", text="sorry"))["type"] == "ack"


async def test_banned_and_muted_bids_and_votes_are_refused_inside_the_functions(
        room: Room, redis_server: RedisServer) -> None:
    """The refusal is in the bid/vote Functions themselves, whatever called them."""
    r = redisconn.connect(redis_server.url)
    functions = RoomFunctions(r, 10_000)
    auctions = AuctionStore(functions, RateLimit(0, 1))
    polls = PollStore(functions, RateLimit(0, 1))
    who = Identity(Role.BIDDER, "mallory", "Mallory")
    assert (await room.host.request("user_ban", user="mallory"))["type"] == "ack"
    with pytest.raises(ProtocolError) as bid:
        await auctions.place_bid(room.name, who, PlaceBid(cid=1, lot=room.lot, amount=100))
    with pytest.raises(ProtocolError) as vote:
        await polls.vote(room.name, who, Vote(cid=2, poll=room.poll, option=0))
    assert (str(bid.value.code), str(vote.value.code)) == ("banned", "banned")
    assert (await room.host.request("user_unban", user="mallory"))["type"] == "ack"
    assert (await auctions.place_bid(room.name, who, PlaceBid(cid=3, lot=room.lot,
                                                             amount=100))).status == "winning"
    await r.aclose()


async def test_who_may_moderate_whom(room: Room) -> None:
    bidder, other = room.user(room.a, "bo"), room.user(room.b, "cy")
    mod2 = room.user(room.a, "mo2", Role.MODERATOR)
    for c in (bidder, other, mod2):
        await c.connect()
    said = await other.request("chat", text="hello")
    host_said = await room.host.request("chat", text="I am the host")
    mod_said = await mod2.request("chat", text="I moderate")

    async def code(c: RoomClient, kind: str, **fields: object) -> str:
        reply = await c.request(kind, **fields)
        return "ack" if reply["type"] == "ack" else str(reply["code"])

    # a bidder can't moderate at all
    for kind, fields in [("user_mute", {"user": "cy", "duration_ms": 5000}),
                         ("user_ban", {"user": "cy"}), ("user_unban", {"user": "cy"}),
                         ("chat_delete", {"message": said["message"]}),
                         ("blocked_words", {"words": ["x"]}), ("slow_mode", {"seconds": 5}),
                         ("moderator_grant", {"user": "bo"})]:
        assert await code(bidder, kind, **fields) == "forbidden", kind
    # a moderator can't ban or mute the host or another moderator, nor delete their messages
    for target in ("host", "mo2"):
        assert await code(room.mod, "user_ban", user=target) == "forbidden"
        assert await code(room.mod, "user_mute", user=target, duration_ms=5000) == "forbidden"
    assert await code(room.mod, "chat_delete", message=host_said["message"]) == "forbidden"
    assert await code(room.mod, "chat_delete", message=mod_said["message"]) == "forbidden"
    assert await code(room.mod, "moderator_grant", user="bo") == "forbidden"  # host only
    reply = await room.mod.request("user_ban", user="host")
    assert reply["message"] == "the host can't be muted, banned or made a moderator"
    # the host can act on a moderator; nobody can act on the host
    assert await code(room.host, "user_mute", user="mo2", duration_ms=5000) == "ack"
    assert await code(room.host, "user_ban", user="host") == "forbidden"
    assert await code(room.mod, "chat_delete", message=said["message"]) == "ack"

    # the host grants moderator live: the bidder may moderate at once, on any node
    assert await code(room.host, "moderator_grant", user="bo") == "ack"
    assert await code(bidder, "user_mute", user="cy", duration_ms=5000) == "ack"
    assert await code(room.mod, "user_ban", user="bo") == "forbidden"  # now a moderator
    assert await code(room.host, "moderator_revoke", user="bo") == "ack"
    assert await code(bidder, "user_unmute", user="cy") == "forbidden"
    # a moderator token revoked in this room is a plain user here
    assert await code(room.host, "moderator_revoke", user="mo") == "ack"
    assert await code(room.mod, "user_unmute", user="cy") == "forbidden"
    assert await code(room.host, "moderator_grant", user="mo") == "ack"
    assert await code(room.mod, "user_unmute", user="cy") == "ack"

    await caught_up(room.redis_url, room.name, *room.watchers)
    kinds = [(e["type"], e["user"] if "user" in e else e.get("message"), e["by"])
             for e in state(room.watchers[1]).log if e["type"] != "chat"]
    assert kinds == [
        ("user_muted", "mo2", "host"), ("chat_deleted", said["message"], "mo"),
        ("moderator_granted", "bo", "host"), ("user_muted", "cy", "bo"),
        ("moderator_revoked", "bo", "host"), ("moderator_revoked", "mo", "host"),
        ("moderator_granted", "mo", "host"), ("user_unmuted", "cy", "mo")]
    fresh = client(room.b.url, room.name)
    room.others.append(fresh)
    await fresh.connect()
    await fresh.wait_for(lambda s: s.snapshots == 1)
    assert state(fresh).moderation["moderators"] == {"mo", "mo2"}
    assert set(state(fresh).moderation["muted"]) == {"mo2"}
    assert said["message"] not in state(fresh).chat


async def test_anonymous_viewers_cannot_chat_or_moderate(room: Room) -> None:
    viewer = room.watchers[0]
    for kind, fields in [("chat", {"text": "hi"}), ("user_ban", {"user": "x"}),
                         ("question_mark", {"message": "M1"}),
                         ("question_upvote", {"question": "M1"})]:
        reply = await viewer.request(kind, **fields)
        assert (reply["type"], reply["code"], reply["for"]) == ("error", "forbidden", kind)


async def test_a_muted_or_banned_user_can_not_prebid_react_or_enter_a_giveaway(room: Room) -> None:
    eve = room.user(room.b, "eve2")
    await eve.connect()
    draft = (await room.host.request("lot_create", **LOT))["lot"]
    muted = await room.mod.request("user_mute", user="eve2", duration_ms=60_000)
    assert muted["type"] == "ack"
    await room.host.request("lot_close", lot=room.lot)  # giveaways run between lots
    giveaway = await room.host.request("giveaway_open", item="Tote bag")
    assert giveaway["type"] == "ack", giveaway
    replies = [await eve.request("prebid", lot=draft, max=500),
               await eve.request("react", reaction="heart"),
               await eve.request("giveaway_enter", giveaway=giveaway["giveaway"])]
    for reply in replies:
        assert (reply["type"], reply["code"], reply["until"]) == ("error", "muted",
                                                                   muted["until"]), reply
    assert (await room.host.request("user_unmute", user="eve2"))["type"] == "ack"
    assert (await eve.request("react", reaction="heart"))["type"] == "ack"
    assert (await eve.request("giveaway_enter", giveaway=giveaway["giveaway"]))["type"] == "ack"
