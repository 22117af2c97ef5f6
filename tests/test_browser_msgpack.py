"""The pages' msgpack codec (viewer_web/static/js/msgpack.js, the adapter over the vendored
@msgpack/msgpack in viewer_web/static/vendor/msgpack/) against Python's msgpack, both ways, in
real Chromium; and the vendored files against their recorded checksums."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import msgpack
import pytest
from browser_support import PageLog, chromium, open_page, static_server

from lotcast.interactive import protocol

STATIC = Path(__file__).resolve().parent.parent / "viewer_web" / "static"
VENDOR = STATIC / "vendor" / "msgpack"

BOUNDARY_INTS = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**53) + 1,
]
STRINGS = ["", "a" * 31, "b" * 32, "c" * 255, "d" * 256, "e" * 65535, "f" * 65536,
           "héllo wörld €", "日本語", "emoji 🎉🐍"]

# Built in the page; must equal PY_VALUES after a round trip through Python.
JS_VALUES = """[
  null, true, false,
  ...%(ints)s,
  1.5, -0.25, 1e300, Number.MAX_SAFE_INTEGER + 0.5 * 0,
  ...%(strings)s,
  new Uint8Array([0, 1, 2, 255]), new Uint8Array(300), new Uint8Array(70000),
  [], Array.from({length: 15}, (_, i) => i), Array.from({length: 16}, (_, i) => i),
  Array.from({length: 70000}, (_, i) => i %% 3),
  {}, Object.fromEntries(Array.from({length: 15}, (_, i) => ["k" + i, i])),
  Object.fromEntries(Array.from({length: 16}, (_, i) => ["k" + i, i])),
  {type: "bid", cid: "c-1", lot: "lot-1", amount: 1250, max: 5000, nested: {a: [1, {b: null}]}},
  {skip: undefined, keep: 1},
]"""


def py_values() -> list[Any]:
    return [
        None, True, False, *BOUNDARY_INTS, 1.5, -0.25, 1e300, 2**53 - 1, *STRINGS,
        bytes([0, 1, 2, 255]), bytes(300), bytes(70000),
        [], list(range(15)), list(range(16)), [i % 3 for i in range(70000)],
        {}, {f"k{i}": i for i in range(15)}, {f"k{i}": i for i in range(16)},
        {"type": "bid", "cid": "c-1", "lot": "lot-1", "amount": 1250, "max": 5000,
         "nested": {"a": [1, {"b": None}]}},
        {"keep": 1},
    ]


@pytest.mark.timeout(60)
async def test_msgpack_browser_encode_matches_python() -> None:
    log = PageLog()
    with static_server() as base:
        async with chromium() as browser:
            page = await open_page(browser, base + "/static/js/msgpack.js", log, "mp")
            js = JS_VALUES % {"ints": BOUNDARY_INTS, "strings": STRINGS}
            out = await page.evaluate(
                """async (src) => {
                    const mp = await import('/static/js/msgpack.js');
                    const values = eval(src);
                    let bigint = null;
                    try { mp.encode({amount: 2n ** 63n}); } catch (e) { bigint = e.name; }
                    return {encoded: values.map((v) => Array.from(mp.encode(v))), bigint};
                }""",
                js,
            )
    # No client field can hold a BigInt: encoding one fails rather than sending a float.
    assert out["bigint"] is not None
    encoded = out["encoded"]
    expected = py_values()
    assert len(encoded) == len(expected)
    for i, (raw, want) in enumerate(zip(encoded, expected, strict=True)):
        got = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=False)
        assert got == want, f"value #{i}: {got!r:.200} != {want!r:.200}"
        # Integers use the smallest encoding, exactly like Python's packer.
        if isinstance(want, int) and not isinstance(want, bool):
            assert bytes(raw) == msgpack.packb(want), f"int #{i} ({want}) not minimally encoded"
        if isinstance(want, str):
            assert bytes(raw) == msgpack.packb(want, use_bin_type=True), f"str #{i} header"


@pytest.mark.timeout(60)
async def test_msgpack_browser_decodes_python_frames() -> None:
    values = py_values()
    # 64-bit integers beyond the safe range stay exact (BigInt), never rounded.
    values += [2**53, 2**63 - 1, -(2**63), 2**64 - 1, -(2**53)]
    values += [float("inf"), -float("inf"), math.nan]
    frames = [list(msgpack.packb(v, use_bin_type=True)) for v in values]
    # A float32 and ext/timestamp values are produced by Python only.
    frames.append(list(msgpack.packb(1.5, use_single_float=True)))
    frames.append(list(msgpack.packb(msgpack.ExtType(5, b"\x01\x02\x03"))))
    frames.append(list(msgpack.packb(msgpack.Timestamp(1700000000, 500_000_000))))
    frames.append(list(msgpack.packb({1: "int key"}, use_bin_type=True)))
    batch = b"".join(msgpack.packb({"type": "tally", "offset": i}) for i in range(3))
    log = PageLog()
    with static_server() as base:
        async with chromium() as browser:
            page = await open_page(browser, base + "/static/js/msgpack.js", log, "mp")
            out = await page.evaluate(
                """async ([frames, batch]) => {
                    const mp = await import('/static/js/msgpack.js');
                    const show = (v) => {
                      if (typeof v === 'bigint') return {bigint: v.toString()};
                      if (typeof v === 'number' && !Number.isFinite(v)) return {special: String(v)};
                      if (v instanceof Uint8Array) return {bin: Array.from(v)};
                      if (v instanceof Date) return {date: v.getTime()};
                      if (v instanceof mp.Ext) return {ext: v.type, data: Array.from(v.data)};
                      if (Array.isArray(v)) return v.map(show);
                      if (v && typeof v === 'object') {
                        return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, show(x)]));
                      }
                      return v;
                    };
                    const errors = [];
                    // never-used byte, truncated str, trailing byte, truncated array, bool key
                    const bads = [[0xc1], [0xa5, 0x61], [0x01, 0x02], [0xdc, 0x00], [0x81, 0xc3, 0x01]];
                    for (const bad of bads) {
                      try { mp.decode(new Uint8Array(bad)); errors.push(null); }
                      catch (e) { errors.push(e instanceof mp.MsgpackError ? 'MsgpackError' : e.name); }
                    }
                    return {
                      values: frames.map((f) => show(mp.decode(new Uint8Array(f)))),
                      batch: mp.decodeAll(new Uint8Array(batch)),
                      errors,
                    };
                }""",
                [frames, list(batch)],
            )

    def show(v: Any) -> Any:
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, int):
            return {"bigint": str(v)} if abs(v) > 2**53 - 1 else v
        if isinstance(v, float) and not math.isfinite(v):
            return {"special": {math.inf: "Infinity", -math.inf: "-Infinity"}.get(v, "NaN")}
        if isinstance(v, bytes):
            return {"bin": list(v)}
        if isinstance(v, list):
            return [show(x) for x in v]
        if isinstance(v, dict):
            return {k: show(x) for k, x in v.items()}
        return v

    got = out["values"]
    for i, want in enumerate(values):
        assert got[i] == show(want), f"value #{i}: {got[i]!r:.200} != {show(want)!r:.200}"
    n = len(values)
    assert got[n] == 1.5
    assert got[n + 1] == {"ext": 5, "data": [1, 2, 3]}
    assert got[n + 2] == {"date": 1700000000500}
    assert got[n + 3] == {"1": "int key"}
    assert out["batch"] == [{"type": "tally", "offset": i} for i in range(3)]
    assert out["errors"] == ["MsgpackError"] * 5


def server_frame() -> bytes:
    """One frame as a node batches it: several maps back to back, built by the server's encoders
    (an `events` batch wraps already-encoded log events without re-encoding them)."""
    now = 1_700_000_000_123  # ms: above 2^32, so Python packs it as uint64
    raw_events = [
        msgpack.packb({"type": "bid", "offset": 41 + i, "ts": now + i, "lot": "lot-1",
                       "amount": 10**12 - i, "user": f"u{i}", "name": "Zoë 🎉"},
                      use_bin_type=True)
        for i in range(3)
    ]
    return b"".join([
        protocol.encode_welcome(cid=7, room="show-1", role="bidder", user="u1", name="Ann",
                                node="relay-1", epoch="1700000000000-0", offset=40,
                                server_ts=now, limits={"bids_per_s": 5.0}),
        protocol.encode_events(epoch="1700000000000-0", offset=43, raw_events=raw_events,
                               count=len(raw_events), replay=True),
        protocol.encode_tally(epoch="1700000000000-0", offset=43, poll="p1", counts=[3, 0, 2**40]),
        protocol.encode_viewers(epoch="1700000000000-0", offset=43, count=12000),
    ])


@pytest.mark.timeout(60)
async def test_msgpack_browser_decodes_multi_map_server_frame() -> None:
    frame = server_frame()
    want = protocol.decode_server_frame(frame)
    assert [m["type"] for m in want] == ["welcome", "events", "tally", "viewers"]
    log = PageLog()
    with static_server() as base:
        async with chromium() as browser:
            page = await open_page(browser, base + "/static/js/msgpack.js", log, "mp")
            out = await page.evaluate(
                """async (frame) => {
                    const mp = await import('/static/js/msgpack.js');
                    const lib = await import('/static/vendor/msgpack/index.mjs');
                    const bytes = new Uint8Array(frame);
                    let truncated = null;
                    try { mp.decodeAll(bytes.subarray(0, bytes.length - 3)); }
                    catch (e) { truncated = e instanceof mp.MsgpackError ? 'MsgpackError' : e.name; }
                    let single = null;
                    try { mp.decode(bytes); } catch (e) { single = e instanceof mp.MsgpackError; }
                    return {
                      adapter: mp.decodeAll(bytes),
                      // what the pages' adapter wraps: the library's own decodeMulti
                      library: Array.from(lib.decodeMulti(bytes)),
                      buffer: mp.decodeAll(bytes.buffer),
                      truncated, single,
                    };
                }""",
                list(frame),
            )
    assert out["adapter"] == want
    assert out["library"] == want
    assert out["buffer"] == want
    # A torn frame fails as a whole (room.js logs and drops it); one-value decode refuses a batch.
    assert out["truncated"] == "MsgpackError"
    assert out["single"] is True


def test_vendored_msgpack_matches_its_checksums() -> None:
    """The vendored files are the published 3.1.3 build, unmodified (README.md says how to update)."""
    sums = (VENDOR / "SHA256SUMS").read_text().split("\n")
    listed = {}
    for line in filter(None, sums):
        digest, name = line.split(maxsplit=1)
        listed[name.removeprefix("./")] = digest
    present = {p.relative_to(VENDOR).as_posix() for p in VENDOR.rglob("*.mjs")}
    assert set(listed) == present
    for name, digest in listed.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    assert "Permission to use, copy, modify" in (VENDOR / "LICENSE").read_text()  # ISC
    assert "3.1.3" in (VENDOR / "README.md").read_text()


def test_pages_use_the_vendored_codec_only_through_the_adapter() -> None:
    """One codec: the pages import msgpack only from js/msgpack.js, which imports the vendored
    library (the hand-written codec is gone)."""
    adapter = (STATIC / "js" / "msgpack.js").read_text()
    assert 'from "../vendor/msgpack/index.mjs"' in adapter
    assert len(adapter.splitlines()) < 80
    for path in (STATIC / "js").glob("*.js"):
        if path.name == "msgpack.js":
            continue
        assert "vendor/msgpack" not in path.read_text(), path.name
