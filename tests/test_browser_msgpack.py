"""The browser's msgpack module (viewer_web/static/js/msgpack.js) against Python's msgpack, both
ways, in real Chromium."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from browser_support import PageLog, chromium, open_page, static_server

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
  2n ** 63n - 1n, -(2n ** 63n), 2n ** 64n - 1n,
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
        2**63 - 1, -(2**63), 2**64 - 1,
    ]


@pytest.mark.timeout(60)
async def test_msgpack_browser_encode_matches_python() -> None:
    log = PageLog()
    with static_server() as base:
        async with chromium() as browser:
            page = await open_page(browser, base + "/static/js/msgpack.js", log, "mp")
            js = JS_VALUES % {"ints": BOUNDARY_INTS, "strings": STRINGS}
            encoded = await page.evaluate(
                """async (src) => {
                    const mp = await import('/static/js/msgpack.js');
                    const values = eval(src);
                    return values.map((v) => Array.from(mp.encode(v)));
                }""",
                js,
            )
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
                      if (v instanceof Map) return {map: Array.from(v, ([k, x]) => [show(k), show(x)])};
                      if (v && typeof v === 'object') {
                        return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, show(x)]));
                      }
                      return v;
                    };
                    const errors = [];
                    const bads = [[0xc1], [0xa5, 0x61], [0x01, 0x02], [0xdc, 0x00], [0xa2, 0xc3, 0x28]];
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
