// The pages' msgpack codec: the vendored @msgpack/msgpack (../vendor/msgpack/README.md) with the
// options the room protocol (docs/protocol.md) needs. Every page module imports it from here.
//
// Integers: every integer of the protocol is within 0..2^53-1 (amounts up to 10^12, times in ms,
// offsets, cids); Python packs those above 2^32 as uint64, which decode to exact Numbers, and the
// encoder writes safe integers in their smallest format like Python's packer. A 64-bit integer
// outside the safe range decodes to a BigInt (the library's default would round it silently).
// Encoding a BigInt is refused: no client field can hold one.

import { DecodeError, Decoder, Encoder, ExtData } from "../vendor/msgpack/index.mjs";

export { ExtData as Ext };

export class MsgpackError extends Error {}

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const MIN_SAFE = BigInt(Number.MIN_SAFE_INTEGER);

class WireDecoder extends Decoder {
  readU64() {
    const v = this.readU64AsBigInt();
    return v <= MAX_SAFE ? Number(v) : v;
  }

  readI64() {
    const v = this.readI64AsBigInt();
    return v >= MIN_SAFE && v <= MAX_SAFE ? Number(v) : v;
  }
}

const decoder = new WireDecoder();
const encoder = new Encoder({ ignoreUndefined: true });

function wrap(fn) {
  try {
    return fn();
  } catch (err) {
    // Truncated input is a RangeError in the library, bad bytes a DecodeError.
    if (err instanceof RangeError || err instanceof DecodeError) {
      throw new MsgpackError(err.message, { cause: err });
    }
    throw err;
  }
}

/** Encode a value to a Uint8Array (undefined-valued keys are left out, so optional fields vanish). */
export function encode(value) {
  if (typeof value === "bigint") throw new MsgpackError("BigInt is not encodable here");
  return wrap(() => encoder.encode(value));
}

/** Decode exactly one value; trailing bytes are an error. */
export function decode(input) {
  return wrap(() => decoder.decode(input));
}

/** Decode every value of a buffer holding one or more values back to back (batched frames). */
export function decodeAll(input) {
  return wrap(() => Array.from(decoder.decodeMulti(input)));
}
