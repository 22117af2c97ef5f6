"""ClientSession: one viewer's room connection (WebSocket or HTTP fallback), from hello to close.

Explicit state machine; the transport (transport.py, httpstream.py) only moves frames."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from lotcast.auth import ANONYMOUS, AuthError, Identity, Role, TokenAuthority
from lotcast.config import Settings
from lotcast.interactive import protocol as p
from lotcast.interactive.ackwrite import AckWriteDelays
from lotcast.interactive.chat import SNAPSHOT_FIELDS, ChatStore
from lotcast.interactive.hub import RoomHub
from lotcast.interactive.outbox import Outbox
from lotcast.interactive.polls import PollStore
from lotcast.interactive.ratelimit import FloodGuard
from lotcast.interactive.roomlog import HistoryGone, RoomLog
from lotcast.interactive.show import ShowStores
from lotcast.interactive.store import AuctionStore
from lotcast.interactive.transport import Inbound, RoomTransport, TransportClosed

log = logging.getLogger(__name__)

REPLAY_CHUNK = 500


class SessionState(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    SYNCING = "syncing"  # attached to the hub; live batches are held until replay/snapshot is out
    LIVE = "live"
    CLOSING = "closing"
    CLOSED = "closed"


_TRANSITIONS = {
    SessionState.AWAITING_HELLO: {SessionState.SYNCING, SessionState.CLOSING},
    SessionState.SYNCING: {SessionState.LIVE, SessionState.CLOSING},
    SessionState.LIVE: {SessionState.CLOSING},
    SessionState.CLOSING: {SessionState.CLOSED},
    SessionState.CLOSED: set(),
}


@dataclass
class InteractiveStats:
    sockets: int = 0  # open sessions, every transport
    http_sessions: int = 0  # of which on the HTTP fallback transport
    http_sessions_opened: int = 0
    direct_writer_sockets: int = 0  # sockets that got the synchronous fan-out write path
    slow_disconnects: int = 0
    flood_disconnects: int = 0
    auth_failures: int = 0
    acks: int = 0
    errors: int = 0
    snapshots: int = 0
    replays: int = 0
    by_room: dict[str, int] = field(default_factory=dict)
    # Function reply -> the ack's (or error's) write on the socket, for every Function call
    ack_write: AckWriteDelays = field(default_factory=AckWriteDelays)


@dataclass
class SessionDeps:
    settings: Settings
    node_id: str
    authority: TokenAuthority
    auctions: AuctionStore
    polls: PollStore
    roomlog: RoomLog
    acquire_hub: Callable[[str], Awaitable[RoomHub]]
    release_hub: Callable[[str], Awaitable[None]]
    # writes this node's socket count of a room to Redis and returns the room's total over nodes
    count_viewers: Callable[[str], Awaitable[int]]
    stats: InteractiveStats
    # seconds from a bid's arrival to its ack (fed to the node's latency histogram)
    on_bid_ack: Callable[[float], None] = lambda seconds: None
    # seconds from a Function reply to its ack's or error's write (ackwrite.py; a histogram)
    on_ack_write: Callable[[float], None] = lambda seconds: None
    # reactions, giveaways, pre-bids, presence (issue 10); built from `auctions` when not given
    show: ShowStores | None = None
    # chat, moderation, Q&A; built on the auctions' Functions when not given
    chat: ChatStore | None = None

    def __post_init__(self) -> None:
        if self.show is None:
            self.show = ShowStores.build(self.auctions.functions, self.auctions.bid_limit,
                                         self.node_id)
        if self.chat is None:
            self.chat = ChatStore(self.auctions.functions)


class ClientSession:
    def __init__(self, transport: RoomTransport, room: str, deps: SessionDeps) -> None:
        self.transport = transport
        self.room = room
        self.deps = deps
        self.state = SessionState.AWAITING_HELLO
        self.identity: Identity = ANONYMOUS
        self.hub: RoomHub | None = None
        if transport.direct is not None:
            deps.stats.direct_writer_sockets += 1
        self.outbox = Outbox(transport.send, deps.settings.ws_outbox_bytes, transport.direct)
        # For the hub's native batch writer (wswrite.py), called for every socket of every
        # batch: our fd while LIVE and not closing with nothing queued here or in the transport,
        # else -1 (the frame then comes through `push`). The outbox's own method, no extra
        # frame: `_set_state` and `close_soon` keep `outbox.native_live` up to date.
        self.native_fd: Callable[[], int] = self.outbox.native_fd
        self.native_link = self.outbox.native_link  # the hub's ReadySet: told, not asked
        self.flood = FloodGuard(deps.settings.ws_msg_rate, deps.settings.ws_msg_burst)
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._close_code: p.CloseCode | None = None
        self._close_reason = ""
        self._closing = asyncio.Event()
        assert deps.show is not None
        self.show: ShowStores = deps.show
        assert deps.chat is not None
        self.chat: ChatStore = deps.chat
        self._present = False  # counted in RoomPresence (a signed-in user past hello)

    def _set_state(self, new: SessionState) -> None:
        if new is self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"session cannot go from {self.state.value} to {new.value}")
        log.debug("session %s: %s -> %s", self.room, self.state.value, new.value)
        self.state = new
        self.outbox.native_live = new is SessionState.LIVE and self._close_code is None

    @property
    def user_id(self) -> str:
        """"" for anonymous sockets (the hub closes a banned user's sockets by it)."""
        return self.identity.user_id

    # --- called by the hub (sync, never blocks) ----------------------------------------------

    def push(self, frame: bytes) -> None:
        if self.state is SessionState.SYNCING:
            if self.hub is not None and frame is self.hub.viewers_frame:
                return  # superseded: _hello ends with the current count if it changed
            self._held.append(frame)
            self._held_bytes += len(frame)
            if self._held_bytes > self.outbox.limit_bytes:
                self.close_soon(p.CloseCode.SLOW_CONSUMER, "outbox overflow")
        elif self.state is SessionState.LIVE and not self.outbox.push(frame):
            self.deps.stats.slow_disconnects += 1
            self.close_soon(p.CloseCode.SLOW_CONSUMER, "outbox overflow")

    def native_rest(self, wire: bytes, result: int) -> None:
        self.outbox.native_rest(wire, result)

    def close_soon(self, code: p.CloseCode, reason: str) -> None:
        self.outbox.native_live = False
        if self._close_code is None:
            self._close_code, self._close_reason = code, reason
        self._closing.set()

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def close_code(self) -> p.CloseCode | None:
        return self._close_code

    async def run(self) -> None:
        await self.transport.accept()
        self.deps.stats.sockets += 1
        self.outbox.start()
        receiver = asyncio.create_task(self._receive_loop(), name="ws-receive")
        closer = asyncio.create_task(self._closing.wait(), name="ws-close-wait")
        send_failed = asyncio.create_task(self.outbox.failed.wait(), name="ws-send-failed")
        try:
            await asyncio.wait({receiver, closer, send_failed},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiver, closer, send_failed):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._shutdown()

    async def _shutdown(self) -> None:
        if self.state is not SessionState.CLOSING:
            self._set_state(SessionState.CLOSING)
        if self.hub is not None:
            self.hub.detach(self)
            await self.deps.release_hub(self.room)
            self.hub = None
        if self._present:
            self._present = False
            await self.show.presence.leave(self.room, self.identity.user_id)
        code = self._close_code
        if code is not None and code is not p.CloseCode.SLOW_CONSUMER:
            await self.outbox.flush(within=1.0)  # let the error explaining the close go out
        await self.outbox.close()
        if code is not None:
            await self.transport.close(code, self._close_reason)
        self.deps.stats.sockets -= 1
        self._set_state(SessionState.CLOSED)

    async def _receive_loop(self) -> None:
        hello_deadline = asyncio.get_running_loop().time() + self.deps.settings.hello_timeout
        while True:
            try:
                if self.state is SessionState.AWAITING_HELLO:
                    remaining = hello_deadline - asyncio.get_running_loop().time()
                    inbound = await asyncio.wait_for(self.transport.receive(),
                                                     max(0.0, remaining))
                else:
                    inbound = await self.transport.receive()
            except TimeoutError:
                self.close_soon(p.CloseCode.HELLO_TIMEOUT, "no hello")
                return
            except TransportClosed:
                return
            if inbound.oversize is not None and inbound.fatal:
                self._refuse_oversize(inbound.oversize)
                return
            try:
                await self._handle(self._admit(inbound))
            except (RedisError, OSError) as exc:
                log.warning("room %s: storage failed during hello: %r", self.room, exc)
                self.close_soon(p.CloseCode.INTERNAL_ERROR, "storage unavailable")
                return
            except p.ProtocolError as err:
                self._send_error(err)
                if err.code is p.ErrorCode.AUTH_FAILED:
                    self.close_soon(p.CloseCode.AUTH_FAILED, "auth failed")
                    return
                if err.code is p.ErrorCode.BANNED and err.request == "hello":
                    self.close_soon(p.CloseCode.BANNED, "banned from this room")
                    return
                if err.code is p.ErrorCode.RATE_LIMITED and not self.flood.record_violation():
                    self.deps.stats.flood_disconnects += 1
                    self.close_soon(p.CloseCode.FLOOD, "flood")
                    return
            if self._closing.is_set():
                return

    def _admit(self, inbound: Inbound) -> p.ClientMessage:
        """Parse one frame and apply the per-connection flood guard (which counts every frame).

        The frame is parsed first so that a `rate_limited` refusal carries its cid and type."""
        msg: p.ClientMessage | None = None
        refused: p.ProtocolError | None = None
        frame = inbound.data
        if inbound.oversize is not None:
            refused = p.ProtocolError(
                p.ErrorCode.TOO_LARGE, f"message over {self._cap_text()} ({inbound.oversize}); "
                "refused unread")
        elif frame is None:
            refused = p.ProtocolError(p.ErrorCode.BAD_FRAME,
                                      "text frames are not accepted; send binary msgpack")
        else:
            try:
                msg = p.parse_client_frame(frame)
            except p.ProtocolError as err:
                refused = err
        if not self.flood.admit():
            cid, request = ((msg.cid, p.message_type(msg)) if msg is not None
                            else (refused.cid, refused.request) if refused is not None
                            else (None, None))
            raise p.ProtocolError(p.ErrorCode.RATE_LIMITED, "too many messages on this connection",
                                  cid=cid, request=request,
                                  retry_ms=self.flood.messages.retry_ms())
        if refused is not None:
            raise refused
        assert msg is not None
        return msg

    def _refuse_oversize(self, detail: str) -> None:
        """A message over the transport cap: the connection cannot go on reading (the rest of
        that message is unread). Every reply owed so far is already queued; this error follows
        them, then close 1009."""
        self._send_error(p.ProtocolError(
            p.ErrorCode.TOO_LARGE, f"message over {self._cap_text()} ({detail}); closing with 1009"))
        self.close_soon(p.CloseCode.MESSAGE_TOO_BIG, "message too big")

    def _cap_text(self) -> str:
        cap = self.transport.transport_cap
        return f"the {cap}-byte transport limit" if cap else "the transport limit"

    # --- messages ----------------------------------------------------------------------------

    def _send(self, frame: bytes, replied: float | None = None) -> None:
        """Queue `frame`; `replied`: the perf_counter() at which the Function reply this frame
        answers was decoded (its write delay is recorded)."""
        if replied is None:
            ok = self.outbox.push(frame)
        else:
            delays, observe, pushing = self.deps.stats.ack_write, self.deps.on_ack_write, True

            def written() -> None:
                seconds = time.perf_counter() - replied
                delays.observe(seconds, queued=not pushing)
                observe(seconds)

            ok = self.outbox.push(frame, written)
            pushing = False
        if not ok:
            self.deps.stats.slow_disconnects += 1
            self.close_soon(p.CloseCode.SLOW_CONSUMER, "outbox overflow")

    def _position(self) -> tuple[str, int]:
        return (self.hub.epoch, self.hub.offset) if self.hub is not None else ("", 0)

    def _send_error(self, err: p.ProtocolError, request: str | None = None,
                    replied: float | None = None) -> None:
        self.deps.stats.errors += 1
        epoch, offset = self._position()
        self._send(p.encode_error(err, epoch=epoch or None, offset=offset if epoch else None,
                                  request=request), replied)

    def _ack(self, msg: p.ClientMessage, **fields: Any) -> None:
        """The reply to a request whose Function call just returned (its write delay counts)."""
        replied = time.perf_counter()
        self.deps.stats.acks += 1
        epoch, offset = self._position()
        fields.setdefault("offset", offset)
        self._send(p.encode_ack(cid=msg.cid, request=p.message_type(msg), epoch=epoch, **fields),
                   replied)

    async def _handle(self, msg: p.ClientMessage) -> None:
        kind = p.message_type(msg)
        if isinstance(msg, p.Hello):
            if self.state is not SessionState.AWAITING_HELLO:
                raise p.ProtocolError(p.ErrorCode.DUPLICATE_HELLO, "hello was already sent",
                                      cid=msg.cid, request=kind)
            try:
                await self._hello(msg)
            except p.ProtocolError as err:
                err.cid, err.request = msg.cid, kind
                raise
            return
        if self.state is SessionState.AWAITING_HELLO:
            raise p.ProtocolError(p.ErrorCode.HELLO_REQUIRED,
                                  "the first message must be 'hello'", cid=msg.cid, request=kind)
        needed = (Role.HOST if type(msg) in p.HOST_ONLY
                  else Role.BIDDER if type(msg) in p.BIDDER_ONLY else None)
        try:
            if needed is not None and self.identity.role is not needed:
                raise p.ProtocolError(p.ErrorCode.FORBIDDEN,
                                      f"{kind!r} needs role {needed.value!r}; this connection "
                                      f"is {self.identity.role.value!r}")
            if type(msg) in p.SIGNED_IN_ONLY and self.identity.anonymous:
                raise p.ProtocolError(p.ErrorCode.FORBIDDEN,
                                      f"{kind!r} needs a signed-in user (a token)")
            if type(msg) in p.CHAT_SIGNED_IN and self.identity.anonymous:
                raise p.ProtocolError(p.ErrorCode.FORBIDDEN,
                                      f"{kind!r} needs a signed-in user (bidder, moderator or "
                                      "host); this connection is anonymous")
            await self._dispatch(msg)
        except p.ProtocolError as err:
            err.cid = msg.cid
            self._send_error(err, kind, time.perf_counter())
        except RedisError as exc:
            log.warning("redis error handling %s: %r", kind, exc)
            self._send_error(p.ProtocolError(p.ErrorCode.UNAVAILABLE,
                                             f"storage unavailable: {exc}", cid=msg.cid), kind)
        except Exception:
            log.exception("internal error handling %s", kind)
            self._send_error(p.ProtocolError(p.ErrorCode.INTERNAL, "internal error",
                                             cid=msg.cid), kind)

    async def _dispatch(self, msg: p.ClientMessage) -> None:
        room, d = self.room, self.deps
        if isinstance(msg, p.Ping):
            head = await d.roomlog.head(room)
            epoch, offset = self._position()
            self._send(p.encode_pong(cid=msg.cid, ts=msg.ts, server_ts=head.server_ts,
                                     epoch=epoch, offset=offset))
        elif isinstance(msg, p.PlaceBid):
            started = time.perf_counter()
            out = await d.auctions.place_bid(room, self.identity, msg)
            self._ack(msg, lot=out.lot, status=out.status, price=out.price, leader=out.leader,
                      next_min=out.next_min, offset=out.offset, duplicate=out.duplicate)
            d.on_bid_ack(time.perf_counter() - started)
        elif isinstance(msg, p.Vote):
            result = await d.polls.vote(room, self.identity, msg)
            self._ack(msg, poll=result["poll"], option=result["option"])
        elif isinstance(msg, p.CreateLot):
            result = await self.show.lots.create_lot(room, msg)  # with sudden_death
            self._ack(msg, lot=result["lot"], offset=result["offset"])
        elif isinstance(msg, p.OpenLot | p.ExtendLot):
            result = await (d.auctions.open_lot(room, msg) if isinstance(msg, p.OpenLot)
                            else d.auctions.extend_lot(room, msg))
            self._ack(msg, lot=result["lot"], ends_at=result["ends_at"], offset=result["offset"],
                      # lot_open: pre-bids applied and skipped (docs/protocol.md, Pre-bids)
                      prebids=result.get("prebids"), prebids_skipped=result.get("prebids_skipped"))
        elif isinstance(msg, p.CloseLot):
            result = await d.auctions.close_lot(room, msg)
            self._ack(msg, lot=result["lot"], status=result["status"], offset=result["offset"])
        elif isinstance(msg, p.OpenPoll):
            result = await d.polls.open_poll(room, msg)
            self._ack(msg, poll=result["poll"], ends_at=result["ends_at"], offset=result["offset"])
        elif isinstance(msg, p.ClosePoll):
            result = await d.polls.close_poll(room, msg)
            self._ack(msg, poll=result["poll"], offset=result["offset"])
        elif isinstance(msg, p.SHOW_MESSAGES):
            await self._dispatch_show(msg)
        elif isinstance(msg, p.ChatRequest):  # chat, moderation, Q&A
            self._ack(msg, **await self.chat.handle(room, self.identity, msg))

    # --- reactions, giveaways, pre-bids, re-run (issue 10) -----------------------------------

    async def _dispatch_show(self, msg: p.SHOW_MESSAGES) -> None:
        room, show, who = self.room, self.show, self.identity
        if isinstance(msg, p.React):
            result = await show.reactions.react(room, who, msg)
            self._ack(msg, reaction=msg.reaction, count=result["count"])
        elif isinstance(msg, p.PreBid):
            result = await show.lots.prebid(room, who, msg)
            self._ack(msg, lot=result["lot"], max=result["max"], prebids=result["prebids"],
                      duplicate=result["duplicate"], offset=result["offset"])
        elif isinstance(msg, p.RerunLot):
            result = await show.lots.rerun(room, msg)
            self._ack(msg, lot=result["lot"], rerun_of=result["rerun_of"],
                      status=result["status"], ends_at=result.get("ends_at"),
                      offset=result["offset"])
        elif isinstance(msg, p.OpenGiveaway):
            result = await show.giveaways.open(room, msg)
            self._ack(msg, giveaway=result["giveaway"], commitment=result["commitment"],
                      offset=result["offset"])
        elif isinstance(msg, p.EnterGiveaway):
            result = await show.giveaways.enter(room, who, msg)
            self._ack(msg, giveaway=result["giveaway"], entrants=result["entrants"])
        elif isinstance(msg, p.DrawGiveaway):
            result = await show.giveaways.draw(room, msg)
            self._ack(msg, **{k: result[k] for k in ("giveaway", "winner", "winner_name",
                                                     "entrants", "eligible", "index", "offset")})
        elif isinstance(msg, p.CancelGiveaway):
            result = await show.giveaways.cancel(room, msg)
            self._ack(msg, giveaway=result["giveaway"], offset=result["offset"])
        elif isinstance(msg, p.GiveawayProof):
            self._ack(msg, **await show.giveaways.proof(room, msg))

    # --- end issue 10 --------------------------------------------------------------------------

    async def _hello(self, msg: p.Hello) -> None:
        token = msg.token or self.transport.token_param
        if token:
            try:
                self.identity = self.deps.authority.verify(token)
            except AuthError as exc:
                self.deps.stats.auth_failures += 1
                raise p.ProtocolError(p.ErrorCode.AUTH_FAILED, exc.reason, cid=msg.cid,
                                      field="token") from exc
        self.hub = await self.deps.acquire_hub(self.room)
        self._set_state(SessionState.SYNCING)
        self.hub.attach(self)
        if not self.identity.anonymous:
            # chat, moderation: after attach, so a ban from now on reaches us through the hub
            await self.chat.join(self.room, self.identity)
        if self.identity.user_id:  # issue 10: giveaway entrants must be connected at the draw
            await self.show.presence.join(self.room, self.identity.user_id)
            self._present = True
        # Count this socket in Redis now, not at the next heartbeat, so the snapshot (ours, and
        # every other node's from now on) includes it. Any `viewers` change is held until LIVE.
        self.hub.set_viewers(await self.deps.count_viewers(self.room))
        head = await self.deps.roomlog.head(self.room)
        s = self.deps.settings
        limits = {"bids_per_s": s.bid_rate, "bid_burst": s.bid_burst, "votes_per_s": s.vote_rate,
                  "vote_burst": s.vote_burst, "msgs_per_s": s.ws_msg_rate,
                  "msg_burst": s.ws_msg_burst,
                  "reactions_per_s": self.show.reactions.limit.per_second,
                  "reaction_burst": self.show.reactions.limit.burst,
                  "chat_per_s": self.chat.chat_limit.per_second,
                  "chat_burst": self.chat.chat_limit.burst}
        who = self.identity
        self._send(p.encode_welcome(
            cid=msg.cid, room=self.room, role=who.role.value, user=who.user_id or None,
            name=who.display_name or None, node=self.deps.node_id, epoch=head.epoch,
            offset=head.offset, server_ts=head.server_ts, limits=limits))
        resumed = (msg.epoch == head.epoch and msg.offset is not None
                   and 0 <= head.offset - msg.offset <= s.room_history
                   and await self._replay(msg.offset, head.epoch))
        # The count our own join changed was not sent to us: a snapshot carries it, a resume
        # gets one `viewers` frame.
        reported = self.hub.viewers
        if not resumed:
            await self._snapshot(reported)
        else:
            self._send(p.encode_viewers(epoch=head.epoch, offset=self.hub.offset, count=reported))
        self._set_state(SessionState.LIVE)
        held, self._held, self._held_bytes = self._held, [], 0
        for frame in held:
            self._send(frame)
        if self.hub.viewers != reported:  # changed meanwhile (its frame was not held)
            self._send(p.encode_viewers(epoch=self.hub.epoch, offset=self.hub.offset,
                                        count=self.hub.viewers))

    async def _replay(self, after: int, epoch: str) -> bool:
        """Send every event after `after` (live batches may overlap; clients skip old offsets)."""
        try:
            while True:
                events = await self.deps.roomlog.read_after(self.room, after, None, REPLAY_CHUNK)
                if not events:
                    break
                raw_events = await self.chat.redact(self.room, events)  # deleted chat messages
                self._send(p.encode_events(epoch=epoch, offset=events[-1][0],
                                           raw_events=raw_events, count=len(events),
                                           replay=True))
                after = events[-1][0]
                if len(events) < REPLAY_CHUNK:
                    break
                await self.outbox.flush(within=5.0)  # a long replay must not trip the outbox limit
        except HistoryGone:
            return False
        for tally in await self.deps.roomlog.open_tallies(self.room):
            self._send(p.encode_tally(epoch=epoch, offset=after, poll=tally["poll"],
                                      counts=tally["counts"]))
        shown = await self.show.giveaways.room_state(self.room, self.identity)  # issue 10
        if any(shown["reactions"].values()):  # all zero: the client has zeros too (same epoch)
            self._send(p.encode_reactions(epoch=epoch, offset=after, counts=shown["reactions"]))
        votes = await self.chat.question_votes(self.room)  # chat, moderation, Q&A
        if votes:
            self._send(p.encode_question_votes(epoch=epoch, offset=after, votes=votes))
        self.deps.stats.replays += 1
        return True

    async def _snapshot(self, viewers: int) -> None:
        # roomlog's snapshot plus chat, Q&A and moderation state, in one Function call
        snap = await self.chat.snapshot(self.room)
        # issue 10: read after the snapshot, so at least as new as its offset (giveaway events
        # set absolute state and reaction counts only grow: later events re-applied are harmless)
        shown = await self.show.giveaways.room_state(self.room, self.identity)
        self.deps.stats.snapshots += 1
        self._send(p.encode_snapshot(
            epoch=snap["epoch"], offset=snap["offset"], lots=snap["lots"], polls=snap["polls"],
            viewers=viewers,
            server_ts=snap["server_ts"],
            reactions={name: int(shown["reactions"].get(name, 0)) for name in p.REACTIONS},
            giveaway=shown.get("giveaway"), **{k: snap[k] for k in SNAPSHOT_FIELDS}))
