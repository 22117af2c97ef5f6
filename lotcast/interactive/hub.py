"""RoomHub: one room's fan-out on this node (its pub/sub connection: lotcast/interactive/subscriptions.py).

Delivery guarantee: Redis pub/sub is at-most-once, so the hub uses it only as a doorbell with the
event attached. Offsets are contiguous per room; a hub that sees a gap (or reconnects) reads the
missing events from the room log (Redis Stream) before delivering anything newer. Each batch is
encoded once and the same bytes go to every socket of the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack  # type: ignore[import-untyped]

from lotcast import keys
from lotcast.interactive import protocol as wire
from lotcast.interactive import wswrite
from lotcast.interactive.ackwrite import Delays
from lotcast.interactive.protocol import (
    CloseCode,
    encode_events,
    encode_question_votes,
    encode_tally,
    encode_viewers,
)
from lotcast.interactive.roomlog import HistoryGone, RoomLog
from lotcast.interactive.subscriptions import CATCH_UP, RETRY_AFTER

log = logging.getLogger(__name__)

# A fan-out turn (one event-loop callback) serves at most FANOUT_CHUNK sockets and ends once it
# has run FANOUT_TURN seconds (checked every FANOUT_SLICE sockets, one native call each), so an
# ack or error whose Redis reply arrives meanwhile waits for at most about one turn.
FANOUT_CHUNK = 1024
FANOUT_SLICE = 128
FANOUT_TURN = 0.002
# Under load the batch interval stretches (the next batch waits until the previous one is
# written to every socket) from flush_interval to at most BATCH_STRETCH_MAX: then the remaining
# fan-out is finished in one turn and the merged batch goes out. Never more than one batch per
# socket is waiting in the hub. docs/protocol.md and docs/benchmarks.md state it.
BATCH_STRETCH_MAX = 0.5
# Past BATCH_STRETCH_MAX the fan-out is drained in longer turns (no socket budget) that still end
# after this long, so acks and Redis replies wait for at most one such turn, never the whole
# drain (one 10k-socket turn took ~0.6 s on this machine).
FANOUT_DRAIN_TURN = 0.02


class Subscriber(Protocol):
    def push(self, frame: bytes) -> None: ...

    # Optional (the hub checks once per attach): the native batch writer's hooks, see
    # wswrite.BatchSubscriber (asked per batch; ClientSession has them) and
    # wswrite.LinkedSubscriber (tells the hub; preferred). Without them a socket gets every
    # frame by push.
    # def native_fd(self) -> int: ...
    # def native_link(self, ready: Callable[[bool], None]) -> tuple[int, Any] | None: ...
    # def native_rest(self, wire: bytes, result: int) -> None: ...

    def close_soon(self, code: CloseCode, reason: str) -> None: ...

    @property
    def user_id(self) -> str: ...  # "" for anonymous sockets


@dataclass
class HubStats:
    batches: int = 0
    events: int = 0
    gap_fills: int = 0
    tallies: int = 0
    reactions: int = 0  # `reactions` frames broadcast (issue 10)
    question_votes: int = 0
    bans: int = 0  # sockets closed because their user was banned
    native_writes: int = 0  # frames written to a socket by the native batch writer
    short_writes: int = 0  # of which the kernel took only part (the rest went to the transport)
    # Thread CPU of the native path (time.thread_time, so a descheduled loop does not count):
    # deciding per socket whether it may take the raw write, and the native send calls.
    native_probed: int = 0  # sockets checked for the native path
    probe_cpu_ms: float = 0.0
    send_cpu_ms: float = 0.0
    fanout_turns: int = 0
    fanout_turn_max_ms: float = 0.0  # the longest turn: what an ack could wait behind
    stretch_drains: int = 0  # batches the BATCH_STRETCH_MAX bound forced out
    batch_gap_max_ms: float = 0.0  # the longest time between two event batches while pending
    # how late the batch timer fired: the node's event-loop lag (what an ack's Redis reply also
    # waits for before its task runs), sampled whenever events are pending
    flush_late: Delays = field(default_factory=Delays)


@dataclass
class _Job:
    """One frame to write to the sockets in `slots` of the hub's ReadySet (told), then to
    `subs`: the first `native` of them asked (`probes` are their `native_fd` methods), the rest
    by push. `pos` counts across both."""

    frame: bytes
    slots: array[int]
    subs: list[Subscriber]
    probes: list[Callable[[], int]]
    native: int
    pos: int = 0


class RoomHub:
    def __init__(self, room: str, roomlog: RoomLog, flush_interval: float,
                 tally_interval: float) -> None:
        self.room = room
        self.roomlog = roomlog
        self.flush_interval = flush_interval
        self.tally_interval = tally_interval
        self.epoch = ""
        self.offset = 0
        self.viewers = 0
        self.viewers_frame: bytes | None = None  # the last `viewers` frame broadcast
        self.stats = HubStats()
        self.sockets: set[Subscriber] = set()
        # The fan-out's two lists, kept up to date on attach/detach so that a batch copies them
        # (C speed) instead of sorting sockets per batch: those with the native writer's hooks,
        # each with its bound `native_fd` (looked up once), and the others, in joining order.
        self._native_subs: dict[Subscriber, Callable[[], int]] = {}
        self._plain_subs: dict[Subscriber, None] = {}
        self._native_on = wswrite.enabled()
        # sockets that tell the hub when they may take raw writes (wswrite.LinkedSubscriber)
        self._ready = wswrite.ReadySet()
        self._ready_on = self._native_on and wswrite.ready_set_enabled()
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._last_payload: bytes | None = None  # the event at self.offset (_log_rewound)
        self._pending: list[bytes] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_due = 0.0
        self._last_flush = 0.0
        self._tallies: dict[str, list[int]] = {}
        self._tally_handles: dict[str, asyncio.TimerHandle] = {}
        self._tally_last: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._fanout_jobs: deque[_Job] = deque()
        self._stretch_handle: asyncio.TimerHandle | None = None
        self._draining = False  # past BATCH_STRETCH_MAX: longer fan-out turns until caught up
        self._flush_after_fanout = False
        self._tallies_after_fanout: set[str] = set()
        self._fanout_handle: asyncio.Handle | None = None
        # issue 10: the room's cumulative reaction counts, coalesced like poll tallies
        self._reactions: dict[str, int] = {}
        self._reactions_total = -1  # the largest total seen (counts only grow)
        self._reactions_handle: asyncio.TimerHandle | None = None
        self._reactions_last = 0.0
        self._reactions_after_fanout = False
        # the `viewers` count, coalesced like tallies (set_viewers)
        self._viewers_handle: asyncio.TimerHandle | None = None
        self._viewers_last = 0.0
        self._viewers_sent = 0
        self._viewers_after_fanout = False
        # chat, moderation, Q&A: upvote counts coalesced room-wide, like poll tallies
        self._qvotes: dict[str, int] = {}
        self._qvotes_dirty: set[str] = set()
        self._qvotes_handle: asyncio.TimerHandle | None = None
        self._qvotes_last = 0.0
        self._qvotes_after_fanout = False

    async def start(self) -> None:
        """Call after subscribing: messages queued meanwhile at or below the head are dropped."""
        head = await self.roomlog.head(self.room)
        self.epoch, self.offset = head.epoch, head.offset
        self._task = asyncio.create_task(self._run(), name=f"hub-{self.room}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for handle in [self._flush_handle, self._fanout_handle, self._qvotes_handle,
                       self._stretch_handle, self._viewers_handle, *self._tally_handles.values()]:
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._fanout_handle = self._qvotes_handle = None
        self._viewers_handle = None
        self._viewers_after_fanout = False
        self._stretch_handle = None
        self._fanout_jobs.clear()
        self._tally_handles.clear()
        self._tallies_after_fanout.clear()
        self._flush_after_fanout = False
        if self._reactions_handle is not None:  # issue 10
            self._reactions_handle.cancel()
            self._reactions_handle = None
        self._reactions_after_fanout = False

    def feed(self, data: bytes) -> None:
        """A pub/sub message for this room (`<epoch>|<msgpack>`), or CATCH_UP."""
        self._inbox.put_nowait(data)

    def attach(self, sub: Subscriber) -> None:
        if sub in self.sockets:
            return
        self.sockets.add(sub)
        if self._native_on and hasattr(sub, "native_rest"):
            if self._ready_on and hasattr(sub, "native_link"):
                if not self._fanout_jobs:
                    self._ready.recycle()
                if not self._ready.add(sub):  # type: ignore[arg-type]
                    self._plain_subs[sub] = None  # never takes raw writes
                return
            probe = getattr(sub, "native_fd", None)
            if probe is not None:
                self._native_subs[sub] = probe
                return
        self._plain_subs[sub] = None

    def detach(self, sub: Subscriber) -> None:
        self.sockets.discard(sub)
        self._ready.remove(sub)  # type: ignore[arg-type]
        self._native_subs.pop(sub, None)
        self._plain_subs.pop(sub, None)

    def set_viewers(self, count: int) -> None:
        """The room's viewer count changed. Sockets get the newest count at most once per tally
        interval, after any fan-out in progress: a ramp of N joins is a few frames per socket,
        not N (a frame per join to every socket is N²/2 writes, minutes of CPU at 10k)."""
        if count == self.viewers:
            return
        self.viewers = count
        if self._viewers_handle is None:
            loop = asyncio.get_running_loop()
            due = self._viewers_last + self.tally_interval
            self._viewers_handle = loop.call_later(max(0.0, due - loop.time()),
                                                   self._flush_viewers)

    def _flush_viewers(self) -> None:
        self._viewers_handle = None
        if self._fanout_jobs:
            self._viewers_after_fanout = True  # sent, newest count, once the queue drains
            return
        if self.viewers == self._viewers_sent:
            return
        self._viewers_last = asyncio.get_running_loop().time()
        self._viewers_sent = self.viewers
        self.viewers_frame = encode_viewers(epoch=self.epoch, offset=self.offset,
                                            count=self.viewers)
        self._broadcast(self.viewers_frame)

    async def _run(self) -> None:
        while True:
            data = await self._inbox.get()
            try:
                await self._handle(data)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Usually Redis was unreachable while filling a gap: try again from the log.
                log.exception("room %s: failed to handle a pub/sub message", self.room)
                asyncio.get_running_loop().call_later(RETRY_AFTER, self.feed, CATCH_UP)

    async def _handle(self, data: bytes) -> None:
        if data == CATCH_UP:
            if await self._log_rewound():
                return
            await self._fill(None)
            return
        epoch_raw, _, payload = data.partition(b"|")
        epoch = epoch_raw.decode()
        if epoch != self.epoch:
            self._reset(epoch)
        event = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        if event.get("type") == "tally":
            self._on_tally(str(event["poll"]), list(event["counts"]))
            return
        if event.get("type") == "reactions":  # issue 10
            self._on_reactions(event["counts"])
            return
        if event.get("type") == "question_votes":
            self._on_question_votes(str(event["question"]), int(event["votes"]))
            return
        offset = int(event["offset"])
        if offset <= self.offset:
            return
        if offset > self.offset + 1:
            await self._fill(offset - 1)
        self._append(offset, payload)

    async def _log_rewound(self) -> bool:
        """After a reconnect: is the newest event we delivered still in the log, unchanged?
        A Redis Cluster failover may lose the last writes its replica did not get (acks wait
        for a replica; watchers' events do not), and the new primary then reuses their
        offsets. If so the room gets a new epoch (once, whichever node sees it first) and
        every socket resyncs from a snapshot."""
        if self.offset == 0 or self._last_payload is None:
            return False
        entries: Any = await self.roomlog.redis.xrange(
            keys.room_log(self.room), min=f"0-{self.offset}", max=f"0-{self.offset}")
        if entries and entries[0][1].get(b"e") == self._last_payload:
            return False
        seq = int(await self.roomlog.redis.get(keys.room_seq(self.room)) or 0)
        if not entries and seq >= self.offset:
            return False  # trimmed away (a long outage): _fill's HistoryGone handles it
        log.warning("room %s: log lost events up to %d (now at %d): new epoch", self.room,
                    self.offset, seq)
        raw = await self.roomlog.functions.call("rotate_epoch", self.room, self.epoch)
        self._reset(raw.decode() if isinstance(raw, bytes) else str(raw))
        head = await self.roomlog.head(self.room)
        self.epoch, self.offset = head.epoch, head.offset
        return True

    def _reset(self, epoch: str) -> None:
        """The room log was replaced (Redis lost data): every socket must resync."""
        log.warning("room %s: epoch %s -> %s; resyncing %d sockets", self.room, self.epoch, epoch,
                    len(self.sockets))
        self.epoch, self.offset = epoch, 0
        self._last_payload = None
        self._pending.clear()
        self._reactions, self._reactions_total = {}, -1  # issue 10: counts restart with the log
        self._drop_all(CloseCode.RESYNC, "room log epoch changed")

    def _drop_all(self, code: CloseCode, reason: str) -> None:
        for sub in list(self.sockets):
            sub.close_soon(code, reason)
        self.sockets.clear()
        self._ready.clear()
        self._native_subs.clear()
        self._plain_subs.clear()

    async def _fill(self, upto: int | None) -> None:
        self.stats.gap_fills += 1
        while True:
            try:
                events = await self.roomlog.read_after(self.room, self.offset, upto)
            except HistoryGone as exc:
                log.warning("room %s: %s; resyncing sockets", self.room, exc)
                self._drop_all(CloseCode.RESYNC, "node fell behind the room log")
                head = await self.roomlog.head(self.room)
                self.offset = head.offset if upto is None else upto
                self._last_payload = None
                return
            for offset, payload in events:
                self._append(offset, payload)
            if not events or (upto is not None and self.offset >= upto):
                return

    def _append(self, offset: int, payload: bytes) -> None:
        if b"user_banned" in payload:  # cheap pre-check; decode only candidates
            event = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            if event.get("type") == "user_banned":
                self._close_user(str(event["user"]))
        self._pending.append(payload)
        self.offset = offset
        self._last_payload = payload
        self.stats.events += 1
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_flush + self.flush_interval - loop.time())
            self._flush_due = loop.time() + delay
            self._flush_handle = loop.call_later(delay, self._flush_timer)

    def _flush_timer(self) -> None:
        self.stats.flush_late.add(max(0.0, asyncio.get_running_loop().time() - self._flush_due))
        self._flush()

    def _flush(self) -> None:
        if self._flush_handle is not None:
            # called directly (after a fan-out, before a tally): a timer left pending would fire
            # right after this batch, above the batch rate (tests/test_hub_batch_rate.py)
            self._flush_handle.cancel()
        self._flush_handle = None
        loop = asyncio.get_running_loop()
        if self._fanout_jobs:
            # Still writing the previous batch: keep collecting and send one merged batch when
            # it is out, so an overloaded node sends fewer, larger frames instead of queueing;
            # but no later than BATCH_STRETCH_MAX after the previous batch.
            self._flush_after_fanout = True
            if self._stretch_handle is None:
                self._stretch_handle = loop.call_at(self._last_flush + BATCH_STRETCH_MAX,
                                                    self._stretch_limit)
            return
        now = loop.time()
        if self._pending and self.stats.batches:
            gap_ms = (now - self._last_flush) * 1000
            if gap_ms > self.stats.batch_gap_max_ms:
                self.stats.batch_gap_max_ms = gap_ms
        self._last_flush = now
        if not self._pending:
            return
        frame = encode_events(epoch=self.epoch, offset=self.offset, raw_events=self._pending,
                              count=len(self._pending))
        self._pending = []
        self.stats.batches += 1
        self._broadcast(frame)

    def _on_tally(self, poll: str, counts: list[int]) -> None:
        old = self._tallies.get(poll)
        if old is not None and sum(old) >= sum(counts):
            return  # counts only grow; an older publish arrived late
        self._tallies[poll] = counts
        if poll not in self._tally_handles:
            loop = asyncio.get_running_loop()
            due = self._tally_last.get(poll, 0.0) + self.tally_interval
            self._tally_handles[poll] = loop.call_later(max(0.0, due - loop.time()),
                                                        self._flush_tally, poll)

    def _flush_tally(self, poll: str) -> None:
        self._tally_handles.pop(poll, None)
        if self._fanout_jobs:
            self._tallies_after_fanout.add(poll)  # sent, newest counts, once the queue drains
            return
        self._tally_last[poll] = asyncio.get_running_loop().time()
        if self._pending:
            self._flush()  # the poll_opened event must reach clients before its first tally
        self.stats.tallies += 1
        self._broadcast(encode_tally(epoch=self.epoch, offset=self.offset, poll=poll,
                                     counts=self._tallies[poll]))

    # --- chat, moderation, Q&A ---

    def _close_user(self, user: str) -> None:
        """A ban: close every socket of `user` here (every node does the same on the event)."""
        for sub in [s for s in self.sockets if s.user_id == user]:
            self.detach(sub)
            sub.close_soon(CloseCode.BANNED, "banned from this room")
            self.stats.bans += 1

    def _on_question_votes(self, question: str, votes: int) -> None:
        if votes <= self._qvotes.get(question, 0):
            return  # counts only grow; an older publish arrived late
        self._qvotes[question] = votes
        self._qvotes_dirty.add(question)
        if self._qvotes_handle is None:
            loop = asyncio.get_running_loop()
            due = self._qvotes_last + self.tally_interval
            self._qvotes_handle = loop.call_later(max(0.0, due - loop.time()),
                                                  self._flush_question_votes)

    def _flush_question_votes(self) -> None:
        self._qvotes_handle = None
        if self._fanout_jobs:
            self._qvotes_after_fanout = True
            return
        self._qvotes_last = asyncio.get_running_loop().time()
        if self._pending:
            self._flush()  # the `question` event must reach clients before its votes
        votes = {q: self._qvotes[q] for q in sorted(self._qvotes_dirty)}
        self._qvotes_dirty.clear()
        if votes:
            self.stats.question_votes += 1
            self._broadcast(encode_question_votes(epoch=self.epoch, offset=self.offset,
                                                  votes=votes))

    # --- end chat, moderation, Q&A ---

    # --- reactions (issue 10) ---

    def _on_reactions(self, counts: dict[str, int]) -> None:
        total = sum(int(v) for v in counts.values())
        if total <= max(self._reactions_total, sum(self._reactions.values())):
            return  # counts only grow; an older publish arrived late
        self._reactions = {str(k): int(v) for k, v in counts.items()}
        self._reactions_total = total
        if self._reactions_handle is None:
            loop = asyncio.get_running_loop()
            due = self._reactions_last + self.tally_interval
            self._reactions_handle = loop.call_later(max(0.0, due - loop.time()),
                                                     self._flush_reactions)

    def _flush_reactions(self) -> None:
        self._reactions_handle = None
        if self._fanout_jobs:
            self._reactions_after_fanout = True  # sent, newest counts, once the queue drains
            return
        self._reactions_last = asyncio.get_running_loop().time()
        self.stats.reactions += 1
        self._broadcast(wire.encode_reactions(epoch=self.epoch, offset=self.offset,
                                              counts=self._reactions))

    # --- end reactions ---

    def _broadcast(self, frame: bytes) -> None:
        """Hand `frame` to every socket, one bounded turn at a time (see FANOUT_TURN).

        Short turns keep the loop responsive (acks are not stuck behind a 10k-socket fan-out);
        one FIFO of jobs keeps every socket's frames in order. Sockets with the native hooks
        come first in a job and are written FANOUT_SLICE per native call (wswrite.py).
        """
        natives = list(self._native_subs)
        self._fanout_jobs.append(_Job(frame, self._ready.slots(), natives + list(self._plain_subs),
                                      list(self._native_subs.values()), len(natives)))
        if self._fanout_handle is None:
            self._fanout_step()

    def _stretch_limit(self) -> None:
        """BATCH_STRETCH_MAX reached with a batch still pending: finish the fan-out now."""
        self._stretch_handle = None
        if not self._fanout_jobs:
            return
        if self._fanout_handle is not None:
            self._fanout_handle.cancel()
        self.stats.stretch_drains += 1
        self._draining = True
        self._fanout_step()

    def _fanout_step(self) -> None:
        self._fanout_handle = None
        stats = self.stats
        started = time.perf_counter()
        drain = self._draining
        turn = FANOUT_DRAIN_TURN if drain else FANOUT_TURN
        budget = FANOUT_CHUNK
        while self._fanout_jobs and (drain or budget > 0):
            job = self._fanout_jobs[0]
            told = len(job.slots)
            total = told + len(job.subs)
            end = min(job.pos + (FANOUT_SLICE if drain else min(FANOUT_SLICE, budget)), total)
            if job.pos < told + job.native:
                if job.pos < told:
                    end = min(end, told)
                    written, short, probe_s, send_s = wswrite.deliver_slots(
                        job.frame, job.slots[job.pos:end], self._ready)
                else:
                    end = min(end, told + job.native)
                    first, last = job.pos - told, end - told
                    written, short, probe_s, send_s = wswrite.deliver_native(
                        job.frame, job.subs[first:last],  # type: ignore[arg-type]
                        job.probes[first:last])
                stats.native_writes += written
                stats.short_writes += short
                stats.native_probed += end - job.pos
                stats.probe_cpu_ms += probe_s * 1000
                stats.send_cpu_ms += send_s * 1000
            else:
                for sub in job.subs[job.pos - told:end - told]:
                    sub.push(job.frame)
            budget -= end - job.pos
            job.pos = end
            if job.pos >= total:
                self._fanout_jobs.popleft()
            if time.perf_counter() - started >= turn:
                break
        turn_ms = (time.perf_counter() - started) * 1000
        stats.fanout_turns += 1
        if turn_ms > stats.fanout_turn_max_ms:
            stats.fanout_turn_max_ms = turn_ms
        if self._fanout_jobs:
            # call_later(0), not call_soon: I/O callbacks (a Redis reply, then the ack's task)
            # that became ready meanwhile run before the next turn.
            self._fanout_handle = asyncio.get_running_loop().call_later(0, self._fanout_step)
            return
        self._draining = False
        self._ready.recycle()
        if self._stretch_handle is not None:
            self._stretch_handle.cancel()
            self._stretch_handle = None
        if self._flush_after_fanout:
            self._flush_after_fanout = False
            self._flush()
        if self._viewers_after_fanout and not self._fanout_jobs:
            self._viewers_after_fanout = False
            self._flush_viewers()
        if self._reactions_after_fanout and not self._fanout_jobs:  # issue 10
            self._reactions_after_fanout = False
            self._flush_reactions()
        if self._qvotes_after_fanout and not self._fanout_jobs:
            self._qvotes_after_fanout = False
            self._flush_question_votes()
        for poll in list(self._tallies_after_fanout):
            self._tallies_after_fanout.discard(poll)
            if not self._fanout_jobs:
                self._flush_tally(poll)
            else:
                self._tallies_after_fanout.add(poll)
