"""Every message of the interactive WebSocket protocol (see docs/protocol.md), sans-IO.

Client frames: one binary WebSocket frame holds exactly one msgpack map.
Server frames: one binary frame holds one or more msgpack maps back to back (batched sends).
HTTP fallback transport: the same frames, as length-prefixed records of one response stream
(server -> client) and one POST body per client message (docs/protocol.md, "HTTP fallback").
"""

from __future__ import annotations

import enum
import math
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]

from lotcast.interactive import chatnorm

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 8 * 1024
MAX_AMOUNT = 10**12  # minor units; keeps every amount exact in Lua doubles and JS numbers
MAX_DURATION_MS = 24 * 3600 * 1000
MAX_EXTEND_MS = 3600 * 1000
MAX_INCREMENT_ROWS = 20
MAX_TOKEN_CHARS = 4096
TRANSPORT_CAP_BYTES = 64 * 1024  # the most a transport reads of one client message

# HTTP fallback: each record of the stream is a 4-byte big-endian payload length, then the payload
RECORD_HEADER_BYTES = 4
KEEPALIVE_RECORD = bytes(RECORD_HEADER_BYTES)  # length 0: nothing but "still here"
STREAM_CONTENT_TYPE = "application/vnd.lotcast.room-stream"
SESSION_HEADER = "Lotcast-Session"


class CloseCode(enum.IntEnum):
    """4000-4499: reconnect allowed (with backoff). 4500-4999: terminal, do not retry as is."""

    NORMAL = 1000
    GOING_AWAY = 1001  # node shutting down; reconnect (any node)
    MESSAGE_TOO_BIG = 1009  # a message over the transport cap, after its `too_large` error
    INTERNAL_ERROR = 1011
    HELLO_TIMEOUT = 4003  # no hello within the hello timeout
    SLOW_CONSUMER = 4008  # outbox overflowed: the client did not read fast enough
    RESYNC = 4010  # room epoch changed under a live socket; reconnect and resume
    FLOOD = 4029  # sustained flood of messages / rate-limit violations; back off >= 5 s
    AUTH_FAILED = 4501  # token invalid or expired; get a new token before reconnecting
    BANNED = 4503  # chat, moderation, Q&A: the user is banned from this room


class ErrorCode(enum.StrEnum):
    BAD_FRAME = "bad_frame"
    TOO_LARGE = "too_large"
    BAD_MSGPACK = "bad_msgpack"
    NOT_A_MAP = "not_a_map"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    INVALID_FIELD = "invalid_field"
    AMOUNT_NOT_INTEGER = "amount_not_integer"
    AMOUNT_NOT_POSITIVE = "amount_not_positive"
    AMOUNT_TOO_LARGE = "amount_too_large"
    HELLO_REQUIRED = "hello_required"
    DUPLICATE_HELLO = "duplicate_hello"
    AUTH_FAILED = "auth_failed"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    UNKNOWN_LOT = "unknown_lot"
    LOT_NOT_OPEN = "lot_not_open"
    LOT_CLOSED = "lot_closed"
    LOT_ENDED = "lot_ended"
    BID_TOO_LOW = "bid_too_low"
    MAX_BELOW_AMOUNT = "max_below_amount"
    INVALID_STATE = "invalid_state"
    UNKNOWN_POLL = "unknown_poll"
    POLL_CLOSED = "poll_closed"
    BAD_OPTION = "bad_option"
    DUPLICATE_VOTE = "duplicate_vote"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    # --- reactions, giveaways, auction additions (issue 10) ---
    ALREADY_RERUN = "already_rerun"
    UNKNOWN_GIVEAWAY = "unknown_giveaway"
    GIVEAWAY_CLOSED = "giveaway_closed"
    GIVEAWAY_IN_PROGRESS = "giveaway_in_progress"
    GIVEAWAY_FULL = "giveaway_full"
    DUPLICATE_ENTRY = "duplicate_entry"
    LOT_IS_OPEN = "lot_is_open"
    NO_ELIGIBLE_ENTRANTS = "no_eligible_entrants"
    NOT_DRAWN = "not_drawn"
    # --- end reactions, giveaways ---
    # --- chat, moderation, Q&A ---
    MUTED = "muted"
    BANNED = "banned"
    SLOW_MODE = "slow_mode"
    BLOCKED_WORD = "blocked_word"
    UNKNOWN_MESSAGE = "unknown_message"
    UNKNOWN_QUESTION = "unknown_question"
    DUPLICATE_UPVOTE = "duplicate_upvote"
    OWN_QUESTION = "own_question"
    # --- end chat, moderation, Q&A ---


class ProtocolError(Exception):
    """A client message was refused; becomes one `error` message to that client."""

    def __init__(self, code: ErrorCode, message: str, *, cid: Any = None, field: str | None = None,
                 request: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.cid = cid
        self.field = field
        self.request = request  # the `for` of the error: the request type, once it is known
        self.extra = extra


# --- Client -> server ------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    cid: str | int
    token: str | None = None
    epoch: str | None = None
    offset: int | None = None


@dataclass(frozen=True)
class PlaceBid:
    cid: str | int
    lot: str
    amount: int
    max: int | None = None
    key: str | None = None


@dataclass(frozen=True)
class Vote:
    cid: str | int
    poll: str
    option: int


@dataclass(frozen=True)
class CreateLot:
    cid: str | int
    title: str
    start_price: int
    increments: tuple[tuple[int, int], ...]
    duration_ms: int
    soft_close_ms: int
    reserve: int | None = None
    buy_now: int | None = None
    sudden_death: bool = False  # no soft close: the lot ends at ends_at whatever the bids


@dataclass(frozen=True)
class OpenLot:
    cid: str | int
    lot: str


@dataclass(frozen=True)
class ExtendLot:
    cid: str | int
    lot: str
    by_ms: int


@dataclass(frozen=True)
class CloseLot:
    cid: str | int
    lot: str


@dataclass(frozen=True)
class OpenPoll:
    cid: str | int
    question: str
    options: tuple[str, ...]
    duration_ms: int


@dataclass(frozen=True)
class ClosePoll:
    cid: str | int
    poll: str


@dataclass(frozen=True)
class Ping:
    cid: str | int
    ts: int | float | None = None


# --- reactions, giveaways, auction additions (issue 10) ---

REACTIONS = ("heart", "fire", "laugh", "clap")  # wire values of the fixed reaction set
GIVEAWAY_PROOF_PAGE = 500  # user ids per giveaway_proof ack


@dataclass(frozen=True)
class PreBid:
    """A max bid on a draft lot, applied in received order when the lot opens."""
    cid: str | int
    lot: str
    max: int


@dataclass(frozen=True)
class RerunLot:
    cid: str | int
    lot: str
    open: bool = False


@dataclass(frozen=True)
class React:
    cid: str | int
    reaction: str


@dataclass(frozen=True)
class OpenGiveaway:
    cid: str | int
    item: str


@dataclass(frozen=True)
class EnterGiveaway:
    cid: str | int
    giveaway: str


@dataclass(frozen=True)
class DrawGiveaway:
    cid: str | int
    giveaway: str


@dataclass(frozen=True)
class CancelGiveaway:
    cid: str | int
    giveaway: str


@dataclass(frozen=True)
class GiveawayProof:
    cid: str | int
    giveaway: str
    start: int = 0


SHOW_MESSAGES = (PreBid | RerunLot | React | OpenGiveaway | EnterGiveaway | DrawGiveaway
                 | CancelGiveaway | GiveawayProof)
SHOW_HOST_ONLY: frozenset[type] = frozenset({RerunLot, OpenGiveaway, DrawGiveaway, CancelGiveaway})
SHOW_BIDDER_ONLY: frozenset[type] = frozenset({PreBid, EnterGiveaway})
# `react` needs a signed-in user of any role (the per-user limit needs a user id)
SIGNED_IN_ONLY: frozenset[type] = frozenset({React})

# --- end reactions, giveaways ---

# --- chat, moderation, Q&A ---

MAX_CHAT_CHARS = 500
MAX_BLOCKED_WORDS = 200
MAX_BLOCKED_WORD_CHARS = 50
MAX_MUTE_MS = 7 * 24 * 3600 * 1000
MAX_SLOW_MODE_S = 3600


@dataclass(frozen=True)
class SendChat:
    cid: str | int
    text: str


@dataclass(frozen=True)
class DeleteChat:
    cid: str | int
    message: str


@dataclass(frozen=True)
class MuteUser:
    cid: str | int
    user: str
    duration_ms: int


@dataclass(frozen=True)
class UnmuteUser:
    cid: str | int
    user: str


@dataclass(frozen=True)
class BanUser:
    cid: str | int
    user: str


@dataclass(frozen=True)
class UnbanUser:
    cid: str | int
    user: str


@dataclass(frozen=True)
class GrantModerator:
    cid: str | int
    user: str


@dataclass(frozen=True)
class RevokeModerator:
    cid: str | int
    user: str


@dataclass(frozen=True)
class SetSlowMode:
    cid: str | int
    seconds: int


@dataclass(frozen=True)
class SetBlockedWords:
    cid: str | int
    words: tuple[str, ...]


@dataclass(frozen=True)
class MarkQuestion:
    cid: str | int
    message: str


@dataclass(frozen=True)
class UpvoteQuestion:
    cid: str | int
    question: str


@dataclass(frozen=True)
class AnswerQuestion:
    cid: str | int
    question: str


ModerationRequest = (MuteUser | UnmuteUser | BanUser | UnbanUser | GrantModerator
                     | RevokeModerator)
ChatRequest = (SendChat | DeleteChat | ModerationRequest | SetSlowMode | SetBlockedWords
               | MarkQuestion | UpvoteQuestion | AnswerQuestion)
# any signed-in role (bidder, moderator, host); whether one may moderate is decided in Redis
CHAT_SIGNED_IN: frozenset[type] = frozenset({SendChat, DeleteChat, MuteUser, UnmuteUser, BanUser,
                                             UnbanUser, SetBlockedWords, MarkQuestion,
                                             UpvoteQuestion})
CHAT_HOST_ONLY: frozenset[type] = frozenset({GrantModerator, RevokeModerator, SetSlowMode,
                                             AnswerQuestion})

# --- end chat, moderation, Q&A ---

ClientMessage = (Hello | PlaceBid | Vote | CreateLot | OpenLot | ExtendLot | CloseLot | OpenPoll
                 | ClosePoll | Ping | SHOW_MESSAGES | ChatRequest)
HOST_ONLY: frozenset[type] = frozenset({CreateLot, OpenLot, ExtendLot, CloseLot, OpenPoll,
                                        ClosePoll}) | SHOW_HOST_ONLY | CHAT_HOST_ONLY
BIDDER_ONLY: frozenset[type] = frozenset({PlaceBid, Vote}) | SHOW_BIDDER_ONLY

Check = Callable[[str, Any], Any]


def _text(lo: int, hi: int) -> Check:
    def check(name: str, v: Any) -> str:
        if not isinstance(v, str):
            raise ProtocolError(ErrorCode.WRONG_TYPE, f"{name} must be a string", field=name)
        if not lo <= len(v) <= hi:
            raise ProtocolError(ErrorCode.INVALID_FIELD,
                                f"{name} must be {lo}..{hi} characters", field=name)
        return v
    return check


def _int(lo: int, hi: int) -> Check:
    def check(name: str, v: Any) -> int:
        if type(v) is not int:
            raise ProtocolError(ErrorCode.WRONG_TYPE, f"{name} must be an integer", field=name)
        if not lo <= v <= hi:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} must be in {lo}..{hi}", field=name)
        return v
    return check


def check_amount(name: str, v: Any, *, allow_zero: bool = False) -> int:
    """Amounts are integers in minor units: no floats, NaN, bools, strings or huge values."""
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        raise ProtocolError(ErrorCode.AMOUNT_NOT_INTEGER,
                            f"{name} must be an integer number of minor units, got {v!r}", field=name)
    if type(v) is not int:
        raise ProtocolError(ErrorCode.AMOUNT_NOT_INTEGER,
                            f"{name} must be an integer number of minor units, got "
                            f"{type(v).__name__}", field=name)
    if v < 0 or (v == 0 and not allow_zero):
        raise ProtocolError(ErrorCode.AMOUNT_NOT_POSITIVE,
                            f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}", field=name)
    if v > MAX_AMOUNT:
        raise ProtocolError(ErrorCode.AMOUNT_TOO_LARGE,
                            f"{name} must be <= {MAX_AMOUNT}, got {v}", field=name)
    return v


def _amount(name: str, v: Any) -> int:
    return check_amount(name, v)


MAX_CID = 2**53 - 1
CID_RULE = "cid must be a string of 1..64 characters or an integer in 0..2^53-1"


def valid_cid(v: Any) -> str | int | None:
    """`v` if it is a usable cid (echoed in replies), else None."""
    if isinstance(v, str) and 1 <= len(v) <= 64:
        return v
    if type(v) is int and 0 <= v <= MAX_CID:
        return v
    return None


def _cid(name: str, v: Any) -> str | int:
    cid = valid_cid(v)
    if cid is not None:
        return cid
    right_type = isinstance(v, str) or type(v) is int
    raise ProtocolError(ErrorCode.INVALID_FIELD if right_type else ErrorCode.WRONG_TYPE, CID_RULE,
                        field=name)


def _ts(name: str, v: Any) -> int | float:
    if type(v) is int or (isinstance(v, float) and math.isfinite(v)):
        return v  # type: ignore[no-any-return]
    if isinstance(v, float):
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} must be a finite number", field=name)
    raise ProtocolError(ErrorCode.WRONG_TYPE, f"{name} must be a number", field=name)


def _increments(name: str, v: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(v, list):
        raise ProtocolError(ErrorCode.WRONG_TYPE,
                            f"{name} must be a list of [threshold, increment] pairs", field=name)
    if not 1 <= len(v) <= MAX_INCREMENT_ROWS:
        raise ProtocolError(ErrorCode.INVALID_FIELD,
                            f"{name} must have 1..{MAX_INCREMENT_ROWS} rows, got {len(v)}",
                            field=name)
    rows: list[tuple[int, int]] = []
    for i, row in enumerate(v):
        if not isinstance(row, list):
            raise ProtocolError(ErrorCode.WRONG_TYPE,
                                f"{name}[{i}] must be a [threshold, increment] pair",
                                field=f"{name}[{i}]")
        if len(row) != 2:
            raise ProtocolError(ErrorCode.INVALID_FIELD,
                                f"{name}[{i}] must have exactly 2 entries, got {len(row)}",
                                field=f"{name}[{i}]")
        threshold = check_amount(f"{name}[{i}][0]", row[0], allow_zero=True)
        step = check_amount(f"{name}[{i}][1]", row[1])
        if i == 0 and threshold != 0:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name}[0] threshold must be 0", field=name)
        if rows and threshold <= rows[-1][0]:
            raise ProtocolError(ErrorCode.INVALID_FIELD,
                                f"{name} thresholds must strictly increase", field=name)
        rows.append((threshold, step))
    return tuple(rows)


def _options(name: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise ProtocolError(ErrorCode.WRONG_TYPE, f"{name} must be a list of strings", field=name)
    if not 2 <= len(v) <= 6:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} must have 2..6 entries", field=name)
    return tuple(_text(1, 100)(f"{name}[{i}]", o) for i, o in enumerate(v))


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ProtocolError(ErrorCode.WRONG_TYPE, f"{name} must be a boolean", field=name)
    return v


def _reaction(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ProtocolError(ErrorCode.WRONG_TYPE, f"{name} must be a string", field=name)
    if v not in REACTIONS:
        raise ProtocolError(ErrorCode.INVALID_FIELD,
                            f"{name} must be one of {', '.join(REACTIONS)}", field=name)
    return v


_ID = _text(1, 64)
_DURATION = _int(1000, MAX_DURATION_MS)

# type name -> (message class, {field: (check, required)})
SCHEMAS: dict[str, tuple[type, dict[str, tuple[Check, bool]]]] = {
    "hello": (Hello, {"token": (_text(1, MAX_TOKEN_CHARS), False), "epoch": (_text(1, 64), False),
                      "offset": (_int(0, 2**53 - 1), False)}),
    "bid": (PlaceBid, {"lot": (_ID, True), "amount": (_amount, True), "max": (_amount, False),
                       "key": (_ID, False)}),
    "vote": (Vote, {"poll": (_ID, True), "option": (_int(0, 5), True)}),
    "lot_create": (CreateLot, {
        "title": (_text(1, 200), True), "start_price": (_amount, True),
        "increments": (_increments, True), "duration_ms": (_DURATION, True),
        "soft_close_ms": (_int(0, MAX_EXTEND_MS), True), "reserve": (_amount, False),
        "buy_now": (_amount, False), "sudden_death": (_bool, False)}),
    "lot_open": (OpenLot, {"lot": (_ID, True)}),
    "lot_extend": (ExtendLot, {"lot": (_ID, True), "by_ms": (_int(1, MAX_EXTEND_MS), True)}),
    "lot_close": (CloseLot, {"lot": (_ID, True)}),
    "poll_open": (OpenPoll, {"question": (_text(1, 300), True), "options": (_options, True),
                             "duration_ms": (_DURATION, True)}),
    "poll_close": (ClosePoll, {"poll": (_ID, True)}),
    "ping": (Ping, {"ts": (_ts, False)}),
    # --- reactions, giveaways, auction additions (issue 10) ---
    "prebid": (PreBid, {"lot": (_ID, True), "max": (_amount, True)}),
    "lot_rerun": (RerunLot, {"lot": (_ID, True), "open": (_bool, False)}),
    "react": (React, {"reaction": (_reaction, True)}),
    "giveaway_open": (OpenGiveaway, {"item": (_text(1, 200), True)}),
    "giveaway_enter": (EnterGiveaway, {"giveaway": (_ID, True)}),
    "giveaway_draw": (DrawGiveaway, {"giveaway": (_ID, True)}),
    "giveaway_cancel": (CancelGiveaway, {"giveaway": (_ID, True)}),
    "giveaway_proof": (GiveawayProof, {"giveaway": (_ID, True), "start": (_int(0, 2**31), False)}),
    # --- end reactions, giveaways ---
}

# --- chat, moderation, Q&A: schemas ---


def _chat_text(name: str, v: Any) -> str:
    text: str = _text(1, MAX_CHAT_CHARS)(name, v)
    if not text.strip():
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} must not be only whitespace",
                            field=name)
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise ProtocolError(ErrorCode.INVALID_FIELD,
                            f"{name} must not contain control characters (newlines included)",
                            field=name)
    return text


def _blocked_words(name: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise ProtocolError(ErrorCode.WRONG_TYPE, f"{name} must be a list of strings", field=name)
    if len(v) > MAX_BLOCKED_WORDS:
        raise ProtocolError(ErrorCode.INVALID_FIELD,
                            f"{name} must have 0..{MAX_BLOCKED_WORDS} entries", field=name)
    out = []
    for i, word in enumerate(v):
        entry = _text(1, MAX_BLOCKED_WORD_CHARS)(f"{name}[{i}]", word)
        if not chatnorm.blocked_entry(entry):
            raise ProtocolError(ErrorCode.INVALID_FIELD,
                                f"{name}[{i}] must contain a letter or digit", field=f"{name}[{i}]")
        out.append(entry)
    return tuple(out)


_USER: dict[str, tuple[Check, bool]] = {"user": (_ID, True)}
SCHEMAS.update({
    "chat": (SendChat, {"text": (_chat_text, True)}),
    "chat_delete": (DeleteChat, {"message": (_ID, True)}),
    "user_mute": (MuteUser, {"user": (_ID, True),
                             "duration_ms": (_int(1000, MAX_MUTE_MS), True)}),
    "user_unmute": (UnmuteUser, _USER),
    "user_ban": (BanUser, _USER),
    "user_unban": (UnbanUser, _USER),
    "moderator_grant": (GrantModerator, _USER),
    "moderator_revoke": (RevokeModerator, _USER),
    "slow_mode": (SetSlowMode, {"seconds": (_int(0, MAX_SLOW_MODE_S), True)}),
    "blocked_words": (SetBlockedWords, {"words": (_blocked_words, True)}),
    "question_mark": (MarkQuestion, {"message": (_ID, True)}),
    "question_upvote": (UpvoteQuestion, {"question": (_ID, True)}),
    "question_answer": (AnswerQuestion, {"question": (_ID, True)}),
})

# --- end chat, moderation, Q&A: schemas ---


def parse_client_frame(frame: bytes) -> ClientMessage:
    """Decode and validate one client frame, or raise ProtocolError saying exactly what is wrong."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame is {len(frame)} bytes; limit {MAX_FRAME_BYTES}")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(ErrorCode.BAD_MSGPACK, f"frame is not one valid msgpack value: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.NOT_A_MAP, f"frame must be a msgpack map, got {type(raw).__name__}")
    try:
        return _parse_map(raw)
    except ProtocolError as err:
        # Echo only a cid the client could have sent on purpose (the doc says nil otherwise), and
        # name the request once its type is known.
        err.cid = valid_cid(raw.get("cid"))
        kind = raw.get("type")
        if err.request is None and isinstance(kind, str) and kind in SCHEMAS:
            err.request = kind
        raise


def _parse_map(raw: dict[Any, Any]) -> ClientMessage:
    if "type" not in raw:
        raise ProtocolError(ErrorCode.MISSING_FIELD, "missing field 'type'", field="type")
    kind = raw["type"]
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.WRONG_TYPE, "type must be a string", field="type")
    if kind not in SCHEMAS:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}", field="type")
    cls, schema = SCHEMAS[kind]
    for name in raw:
        if name not in schema and name not in ("type", "cid"):
            raise ProtocolError(ErrorCode.UNKNOWN_FIELD, f"unknown field {name!r} in {kind!r}",
                                field=str(name))
    if "cid" not in raw:
        raise ProtocolError(ErrorCode.MISSING_FIELD, "missing field 'cid'", field="cid")
    values: dict[str, Any] = {"cid": _cid("cid", raw["cid"])}
    for name, (check, required) in schema.items():
        if name not in raw or raw[name] is None:
            if required:
                raise ProtocolError(ErrorCode.MISSING_FIELD, f"missing field {name!r} in {kind!r}",
                                    field=name)
            continue
        values[name] = check(name, raw[name])
    msg: ClientMessage = cls(**values)
    _check_cross_fields(msg)
    return msg


def _check_cross_fields(msg: ClientMessage) -> None:
    if isinstance(msg, Hello) and (msg.epoch is None) != (msg.offset is None):
        raise ProtocolError(ErrorCode.MISSING_FIELD, "epoch and offset must be sent together",
                            field="offset" if msg.offset is None else "epoch")
    if isinstance(msg, PlaceBid) and msg.max is not None and msg.max < msg.amount:
        raise ProtocolError(ErrorCode.MAX_BELOW_AMOUNT,
                            f"max ({msg.max}) must be >= amount ({msg.amount})", field="max")
    if isinstance(msg, CreateLot):
        if msg.buy_now is not None and msg.buy_now <= msg.start_price:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "buy_now must be > start_price",
                                field="buy_now")
        if msg.reserve is not None and msg.buy_now is not None and msg.reserve > msg.buy_now:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "reserve must be <= buy_now",
                                field="reserve")
        if msg.soft_close_ms > msg.duration_ms:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "soft_close_ms must be <= duration_ms",
                                field="soft_close_ms")
        if msg.sudden_death and msg.soft_close_ms != 0:
            raise ProtocolError(ErrorCode.INVALID_FIELD,
                                "a sudden_death lot has no soft close: soft_close_ms must be 0",
                                field="soft_close_ms")


def message_type(msg: ClientMessage) -> str:
    for name, (cls, _) in SCHEMAS.items():
        if type(msg) is cls:
            return name
    raise KeyError(type(msg).__name__)


def encode_client(kind: str, **fields: Any) -> bytes:
    """Build a client frame (tests and Python clients)."""
    frame: bytes = msgpack.packb({"type": kind, **fields}, use_bin_type=True)
    return frame


# --- Server -> client ------------------------------------------------------------------------

def _pack(msg: dict[str, Any]) -> bytes:
    frame: bytes = msgpack.packb({k: v for k, v in msg.items() if v is not None},
                                 use_bin_type=True)
    return frame


def encode_welcome(*, cid: Any, room: str, role: str, user: str | None, name: str | None,
                   node: str, epoch: str, offset: int, server_ts: int,
                   limits: dict[str, float]) -> bytes:
    return _pack({"type": "welcome", "cid": cid, "version": PROTOCOL_VERSION, "room": room,
                  "role": role, "user": user, "name": name, "node": node, "epoch": epoch,
                  "offset": offset, "server_ts": server_ts, "limits": limits})


def encode_ack(*, cid: Any, request: str, epoch: str, offset: int, **fields: Any) -> bytes:
    return _pack({"type": "ack", "cid": cid, "for": request, "epoch": epoch, "offset": offset,
                  **fields})


def encode_error(err: ProtocolError, *, epoch: str | None, offset: int | None,
                 request: str | None = None) -> bytes:
    msg: dict[str, Any] = {"type": "error", "cid": err.cid, "for": request or err.request,
                           "code": str(err.code),
                           "message": err.message, "field": err.field, "epoch": epoch,
                           "offset": offset}
    msg.update(err.extra)
    return _pack_keep_cid(msg)


def _pack_keep_cid(msg: dict[str, Any]) -> bytes:
    frame: bytes = msgpack.packb({k: v for k, v in msg.items() if v is not None or k == "cid"},
                                 use_bin_type=True)
    return frame


def encode_pong(*, cid: Any, ts: Any, server_ts: int, epoch: str, offset: int) -> bytes:
    return _pack({"type": "pong", "cid": cid, "ts": ts, "server_ts": server_ts, "epoch": epoch,
                  "offset": offset})


def encode_snapshot(*, epoch: str, offset: int, lots: list[dict[str, Any]],
                    polls: list[dict[str, Any]], viewers: int, server_ts: int,
                    **extra: Any) -> bytes:
    """`extra`: further room state (e.g. `reactions`, `giveaway`); None values are left out."""
    return _pack({"type": "snapshot", "epoch": epoch, "offset": offset, "lots": lots,
                  "polls": polls, "viewers": viewers, "server_ts": server_ts, **extra})


def encode_tally(*, epoch: str, offset: int, poll: str, counts: list[int]) -> bytes:
    return _pack({"type": "tally", "epoch": epoch, "offset": offset, "poll": poll,
                  "counts": counts, "total": sum(counts)})


# --- reactions, giveaways ---

def encode_reactions(*, epoch: str, offset: int, counts: dict[str, int]) -> bytes:
    """The room's cumulative reaction counts (coalesced; every reaction of REACTIONS present)."""
    full = {name: int(counts.get(name, 0)) for name in REACTIONS}
    return _pack({"type": "reactions", "epoch": epoch, "offset": offset, "counts": full,
                  "total": sum(full.values())})

# --- end reactions, giveaways ---

# --- chat, moderation, Q&A ---

def encode_question_votes(*, epoch: str, offset: int, votes: dict[str, int]) -> bytes:
    """Coalesced upvote counts of open questions: question id -> votes."""
    return _pack({"type": "question_votes", "epoch": epoch, "offset": offset, "votes": votes})

# --- end chat, moderation, Q&A ---


def encode_viewers(*, epoch: str, offset: int, count: int) -> bytes:
    return _pack({"type": "viewers", "epoch": epoch, "offset": offset, "count": count})


def encode_republish(*, stream: str, whip_url: str) -> bytes:
    """Issue 13, to the host's sockets of the room: the origin of `stream` is draining; publish
    to `whip_url` (another origin) make-before-break, then end the old WHIP session. Not a log
    event: no epoch or offset."""
    return _pack({"type": "republish", "stream": stream, "whip_url": whip_url})


def encode_events(*, epoch: str, offset: int, raw_events: Iterable[bytes], count: int,
                  replay: bool = False) -> bytes:
    """An `events` batch built from already-encoded log events, without re-encoding them."""
    packer = msgpack.Packer(use_bin_type=True)
    head: bytes = (packer.pack_map_header(5 if replay else 4) + packer.pack("type") + packer.pack("events")
            + packer.pack("epoch") + packer.pack(epoch) + packer.pack("offset") + packer.pack(offset))
    if replay:
        head += packer.pack("replay") + packer.pack(True)
    head += packer.pack("events") + packer.pack_array_header(count)
    return head + b"".join(raw_events)


def decode_server_frame(frame: bytes) -> list[dict[str, Any]]:
    """Split one server frame into its messages (tests and Python clients)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(frame)
    return list(unpacker)


# --- HTTP fallback transport ------------------------------------------------------------------

def encode_session(*, session: str, keepalive_ms: int) -> bytes:
    """The first record of an HTTP stream: the id its POSTs must carry."""
    return _pack({"type": "session", "session": session, "keepalive_ms": keepalive_ms,
                  "version": PROTOCOL_VERSION})


def encode_close(*, code: int, reason: str) -> bytes:
    """The last record of an HTTP stream the server ends: a WebSocket close code and reason."""
    return _pack({"type": "close", "code": code, "reason": reason})


def stream_record(payload: bytes) -> bytes:
    """One record of the HTTP stream: the payload (a server frame, unchanged) behind its length."""
    return len(payload).to_bytes(RECORD_HEADER_BYTES, "big") + payload


def split_records(buffer: bytearray) -> list[bytes]:
    """Take every complete record off the front of `buffer` (tests and Python clients); a
    keepalive record yields b""."""
    out: list[bytes] = []
    while len(buffer) >= RECORD_HEADER_BYTES:
        size = int.from_bytes(buffer[:RECORD_HEADER_BYTES], "big")
        if len(buffer) < RECORD_HEADER_BYTES + size:
            break
        out.append(bytes(buffer[RECORD_HEADER_BYTES:RECORD_HEADER_BYTES + size]))
        del buffer[:RECORD_HEADER_BYTES + size]
    return out
