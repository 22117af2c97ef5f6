// Client for the interactive WebSocket protocol (docs/protocol.md, version 1).
//
// One RoomClient per page. It keeps the room state (lots, polls, viewer count) by applying the
// room log exactly once in offset order, reconnects by itself with backoff and resumes with its
// last (epoch, offset), so after a drop it holds exactly the state it would have had.
// A WebSocket that cannot connect, or says nothing within FIRST_FRAME_MS of its hello, is replaced
// by the HTTP fallback transport (room_http.js) with the same protocol; the page stays on it.
//
// Events (EventTarget):
//   "change"   {}                        state changed (coalesced to one per task)
//   "status"   {status, detail}          connecting | open | reconnecting | closed | failed
//   "logevent" {event, replay}           one room-log event, after it was applied
//   "moved"    {code, reason, url}       the node is going away (close 1001 / `reconnect` message):
//                                        the page should re-run placement, then the socket follows
//   "welcome"  {message}
//   "authfailed" {reason}                the token was refused (4501); now watching anonymously
//   "banned"   {reason}                  this user is banned from the room (4503); now watching
//                                        anonymously
//   "reactions" {deltas}                 a coalesced `reactions` frame: new taps per reaction

import { decodeAll, encode } from "./msgpack.js";
import { HttpRoomConnection } from "./room_http.js";
import { ShowState } from "./show_state.js";

const BACKOFF_S = [0.25, 0.5, 1, 2, 4];
const PING_INTERVAL_MS = 10000;
const REQUEST_TIMEOUT_MS = 10000;
const FIRST_FRAME_MS = 5000; // a WebSocket silent this long after its hello counts as blocked

export class RequestError extends Error {
  constructor(message, code, fields = {}) {
    super(message);
    this.code = code;
    this.fields = fields;
  }
}

function randomKey() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class RoomClient extends EventTarget {
  /**
   * @param {{room: string, token?: string|null, baseUrl?: () => string}} opts
   * `baseUrl()` returns the http(s) origin of the node to connect to (called on every connect,
   * so the socket follows the media to another relay).
   */
  constructor(opts) {
    super();
    this.room = opts.room;
    this.token = opts.token || null;
    this.baseUrl = opts.baseUrl || (() => location.origin);
    // Room state.
    this.epoch = null;
    this.offset = null; // last applied log offset
    this.lots = new Map(); // lot id -> Lot (insertion order = creation order)
    this.polls = new Map();
    this.viewers = null;
    this.myBidLots = new Set(); // lots I placed a bid on (for "outbid")
    this.myVotes = new Map(); // poll id -> option
    this.myPrebids = new Map(); // lot id -> my pre-bid max (the server never says it back)
    this.show = new ShowState(); // chat, moderation, Q&A, reactions, giveaway
    this.bannedReason = null; // set when the server closed us with 4503
    // Connection state.
    this.identity = null; // {role, user, name} from welcome
    this.node = null;
    this.status = "idle";
    this.statusDetail = "";
    this.ws = null; // the connection: a WebSocket or an HttpRoomConnection
    this.url = null;
    this.transport = opts.transport || "websocket"; // the transport of the next connection
    this.fallbacks = 0; // times a failed WebSocket made us switch to HTTP
    this.clockOffsetMs = 0; // server_ts - local time
    this.connects = 0;
    this.resumes = 0; // reconnects answered with a replay
    this.snapshots = 0;
    this.eventsApplied = 0;
    this.lastError = null;
    this.lastClose = null;
    this.authError = null; // why the last token was refused (4501), if it was
    this._cid = 0;
    this._pending = new Map(); // cid -> {resolve, reject, type, fields, timer}
    this._attempt = 0;
    this._stopped = true;
    this._timer = null;
    this._pingTimer = null;
    this._firstFrameTimer = null;
    this._changeQueued = false;
    this._awaitingSnapshot = false;
  }

  // --- lifecycle ---------------------------------------------------------------------------

  start() {
    this._stopped = false;
    this._connect();
  }

  stop() {
    this._stopped = true;
    clearTimeout(this._timer);
    clearInterval(this._pingTimer);
    if (this.ws) this.ws.close(1000, "bye");
    this.ws = null;
    this._setStatus("closed");
  }

  /** Change credentials (e.g. a bidder token typed in) and reconnect, keeping the room state. */
  setToken(token) {
    this.token = token || null;
    this.authError = null;
    this.bannedReason = null;
    this.reconnectNow("new token");
  }

  /** Drop the socket and reconnect at once (to `baseUrl()`), resuming from our offset. */
  reconnectNow(reason = "reconnect") {
    if (this._stopped) return;
    clearTimeout(this._timer);
    this._attempt = 0;
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      ws.close(1000, reason);
    }
    this._failPending(false);
    this._connect();
  }

  /** Simulate a network drop (tests, demos): close the socket, stay away `ms`, then resume. */
  dropFor(ms) {
    if (this._stopped) return;
    clearTimeout(this._timer);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      ws.close(4000, "simulated drop");
    }
    clearInterval(this._pingTimer);
    this._failPending(false);
    this._setStatus("reconnecting", `offline for ${ms} ms`);
    this._timer = setTimeout(() => this._connect(), ms);
  }

  _setStatus(status, detail = "") {
    if (status === this.status && detail === this.statusDetail) return;
    this.status = status;
    this.statusDetail = detail;
    this.dispatchEvent(new CustomEvent("status", { detail: { status, detail } }));
  }

  _wsUrl() {
    const base = new URL(this.baseUrl(), location.href);
    base.protocol = base.protocol === "https:" ? "wss:" : "ws:";
    base.pathname = `/ws/${encodeURIComponent(this.room)}`;
    base.search = "";
    base.hash = "";
    return base.href;
  }

  _hello() {
    const hello = { type: "hello", cid: this._nextCid() };
    if (this.token) hello.token = this.token;
    if (this.epoch !== null && this.offset !== null && !this._awaitingSnapshot) {
      hello.epoch = this.epoch;
      hello.offset = this.offset;
    }
    return hello;
  }

  _connect() {
    if (this._stopped) return;
    clearInterval(this._pingTimer);
    clearTimeout(this._firstFrameTimer);
    this.connects += 1;
    const http = this.transport === "http";
    let ws;
    try {
      if (http) {
        ws = new HttpRoomConnection(new URL(this.baseUrl(), location.href).origin, this.room,
          encode(this._hello()));
        this.url = ws.url;
      } else {
        this.url = this._wsUrl();
        ws = new WebSocket(this.url);
        ws.binaryType = "arraybuffer";
      }
    } catch (err) {
      this.lastError = String(err);
      this._scheduleReconnect();
      return;
    }
    this._setStatus(this.connects === 1 ? "connecting" : "reconnecting", this.url);
    this.ws = ws;
    let frames = 0;
    ws.onopen = () => {
      if (http) return; // the hello was the stream request's body
      this._sendRaw(this._hello());
      this._firstFrameTimer = setTimeout(() => {
        if (ws !== this.ws || frames > 0) return;
        // Upgraded, but nothing comes through (a proxy that swallows frames): treat as refused.
        ws.onclose = null;
        ws.onmessage = null;
        ws.close(4000, "no frames");
        this._transportFailed(ws, 1006, `no frame within ${FIRST_FRAME_MS} ms of hello`);
      }, FIRST_FRAME_MS);
    };
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      frames += 1;
      let messages = ev.messages;
      if (!messages) {
        if (typeof ev.data === "string") {
          console.warn("room: ignoring text frame");
          return;
        }
        try {
          messages = decodeAll(new Uint8Array(ev.data));
        } catch (err) {
          console.error("room: undecodable frame", err);
          return;
        }
      }
      for (const msg of messages) this._handle(msg);
    };
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      if (frames === 0 && !this._stopped && ev.code !== 1000) {
        this._transportFailed(ws, ev.code, ev.reason);
        return;
      }
      this.ws = null;
      clearInterval(this._pingTimer);
      clearTimeout(this._firstFrameTimer);
      this.lastClose = { code: ev.code, reason: ev.reason };
      this._failPending(false);
      if (this._stopped) return;
      this._onClose(ev.code, ev.reason);
    };
    ws.onerror = (ev) => { this.lastError = ev?.message || `${http ? "HTTP stream" : "WebSocket"} error on ${this.url}`; };
  }

  /** A connection that failed before its first frame: switch transports (a blocked WebSocket
   * goes to HTTP at once; an HTTP stream that failed tries the WebSocket again, with backoff). */
  _transportFailed(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    clearInterval(this._pingTimer);
    clearTimeout(this._firstFrameTimer);
    this.lastClose = { code, reason };
    this._failPending(false);
    if (this._stopped) return;
    if (this.transport === "websocket") {
      this.transport = "http";
      this.fallbacks += 1;
      console.warn(`room: WebSocket failed before its first frame (${code}${reason ? ` ${reason}` : ""}); falling back to HTTP`);
      this._setStatus("reconnecting", "WebSocket blocked; trying HTTP");
      clearTimeout(this._timer);
      this._timer = setTimeout(() => this._connect(), 0);
      return;
    }
    this.transport = "websocket";
    this._scheduleReconnect(0, `HTTP stream failed (${code}${reason ? ` ${reason}` : ""})`);
  }

  _onClose(code, reason) {
    if (code === 4501) {
      // Terminal for these credentials: keep watching anonymously until a new token is given.
      this.authError = reason || this.lastError || "token rejected";
      if (this.token) {
        this.token = null;
        this._setStatus("reconnecting", `token rejected (${this.authError}); watching anonymously`);
        this.dispatchEvent(new CustomEvent("authfailed", { detail: { reason: this.authError } }));
        clearTimeout(this._timer);
        this._timer = setTimeout(() => this._connect(), 500);
      } else {
        this._setStatus("failed", `authentication failed: ${this.authError}`);
      }
      return;
    }
    if (code === 4503) {
      // Banned from this room: its chat, bids and votes are closed to this user; the page keeps
      // watching anonymously (anyone may), and a new token may be given.
      this.bannedReason = reason || "banned from this room";
      this.token = null;
      this._setStatus("reconnecting", `banned (${this.bannedReason}); watching anonymously`);
      this.dispatchEvent(new CustomEvent("banned", { detail: { reason: this.bannedReason } }));
      clearTimeout(this._timer);
      this._timer = setTimeout(() => this._connect(), 500);
      return;
    }
    if (code === 4010) {
      this._resetState();
    }
    let minDelay = code === 4029 ? 5 : 0;
    if (code === 1001) {
      // Node going away (drain/shutdown): the page re-places the media and calls reconnectNow()
      // once it knows the new relay; if that takes long we reconnect to baseUrl() anyway.
      this.dispatchEvent(new CustomEvent("moved", { detail: { code, reason } }));
      minDelay = 2;
    }
    this._scheduleReconnect(minDelay, `closed ${code}${reason ? ` (${reason})` : ""}`);
  }

  _scheduleReconnect(minDelayS = 0, why = "") {
    if (this._stopped) return;
    const base = BACKOFF_S[Math.min(this._attempt, BACKOFF_S.length - 1)];
    this._attempt += 1;
    const delay = Math.max(minDelayS, base * (0.8 + Math.random() * 0.4));
    this._setStatus("reconnecting", `${why}; retrying in ${delay.toFixed(2)} s`);
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._connect(), delay * 1000);
  }

  _resetState() {
    this.epoch = null;
    this.offset = null;
    this.lots.clear();
    this.polls.clear();
    this.show.reset();
    this._awaitingSnapshot = false;
    this._changed();
  }

  // --- requests ------------------------------------------------------------------------------

  _nextCid() {
    this._cid += 1;
    return `c${this._cid}`;
  }

  _sendRaw(msg) {
    if (!this.ws || this.ws.readyState !== 1) return false; // OPEN, for both transports
    this.ws.send(encode(msg));
    return true;
  }

  /**
   * Send a request; resolves with the `ack` map, rejects with RequestError(code) on `error`.
   * Bids carry an idempotency key and are re-sent with the same key after a reconnect.
   */
  request(type, fields = {}) {
    return new Promise((resolve, reject) => {
      const cid = this._nextCid();
      const msg = { type, cid, ...fields };
      const retry = type === "bid";
      if (retry && !msg.key) msg.key = randomKey();
      const entry = { resolve, reject, msg, retry, timer: null };
      entry.timer = setTimeout(() => {
        this._pending.delete(cid);
        reject(new RequestError(`no answer to ${type} within ${REQUEST_TIMEOUT_MS / 1000} s`, "timeout"));
      }, REQUEST_TIMEOUT_MS);
      this._pending.set(cid, entry);
      if (!this.identity || !this._sendRaw(msg)) {
        if (!retry) {
          this._pending.delete(cid);
          clearTimeout(entry.timer);
          reject(new RequestError("not connected", "not_connected"));
        }
        // a bid waits for the next welcome and is sent then
      }
    });
  }

  _failPending(all) {
    for (const [cid, entry] of this._pending) {
      if (entry.retry && !all) continue;
      clearTimeout(entry.timer);
      this._pending.delete(cid);
      entry.reject(new RequestError("connection lost before the server answered", "disconnected"));
    }
  }

  _resendPending() {
    for (const entry of this._pending.values()) {
      if (entry.retry) this._sendRaw(entry.msg);
    }
  }

  bid(lot, amount, max = null) {
    const fields = { lot, amount };
    if (max !== null && max !== undefined) fields.max = max;
    return this.request("bid", fields).then((ack) => {
      this.myBidLots.add(lot);
      this._saveMine();
      this._changed();
      return ack;
    });
  }

  /** A max pre-bid on a draft lot (docs/protocol.md "Pre-bids"); a new max replaces mine. */
  prebid(lot, max) {
    return this.request("prebid", { lot, max }).then((ack) => {
      this.myPrebids.set(lot, ack.max ?? max);
      this._saveMine();
      const l = this.lots.get(lot);
      if (l && typeof ack.prebids === "number") l.prebids = ack.prebids;
      this._changed();
      return ack;
    }, (err) => {
      if (err.code === "muted" && this.identity?.user && typeof err.fields?.until === "number") {
        this.show.muted.set(this.identity.user, err.fields.until);
        this._changed();
      }
      throw err;
    });
  }

  vote(poll, option) {
    return this.request("vote", { poll, option }).then((ack) => {
      this.myVotes.set(poll, option);
      this._saveMine();
      this._changed();
      return ack;
    }, (err) => {
      if (err.code === "duplicate_vote" && !this.myVotes.has(poll)) {
        this.myVotes.set(poll, null);
        this._saveMine();
      }
      this._changed();
      throw err;
    });
  }

  // --- chat, Q&A, reactions, giveaway (state in this.show) --------------------------------------

  /** Post a chat message; its outbox entry goes pending -> sent | refused (with the error). */
  sendChat(text) {
    this._outboxSeq = (this._outboxSeq || 0) + 1;
    const entry = this.show.queueChat(`o${this._outboxSeq}`, text);
    this._changed();
    return this.request("chat", { text }).then((ack) => {
      this.show.chatSent(entry, ack);
      this._changed();
      return ack;
    }, (err) => {
      this.show.chatRefused(entry, err);
      if (err.code === "muted" && this.identity?.user && typeof err.fields?.until === "number") {
        this.show.muted.set(this.identity.user, err.fields.until);
      }
      this._changed();
      throw err;
    });
  }

  react(reaction) {
    return this.request("react", { reaction });
  }

  upvote(question) {
    return this.request("question_upvote", { question }).then((ack) => {
      this.show.upvoted.add(question);
      this._changed();
      return ack;
    }, (err) => {
      if (err.code === "duplicate_upvote") this.show.upvoted.add(question);
      this._changed();
      throw err;
    });
  }

  enterGiveaway(giveaway) {
    const mark = () => {
      const g = this.show.giveaway;
      if (g && g.giveaway === giveaway) g.entered = true;
      this._changed();
    };
    return this.request("giveaway_enter", { giveaway }).then((ack) => {
      mark();
      if (this.show.giveaway && typeof ack.entrants === "number") this.show.giveaway.entrants = ack.entrants;
      return ack;
    }, (err) => {
      if (err.code === "duplicate_entry") mark();
      throw err;
    });
  }

  /** Host and moderators (the host may grant or revoke it live). */
  canModerate() {
    const who = this.identity;
    if (!who || !who.user) return false;
    if (who.role === "host") return true;
    return this.show.moderators.has(who.user);
  }

  // --- server messages -------------------------------------------------------------------------

  _handle(msg) {
    if (!msg || typeof msg !== "object") return;
    const type = msg.type;
    if (type === "welcome") return this._onWelcome(msg);
    if (type === "snapshot") return this._onSnapshot(msg);
    if (type === "events") return this._onEvents(msg);
    if (type === "reconnect" || type === "drain") {
      this.dispatchEvent(new CustomEvent("moved", { detail: { code: 0, reason: type, url: msg.url } }));
      return;
    }
    if (type === "republish") {
      // For the host page: the origin it publishes to is draining (docs/protocol.md).
      this.dispatchEvent(new CustomEvent("republish", { detail: { stream: msg.stream, whipUrl: msg.whip_url } }));
      return;
    }
    if (msg.epoch !== undefined && this.epoch !== null && msg.epoch !== this.epoch &&
        type !== "ack" && type !== "error") {
      // The log was reset; the server sends a snapshot next.
      this._awaitingSnapshot = true;
    }
    if (type === "tally") {
      const poll = this.polls.get(msg.poll);
      if (poll && poll.status === "open" && (msg.total ?? 0) >= (poll.total ?? 0)) {
        poll.counts = msg.counts;
        poll.total = msg.total ?? msg.counts.reduce((a, b) => a + b, 0);
        this._changed();
      }
      return;
    }
    if (type === "reactions") {
      const deltas = this.show.applyReactions(msg.counts);
      this.dispatchEvent(new CustomEvent("reactions", { detail: { deltas } }));
      this._changed();
      return;
    }
    if (type === "question_votes") {
      this.show.applyQuestionVotes(msg.votes);
      this._changed();
      return;
    }
    if (type === "viewers") {
      this.viewers = msg.count;
      this._changed();
      return;
    }
    if (type === "pong") {
      if (typeof msg.ts === "number" && typeof msg.server_ts === "number") {
        const now = Date.now();
        this.clockOffsetMs = msg.server_ts + (now - msg.ts) / 2 - now;
      }
      return;
    }
    if (type === "ack" || type === "error") {
      const entry = msg.cid !== null && msg.cid !== undefined ? this._pending.get(msg.cid) : null;
      if (type === "error") this.lastError = `${msg.code}: ${msg.message}`;
      if (!entry) {
        if (type === "error") console.warn("room error", msg);
        return;
      }
      this._pending.delete(msg.cid);
      clearTimeout(entry.timer);
      if (type === "ack") entry.resolve(msg);
      else entry.reject(new RequestError(msg.message || msg.code, msg.code, msg));
    }
  }

  // "My" bids and votes survive a page reload (sessionStorage, per room, user and log epoch):
  // a snapshot does not say who bid, and "outbid" needs to know that I did.
  _mineKey() {
    return this.identity?.user ? `lotcast.mine.${this.room}.${this.identity.user}` : null;
  }

  _loadMine(epoch) {
    const key = this._mineKey();
    if (!key) return;
    try {
      const saved = JSON.parse(sessionStorage.getItem(key) || "null");
      if (!saved || saved.epoch !== epoch) return;
      for (const lot of saved.bids || []) this.myBidLots.add(lot);
      for (const [lot, max] of Object.entries(saved.prebids || {})) {
        if (!this.myPrebids.has(lot)) this.myPrebids.set(lot, max);
      }
      for (const [poll, option] of Object.entries(saved.votes || {})) {
        if (!this.myVotes.has(poll)) this.myVotes.set(poll, option);
      }
    } catch {
      // storage unavailable or corrupt: start empty
    }
  }

  _saveMine() {
    const key = this._mineKey();
    if (!key || this.epoch === null) return;
    try {
      sessionStorage.setItem(key, JSON.stringify({
        epoch: this.epoch, bids: [...this.myBidLots], votes: Object.fromEntries(this.myVotes),
        prebids: Object.fromEntries(this.myPrebids),
      }));
    } catch {
      // ignore
    }
  }

  _onWelcome(msg) {
    if ((this.identity?.user ?? null) !== (msg.user ?? null)) {
      this.myBidLots.clear(); // someone else signed in on this page
      this.myVotes.clear();
      this.myPrebids.clear();
    }
    this.identity = { role: msg.role, user: msg.user ?? null, name: msg.name ?? null };
    this._loadMine(msg.epoch);
    this.node = msg.node ?? null;
    if (typeof msg.server_ts === "number") this.clockOffsetMs = msg.server_ts - Date.now();
    if (this.epoch !== null && msg.epoch !== this.epoch) this._awaitingSnapshot = true;
    this._attempt = 0;
    clearTimeout(this._firstFrameTimer);
    this._setStatus("open", this.url);
    this.dispatchEvent(new CustomEvent("welcome", { detail: { message: msg } }));
    clearInterval(this._pingTimer);
    this._pingTimer = setInterval(() => this._sendRaw({ type: "ping", cid: this._nextCid(), ts: Date.now() }),
      PING_INTERVAL_MS);
    this._resendPending();
    this._changed();
  }

  _onSnapshot(msg) {
    this.epoch = msg.epoch;
    this.offset = msg.offset;
    this._awaitingSnapshot = false;
    this.snapshots += 1;
    this.lots.clear();
    for (const lot of msg.lots || []) this.lots.set(lot.lot, { ...lot });
    this.polls.clear();
    for (const poll of msg.polls || []) this.polls.set(poll.poll, { ...poll });
    this.show.applySnapshot(msg);
    if (typeof msg.viewers === "number") this.viewers = msg.viewers;
    if (typeof msg.server_ts === "number") this.clockOffsetMs = msg.server_ts - Date.now();
    this._changed();
  }

  _onEvents(msg) {
    if (this._awaitingSnapshot || (this.epoch !== null && msg.epoch !== this.epoch)) {
      this._awaitingSnapshot = true;
      return;
    }
    if (msg.replay) this.resumes += 1;
    if (this.epoch === null) {
      // Events before any snapshot: we have no base state to apply them to.
      return;
    }
    for (const event of msg.events || []) {
      if (event.offset <= this.offset) continue; // overlap between replay and live delivery
      if (event.offset !== this.offset + 1) {
        console.warn(`room: gap in the log (have ${this.offset}, got ${event.offset}); resyncing`);
        this.reconnectNow("gap");
        return;
      }
      this._apply(event);
      this.offset = event.offset;
      this.eventsApplied += 1;
      this.dispatchEvent(new CustomEvent("logevent", { detail: { event, replay: !!msg.replay } }));
    }
    this._changed();
  }

  _apply(e) {
    const lot = e.lot !== undefined ? this.lots.get(e.lot) : null;
    switch (e.type) {
      case "lot_created": {
        const { type, offset, ts, ...fields } = e;
        this.lots.set(e.lot, { ...fields, status: fields.status || "draft", bids: fields.bids ?? 0 });
        if (fields.rerun_of && this.lots.has(fields.rerun_of)) this.lots.get(fields.rerun_of).rerun = e.lot;
        break;
      }
      case "prebid":
        if (lot) lot.prebids = e.prebids;
        break;
      case "lot_opened":
        if (lot) Object.assign(lot, { status: "open", ends_at: e.ends_at, next_min: e.next_min ?? lot.next_min });
        break;
      case "bid":
        if (lot) {
          Object.assign(lot, {
            price: e.price, leader: e.leader, leader_name: e.leader_name, next_min: e.next_min,
            bids: e.bids, reserve_met: e.reserve_met, ends_at: e.ends_at ?? lot.ends_at,
          });
          lot.last_bid = { bidder: e.bidder, bidder_name: e.bidder_name, amount: e.amount, ts: e.ts };
        }
        if (this.identity?.user && e.bidder === this.identity.user && !this.myBidLots.has(e.lot)) {
          this.myBidLots.add(e.lot);
          this._saveMine();
        }
        break;
      case "lot_extended":
        if (lot) lot.ends_at = e.ends_at;
        break;
      case "lot_sold":
        if (lot) {
          Object.assign(lot, {
            status: "sold", winner: e.winner, winner_name: e.winner_name, price: e.price,
            leader: e.winner, leader_name: e.winner_name, sold_by: e.by,
          });
        }
        break;
      case "lot_unsold":
        if (lot) Object.assign(lot, { status: "unsold", reason: e.reason, sold_by: e.by });
        break;
      case "poll_opened":
        this.polls.set(e.poll, {
          poll: e.poll, question: e.question, options: e.options, status: "open", ends_at: e.ends_at,
          counts: e.options.map(() => 0), total: 0,
        });
        break;
      case "poll_closed": {
        const poll = this.polls.get(e.poll);
        if (poll) Object.assign(poll, { status: "closed", counts: e.counts, total: e.total });
        break;
      }
      default:
        if (!this.show.applyEvent(e)) console.warn("room: unknown log event", e.type);
    }
  }

  _changed() {
    if (this._changeQueued) return;
    this._changeQueued = true;
    setTimeout(() => {
      this._changeQueued = false;
      this.dispatchEvent(new CustomEvent("change"));
    }, 0);
  }

  // --- views of the state --------------------------------------------------------------------

  /** Server-clock "now" in ms (for countdowns). */
  serverNow() {
    return Date.now() + this.clockOffsetMs;
  }

  /** The lot a viewer should see: the newest open one, else the newest non-draft one. */
  currentLot() {
    const lots = [...this.lots.values()];
    const open = lots.filter((l) => l.status === "open");
    if (open.length) return open[open.length - 1];
    const shown = lots.filter((l) => l.status !== "draft");
    return shown.length ? shown[shown.length - 1] : null;
  }

  currentPoll() {
    const polls = [...this.polls.values()];
    const open = polls.filter((p) => p.status === "open");
    if (open.length) return open[open.length - 1];
    return polls.length ? polls[polls.length - 1] : null;
  }

  /** winning | outbid | won | lost | null (never bid) for the signed-in bidder. */
  myStatus(lot) {
    const me = this.identity?.user;
    if (!lot || !me) return null;
    const bid = this.myBidLots.has(lot.lot);
    if (lot.status === "sold") {
      if (lot.winner === me) return "won";
      return bid ? "lost" : null;
    }
    if (lot.status === "unsold") return bid ? "lost" : null;
    if (lot.leader === me) return "winning";
    return bid ? "outbid" : null;
  }

  /** A JSON-friendly copy of the state, for tests. */
  snapshot() {
    return {
      epoch: this.epoch, offset: this.offset, viewers: this.viewers, status: this.status,
      identity: this.identity, node: this.node, url: this.url,
      transport: this.ws?.kind === "http" ? "http" : this.ws ? "websocket" : this.transport,
      fallbacks: this.fallbacks,
      lots: [...this.lots.values()], polls: [...this.polls.values()],
      myPrebids: Object.fromEntries(this.myPrebids),
      show: this.show.toJSON(), banned: this.bannedReason,
      connects: this.connects, resumes: this.resumes, snapshots: this.snapshots,
      eventsApplied: this.eventsApplied,
    };
  }
}
