// MessagePack (https://github.com/msgpack/msgpack/blob/master/spec.md) encoder and decoder.
//
// Small, dependency-free, and strict enough to interoperate with Python's `msgpack` package
// (packb(use_bin_type=True) / unpackb(raw=False)):
//   encode: null/undefined -> nil, booleans, integers (smallest int format; -0 -> 0),
//           non-integer numbers -> float64, BigInt -> int64/uint64, strings -> str (UTF-8),
//           Uint8Array/ArrayBuffer/DataView -> bin, Array -> array, Map/plain object -> map,
//           Ext -> ext.
//   decode: every format of the spec. int64/uint64 outside the safe-integer range become BigInt,
//           maps become plain objects (null-prototype-free, keys stringified) unless a key is not
//           a string/number, in which case a Map is returned. Unknown ext types become Ext.
//           The timestamp extension (type -1) becomes a Date. Truncated input, trailing bytes
//           and the never-used byte 0xc1 raise MsgpackError.

export class MsgpackError extends Error {}

export class Ext {
  constructor(type, data) {
    this.type = type;
    this.data = data;
  }
}

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder("utf-8", { fatal: true });
const MAX_DEPTH = 512;

class Writer {
  constructor() {
    this.buf = new Uint8Array(256);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }
  ensure(n) {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }
  u8(v) { this.ensure(1); this.view.setUint8(this.pos, v); this.pos += 1; }
  u16(v) { this.ensure(2); this.view.setUint16(this.pos, v); this.pos += 2; }
  u32(v) { this.ensure(4); this.view.setUint32(this.pos, v); this.pos += 4; }
  i8(v) { this.ensure(1); this.view.setInt8(this.pos, v); this.pos += 1; }
  i16(v) { this.ensure(2); this.view.setInt16(this.pos, v); this.pos += 2; }
  i32(v) { this.ensure(4); this.view.setInt32(this.pos, v); this.pos += 4; }
  u64(v) { this.ensure(8); this.view.setBigUint64(this.pos, v); this.pos += 8; }
  i64(v) { this.ensure(8); this.view.setBigInt64(this.pos, v); this.pos += 8; }
  f64(v) { this.ensure(8); this.view.setFloat64(this.pos, v); this.pos += 8; }
  bytes(b) { this.ensure(b.length); this.buf.set(b, this.pos); this.pos += b.length; }
  result() { return this.buf.slice(0, this.pos); }
}

function encodeInt(w, v) {
  if (v >= 0) {
    if (v < 0x80) w.u8(v);
    else if (v < 0x100) { w.u8(0xcc); w.u8(v); }
    else if (v < 0x10000) { w.u8(0xcd); w.u16(v); }
    else if (v < 0x100000000) { w.u8(0xce); w.u32(v); }
    else { w.u8(0xcf); w.u64(BigInt(v)); }
  } else {
    if (v >= -32) w.i8(v);
    else if (v >= -0x80) { w.u8(0xd0); w.i8(v); }
    else if (v >= -0x8000) { w.u8(0xd1); w.i16(v); }
    else if (v >= -0x80000000) { w.u8(0xd2); w.i32(v); }
    else { w.u8(0xd3); w.i64(BigInt(v)); }
  }
}

function encodeBigInt(w, v) {
  if (v >= -(2n ** 63n) && v < 2n ** 64n) {
    if (v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)) {
      encodeInt(w, Number(v));
    } else if (v >= 0n) {
      w.u8(0xcf); w.u64(v);
    } else {
      w.u8(0xd3); w.i64(v);
    }
    return;
  }
  throw new MsgpackError(`integer ${v} does not fit in 64 bits`);
}

function encodeStr(w, s) {
  const b = textEncoder.encode(s);
  const n = b.length;
  if (n < 32) w.u8(0xa0 | n);
  else if (n < 0x100) { w.u8(0xd9); w.u8(n); }
  else if (n < 0x10000) { w.u8(0xda); w.u16(n); }
  else if (n <= 0xffffffff) { w.u8(0xdb); w.u32(n); }
  else throw new MsgpackError("string too long");
  w.bytes(b);
}

function encodeBin(w, b) {
  const n = b.length;
  if (n < 0x100) { w.u8(0xc4); w.u8(n); }
  else if (n < 0x10000) { w.u8(0xc5); w.u16(n); }
  else if (n <= 0xffffffff) { w.u8(0xc6); w.u32(n); }
  else throw new MsgpackError("binary too long");
  w.bytes(b);
}

function encodeExt(w, ext) {
  const n = ext.data.length;
  const fixed = { 1: 0xd4, 2: 0xd5, 4: 0xd6, 8: 0xd7, 16: 0xd8 }[n];
  if (fixed !== undefined) w.u8(fixed);
  else if (n < 0x100) { w.u8(0xc7); w.u8(n); }
  else if (n < 0x10000) { w.u8(0xc8); w.u16(n); }
  else { w.u8(0xc9); w.u32(n); }
  w.i8(ext.type);
  w.bytes(ext.data);
}

function encodeHeader(w, n, fix, fixMax, c16, c32) {
  if (n <= fixMax) w.u8(fix | n);
  else if (n < 0x10000) { w.u8(c16); w.u16(n); }
  else { w.u8(c32); w.u32(n); }
}

function encodeValue(w, v, depth) {
  if (depth > MAX_DEPTH) throw new MsgpackError("value nested too deeply");
  if (v === null || v === undefined) { w.u8(0xc0); return; }
  switch (typeof v) {
    case "boolean": w.u8(v ? 0xc3 : 0xc2); return;
    case "number":
      if (Number.isSafeInteger(v)) encodeInt(w, v === 0 ? 0 : v);
      else { w.u8(0xcb); w.f64(v); }
      return;
    case "bigint": encodeBigInt(w, v); return;
    case "string": encodeStr(w, v); return;
    case "object": break;
    default: throw new MsgpackError(`cannot encode a ${typeof v}`);
  }
  if (v instanceof Uint8Array) { encodeBin(w, v); return; }
  if (v instanceof ArrayBuffer) { encodeBin(w, new Uint8Array(v)); return; }
  if (ArrayBuffer.isView(v)) { encodeBin(w, new Uint8Array(v.buffer, v.byteOffset, v.byteLength)); return; }
  if (v instanceof Ext) { encodeExt(w, v); return; }
  if (Array.isArray(v)) {
    encodeHeader(w, v.length, 0x90, 15, 0xdc, 0xdd);
    for (const item of v) encodeValue(w, item, depth + 1);
    return;
  }
  if (v instanceof Map) {
    encodeHeader(w, v.size, 0x80, 15, 0xde, 0xdf);
    for (const [k, item] of v) { encodeValue(w, k, depth + 1); encodeValue(w, item, depth + 1); }
    return;
  }
  // Plain object: undefined-valued keys are skipped (like JSON), so optional fields vanish.
  const keys = Object.keys(v).filter((k) => v[k] !== undefined);
  encodeHeader(w, keys.length, 0x80, 15, 0xde, 0xdf);
  for (const k of keys) { encodeStr(w, k); encodeValue(w, v[k], depth + 1); }
}

/** Encode a value to a Uint8Array. */
export function encode(value) {
  const w = new Writer();
  encodeValue(w, value, 0);
  return w.result();
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }
  need(n) {
    if (this.pos + n > this.bytes.length) {
      throw new MsgpackError(`truncated input: need ${n} byte(s) at offset ${this.pos}`);
    }
  }
  u8() { this.need(1); return this.view.getUint8(this.pos++); }
  i8() { this.need(1); return this.view.getInt8(this.pos++); }
  u16() { this.need(2); const v = this.view.getUint16(this.pos); this.pos += 2; return v; }
  i16() { this.need(2); const v = this.view.getInt16(this.pos); this.pos += 2; return v; }
  u32() { this.need(4); const v = this.view.getUint32(this.pos); this.pos += 4; return v; }
  i32() { this.need(4); const v = this.view.getInt32(this.pos); this.pos += 4; return v; }
  u64() {
    this.need(8); const v = this.view.getBigUint64(this.pos); this.pos += 8;
    return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  }
  i64() {
    this.need(8); const v = this.view.getBigInt64(this.pos); this.pos += 8;
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  }
  f32() { this.need(4); const v = this.view.getFloat32(this.pos); this.pos += 4; return v; }
  f64() { this.need(8); const v = this.view.getFloat64(this.pos); this.pos += 8; return v; }
  take(n) { this.need(n); const b = this.bytes.slice(this.pos, this.pos + n); this.pos += n; return b; }
  str(n) {
    this.need(n);
    const sub = this.bytes.subarray(this.pos, this.pos + n);
    this.pos += n;
    try {
      return textDecoder.decode(sub);
    } catch {
      throw new MsgpackError("invalid UTF-8 in str");
    }
  }
}

function decodeTimestamp(data) {
  const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (data.length === 4) return new Date(v.getUint32(0) * 1000);
  if (data.length === 8) {
    const hi = v.getUint32(0);
    const lo = v.getUint32(4);
    const nsec = hi >>> 2;
    const sec = (hi & 0x3) * 0x100000000 + lo;
    return new Date(sec * 1000 + nsec / 1e6);
  }
  if (data.length === 12) {
    const nsec = v.getUint32(0);
    const sec = Number(v.getBigInt64(4));
    return new Date(sec * 1000 + nsec / 1e6);
  }
  throw new MsgpackError(`bad timestamp length ${data.length}`);
}

function decodeExt(r, n) {
  const type = r.i8();
  const data = r.take(n);
  return type === -1 ? decodeTimestamp(data) : new Ext(type, data);
}

function decodeArray(r, n, depth) {
  const out = new Array(n);
  for (let i = 0; i < n; i++) out[i] = decodeValue(r, depth + 1);
  return out;
}

function decodeMap(r, n, depth) {
  const entries = [];
  let plain = true;
  for (let i = 0; i < n; i++) {
    const k = decodeValue(r, depth + 1);
    const v = decodeValue(r, depth + 1);
    if (typeof k !== "string" && typeof k !== "number") plain = false;
    entries.push([k, v]);
  }
  if (!plain) return new Map(entries);
  const obj = {};
  for (const [k, v] of entries) {
    // defineProperty so a "__proto__" key is stored as data, never as the prototype.
    Object.defineProperty(obj, String(k), { value: v, enumerable: true, writable: true, configurable: true });
  }
  return obj;
}

function decodeValue(r, depth) {
  if (depth > MAX_DEPTH) throw new MsgpackError("input nested too deeply");
  const b = r.u8();
  if (b <= 0x7f) return b;
  if (b >= 0xe0) return b - 0x100;
  if ((b & 0xf0) === 0x80) return decodeMap(r, b & 0x0f, depth);
  if ((b & 0xf0) === 0x90) return decodeArray(r, b & 0x0f, depth);
  if ((b & 0xe0) === 0xa0) return r.str(b & 0x1f);
  switch (b) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return r.take(r.u8());
    case 0xc5: return r.take(r.u16());
    case 0xc6: return r.take(r.u32());
    case 0xc7: return decodeExt(r, r.u8());
    case 0xc8: return decodeExt(r, r.u16());
    case 0xc9: return decodeExt(r, r.u32());
    case 0xca: return r.f32();
    case 0xcb: return r.f64();
    case 0xcc: return r.u8();
    case 0xcd: return r.u16();
    case 0xce: return r.u32();
    case 0xcf: return r.u64();
    case 0xd0: return r.i8();
    case 0xd1: return r.i16();
    case 0xd2: return r.i32();
    case 0xd3: return r.i64();
    case 0xd4: return decodeExt(r, 1);
    case 0xd5: return decodeExt(r, 2);
    case 0xd6: return decodeExt(r, 4);
    case 0xd7: return decodeExt(r, 8);
    case 0xd8: return decodeExt(r, 16);
    case 0xd9: return r.str(r.u8());
    case 0xda: return r.str(r.u16());
    case 0xdb: return r.str(r.u32());
    case 0xdc: return decodeArray(r, r.u16(), depth);
    case 0xdd: return decodeArray(r, r.u32(), depth);
    case 0xde: return decodeMap(r, r.u16(), depth);
    case 0xdf: return decodeMap(r, r.u32(), depth);
    default: throw new MsgpackError(`invalid byte 0x${b.toString(16)} at offset ${r.pos - 1}`);
  }
}

function toBytes(input) {
  if (input instanceof Uint8Array) return input;
  if (input instanceof ArrayBuffer) return new Uint8Array(input);
  if (ArrayBuffer.isView(input)) return new Uint8Array(input.buffer, input.byteOffset, input.byteLength);
  throw new MsgpackError("decode() needs a Uint8Array or ArrayBuffer");
}

/** Decode exactly one value; trailing bytes are an error. */
export function decode(input) {
  const r = new Reader(toBytes(input));
  const value = decodeValue(r, 0);
  if (r.pos !== r.bytes.length) {
    throw new MsgpackError(`${r.bytes.length - r.pos} trailing byte(s) after the value`);
  }
  return value;
}

/** Decode every value of a buffer holding one or more values back to back (batched frames). */
export function decodeAll(input) {
  const r = new Reader(toBytes(input));
  const values = [];
  while (r.pos < r.bytes.length) values.push(decodeValue(r, 0));
  return values;
}
