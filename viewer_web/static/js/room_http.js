// The room protocol over plain HTTP (docs/protocol.md, "HTTP fallback transport"), for pages
// whose WebSocket cannot connect. HttpRoomConnection looks like a WebSocket to room.js
// (readyState, send, close, onopen/onmessage/onclose/onerror), but:
//   - the first client message (hello) is the body of the stream request (`first`);
//   - onmessage gets {messages}: the decoded maps of one record (a record holds exactly what
//     one WebSocket frame would);
//   - send() queues and POSTs one message at a time, so the server sees our order.

import { decodeAll } from "./msgpack.js";

const HEADER = 4;
const SESSION_HEADER = "Lotcast-Session";

export class HttpRoomConnection {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;

  /** `base`: http(s) origin; `first`: the encoded first message (Uint8Array). */
  constructor(base, room, first) {
    this.kind = "http";
    const path = `/room/${encodeURIComponent(room)}`;
    this.url = new URL(`${path}/stream`, base).href;
    this.sendUrl = new URL(`${path}/send`, base).href;
    this.readyState = HttpRoomConnection.CONNECTING;
    this.session = null;
    this.records = 0; // records received (keepalives included)
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    this._ctrl = new AbortController();
    this._queue = [];
    this._posting = false;
    this._closeCode = null;
    this._closeReason = "";
    this._ended = false;
    this._run(first);
  }

  send(bytes) {
    if (this.readyState !== HttpRoomConnection.OPEN) throw new Error("HTTP room stream is not open");
    this._queue.push(bytes);
    this._pump();
  }

  close(code = 1000, reason = "") {
    if (this._ended) return;
    this.readyState = HttpRoomConnection.CLOSING;
    this._ctrl.abort();
    this._end(code, reason);
  }

  async _run(first) {
    let res;
    try {
      res = await fetch(this.url, {
        method: "POST", body: first, cache: "no-store", signal: this._ctrl.signal,
        headers: { "Content-Type": "application/octet-stream" },
      });
    } catch (err) {
      this._fail(`stream request failed: ${err}`);
      return;
    }
    if (res.status !== 200) {
      let why = `stream refused: HTTP ${res.status}`;
      try {
        const body = await res.json();
        why += ` ${body.code}: ${body.message}`;
      } catch {
        // no JSON body
      }
      // 503: try again (like 1013); 400/413: the request is wrong (policy, 1008).
      this._end(res.status === 503 ? 1013 : res.status === 400 || res.status === 413 ? 1008 : 1006, why);
      return;
    }
    const reader = res.body.getReader();
    let buffer = new Uint8Array(0);
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        buffer = concat(buffer, value);
        buffer = this._records(buffer);
        if (this._ended) return;
      }
    } catch (err) {
      if (!this._ended) this._fail(`stream broke: ${err}`);
      return;
    }
    this._end(this._closeCode ?? 1006, this._closeCode === null ? "stream ended without a close record" : this._closeReason);
  }

  _records(buffer) {
    let at = 0;
    while (buffer.length - at >= HEADER) {
      const view = new DataView(buffer.buffer, buffer.byteOffset + at, HEADER);
      const size = view.getUint32(0);
      if (buffer.length - at - HEADER < size) break;
      const payload = buffer.subarray(at + HEADER, at + HEADER + size);
      at += HEADER + size;
      this.records += 1;
      if (size === 0) continue; // keepalive
      let messages;
      try {
        messages = decodeAll(payload);
      } catch (err) {
        console.error("room (http): undecodable record", err);
        continue;
      }
      const rest = [];
      for (const msg of messages) {
        if (msg && msg.type === "session" && this.session === null) {
          this.session = msg.session;
          this.readyState = HttpRoomConnection.OPEN;
          if (this.onopen) this.onopen({});
        } else if (msg && msg.type === "close") {
          this._closeCode = msg.code;
          this._closeReason = msg.reason || "";
        } else {
          rest.push(msg);
        }
      }
      if (rest.length && this.onmessage && !this._ended) this.onmessage({ messages: rest });
    }
    return at ? buffer.slice(at) : buffer;
  }

  async _pump() {
    if (this._posting) return;
    this._posting = true;
    try {
      while (this._queue.length && !this._ended) {
        const body = this._queue[0];
        let res;
        try {
          res = await fetch(this.sendUrl, {
            method: "POST", body, cache: "no-store", signal: this._ctrl.signal,
            headers: { "Content-Type": "application/octet-stream", [SESSION_HEADER]: this.session },
          });
        } catch (err) {
          if (!this._ended) this._fail(`POST failed: ${err}`);
          return;
        }
        if (res.status === 429) {
          const wait = Number(res.headers.get("Retry-After")) || 1;
          await new Promise((r) => setTimeout(r, wait * 1000));
          continue; // the same message again
        }
        this._queue.shift();
        if (res.status === 404) {
          // The server no longer knows this session: the stream is over (its close follows).
          this._ctrl.abort();
          this._end(this._closeCode ?? 1006, "session unknown to the server");
          return;
        }
        // 202: queued, its answer comes on the stream. 413/400: refused; the stream says why.
      }
    } finally {
      this._posting = false;
    }
  }

  _fail(why) {
    if (this.onerror) this.onerror({ message: why });
    this._ctrl.abort();
    this._end(1006, why);
  }

  _end(code, reason) {
    if (this._ended) return;
    this._ended = true;
    this.readyState = HttpRoomConnection.CLOSED;
    this._queue = [];
    const onclose = this.onclose;
    if (onclose) setTimeout(() => onclose({ code, reason }), 0);
  }
}

function concat(a, b) {
  if (!a.length) return b;
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}
