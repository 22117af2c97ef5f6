"""Sans-IO tests of the wire schema: every bad input gets its exact error code and field."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from lotcast.interactive import protocol as p


def frame(kind: str | None = "bid", **fields: Any) -> bytes:
    body: dict[str, Any] = {"cid": "c1", **fields}
    if kind is not None:
        body["type"] = kind
    return msgpack.packb(body, use_bin_type=True)


def refused(data: bytes) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client_frame(data)
    return info.value


GOOD_BID = {"lot": "L1", "amount": 1500}
GOOD_LOT = {"title": "Poster", "start_price": 1000, "increments": [[0, 100], [10000, 500]],
            "duration_ms": 60000, "soft_close_ms": 10000}


def test_valid_messages_parse() -> None:
    bid = p.parse_client_frame(frame("bid", lot="L1", amount=1500, max=3000, key="k"))
    assert bid == p.PlaceBid(cid="c1", lot="L1", amount=1500, max=3000, key="k")
    lot = p.parse_client_frame(frame("lot_create", **GOOD_LOT, reserve=5000, buy_now=90000))
    assert isinstance(lot, p.CreateLot) and lot.increments == ((0, 100), (10000, 500))
    hello = p.parse_client_frame(frame("hello", token="t", epoch="e", offset=3))
    assert hello == p.Hello(cid="c1", token="t", epoch="e", offset=3)
    assert p.parse_client_frame(frame("ping", cid=7)) == p.Ping(cid=7)


@pytest.mark.parametrize(("data", "code"), [
    (b"\xc1", p.ErrorCode.BAD_MSGPACK),
    (b"\x92\x01", p.ErrorCode.BAD_MSGPACK),  # truncated array
    (msgpack.packb([1, 2]), p.ErrorCode.NOT_A_MAP),
    (msgpack.packb(b"x" * 9000), p.ErrorCode.TOO_LARGE),
])
def test_malformed_frames(data: bytes, code: p.ErrorCode) -> None:
    assert refused(data).code is code


def test_trailing_bytes_are_malformed() -> None:
    assert refused(frame("ping") + b"\x00").code is p.ErrorCode.BAD_MSGPACK


@pytest.mark.parametrize(("data", "code", "field"), [
    (frame(None), p.ErrorCode.MISSING_FIELD, "type"),
    (frame("dance"), p.ErrorCode.UNKNOWN_TYPE, "type"),
    (msgpack.packb({"type": 5, "cid": "c"}), p.ErrorCode.WRONG_TYPE, "type"),
    (msgpack.packb({"type": "ping"}), p.ErrorCode.MISSING_FIELD, "cid"),
    (msgpack.packb({"type": "ping", "cid": 1.5}), p.ErrorCode.WRONG_TYPE, "cid"),
    (msgpack.packb({"type": "ping", "cid": ""}), p.ErrorCode.INVALID_FIELD, "cid"),
    (msgpack.packb({"type": "ping", "cid": 2**53}), p.ErrorCode.INVALID_FIELD, "cid"),
    (msgpack.packb({"type": "ping", "cid": True}), p.ErrorCode.WRONG_TYPE, "cid"),
    (frame("bid", amount=100), p.ErrorCode.MISSING_FIELD, "lot"),
    (frame("bid", lot="L1"), p.ErrorCode.MISSING_FIELD, "amount"),
    (frame("bid", **GOOD_BID, colour="red"), p.ErrorCode.UNKNOWN_FIELD, "colour"),
    (frame("bid", lot=5, amount=100), p.ErrorCode.WRONG_TYPE, "lot"),
    (frame("vote", poll="P1", option="2"), p.ErrorCode.WRONG_TYPE, "option"),
    (frame("vote", poll="P1", option=6), p.ErrorCode.INVALID_FIELD, "option"),
    (frame("hello", epoch="e"), p.ErrorCode.MISSING_FIELD, "offset"),
    (frame("lot_create", **{**GOOD_LOT, "title": ""}), p.ErrorCode.INVALID_FIELD, "title"),
    (frame("lot_create", **{**GOOD_LOT, "increments": [[5, 100]]}), p.ErrorCode.INVALID_FIELD,
     "increments"),
    (frame("lot_create", **{**GOOD_LOT, "increments": [[0, 100], [0, 5]]}),
     p.ErrorCode.INVALID_FIELD, "increments"),
    (frame("lot_create", **{**GOOD_LOT, "increments": [[0, 0]]}),
     p.ErrorCode.AMOUNT_NOT_POSITIVE, "increments[0][1]"),
    (frame("lot_create", **{**GOOD_LOT, "increments": [0, 100]}), p.ErrorCode.WRONG_TYPE,
     "increments[0]"),
    (frame("lot_create", **{**GOOD_LOT, "increments": [[0, 100, 1]]}), p.ErrorCode.INVALID_FIELD,
     "increments[0]"),
    (frame("lot_create", **{**GOOD_LOT, "increments": []}), p.ErrorCode.INVALID_FIELD,
     "increments"),
    (frame("lot_create", **{**GOOD_LOT, "increments": [[i, 1] for i in range(21)]}),
     p.ErrorCode.INVALID_FIELD, "increments"),
    (frame("ping", ts=float("inf")), p.ErrorCode.INVALID_FIELD, "ts"),
    (frame("ping", ts="now"), p.ErrorCode.WRONG_TYPE, "ts"),
    (frame("lot_create", **{**GOOD_LOT, "duration_ms": 10}), p.ErrorCode.INVALID_FIELD,
     "duration_ms"),
    (frame("lot_create", **GOOD_LOT, buy_now=500), p.ErrorCode.INVALID_FIELD, "buy_now"),
    (frame("lot_create", **GOOD_LOT, reserve=9000, buy_now=5000), p.ErrorCode.INVALID_FIELD,
     "reserve"),
    (frame("lot_create", **{**GOOD_LOT, "soft_close_ms": 70000}), p.ErrorCode.INVALID_FIELD,
     "soft_close_ms"),
    (frame("poll_open", question="q", options=["a"], duration_ms=5000),
     p.ErrorCode.INVALID_FIELD, "options"),
    (frame("poll_open", question="q", options=list("abcdefg"), duration_ms=5000),
     p.ErrorCode.INVALID_FIELD, "options"),
    (frame("poll_open", question="q", options=["a", 2], duration_ms=5000),
     p.ErrorCode.WRONG_TYPE, "options[1]"),
])
def test_schema_errors(data: bytes, code: p.ErrorCode, field: str) -> None:
    err = refused(data)
    assert (err.code, err.field) == (code, field)


@pytest.mark.parametrize(("amount", "code"), [
    (-5, p.ErrorCode.AMOUNT_NOT_POSITIVE),
    (0, p.ErrorCode.AMOUNT_NOT_POSITIVE),
    (float("nan"), p.ErrorCode.AMOUNT_NOT_INTEGER),
    (float("inf"), p.ErrorCode.AMOUNT_NOT_INTEGER),
    (12.5, p.ErrorCode.AMOUNT_NOT_INTEGER),
    (100.0, p.ErrorCode.AMOUNT_NOT_INTEGER),
    ("100", p.ErrorCode.AMOUNT_NOT_INTEGER),
    (True, p.ErrorCode.AMOUNT_NOT_INTEGER),
    (10**12 + 1, p.ErrorCode.AMOUNT_TOO_LARGE),
    (2**63, p.ErrorCode.AMOUNT_TOO_LARGE),
])
def test_bad_amounts(amount: Any, code: p.ErrorCode) -> None:
    err = refused(frame("bid", lot="L1", amount=amount))
    assert (err.code, err.field, err.cid) == (code, "amount", "c1")


def test_max_below_amount() -> None:
    err = refused(frame("bid", lot="L1", amount=500, max=400))
    assert (err.code, err.field) == (p.ErrorCode.MAX_BELOW_AMOUNT, "max")


def test_error_carries_cid_when_known() -> None:
    assert refused(frame("dance")).cid == "c1"
    assert refused(b"\xc1").cid is None
    assert refused(frame("dance", cid="x" * 65)).cid is None
    assert refused(frame("bid", cid=-3, lot="L1")).cid is None


def test_error_names_the_request_once_its_type_is_known() -> None:
    assert refused(frame("bid", lot=5, amount=1)).request == "bid"
    assert refused(frame("lot_create", **{**GOOD_LOT, "title": ""})).request == "lot_create"
    assert refused(frame("dance")).request is None
    assert refused(frame(None)).request is None
    err = refused(frame("ping", cid=""))
    msg = msgpack.unpackb(p.encode_error(err, epoch=None, offset=None))
    assert (msg["cid"], msg["for"], msg["code"]) == (None, "ping", "invalid_field")


def test_error_encoding_keeps_nil_cid() -> None:
    err = p.ProtocolError(p.ErrorCode.BAD_MSGPACK, "bad")
    msg = msgpack.unpackb(p.encode_error(err, epoch=None, offset=None))
    assert msg == {"type": "error", "cid": None, "code": "bad_msgpack", "message": "bad"}


def test_events_batch_is_built_from_raw_events() -> None:
    raw = [msgpack.packb({"type": "bid", "offset": i}) for i in (4, 5)]
    out = p.decode_server_frame(p.encode_events(epoch="e", offset=5, raw_events=raw, count=2))
    assert out == [{"type": "events", "epoch": "e", "offset": 5,
                    "events": [{"type": "bid", "offset": 4}, {"type": "bid", "offset": 5}]}]
    two = p.encode_pong(cid=1, ts=None, server_ts=9, epoch="e", offset=5) * 2
    assert len(p.decode_server_frame(two)) == 2
