// The show's room state beyond lots and polls (docs/protocol.md: chat, moderation, Q&A,
// reactions, giveaways): fed by RoomClient from the snapshot, the log events in offset order and
// the coalesced `reactions` / `question_votes` frames; plus this page's own chat messages in
// flight (pending -> sent | refused).

export const REACTIONS = [
  { name: "heart", emoji: "❤️", label: "heart" },
  { name: "fire", emoji: "🔥", label: "fire" },
  { name: "laugh", emoji: "😂", label: "laughing face" },
  { name: "clap", emoji: "👏", label: "clapping hands" },
];

const CHAT_KEEP = 200; // messages kept in the page (the snapshot brings the last 100)
const REFUSED_KEEP = 5;

export class ShowState {
  constructor() {
    this.reset();
    this.outbox = []; // my chat messages not yet in the log: {cid, text, state, id, error}
    this.upvoted = new Set(); // question ids I upvoted (the server refuses a second one)
    this.reactionDeltas = null; // set by applyReactions: {name: new taps since the last frame}
  }

  reset() {
    this.chat = new Map(); // message id -> {id, user, name, role, text, ts, offset, question}
    this.questions = new Map(); // question id (= message id) -> {question, user, name, text, votes, status}
    this.moderators = new Set();
    this.muted = new Map(); // user -> until (server ms)
    this.banned = new Set();
    this.slowMode = 0;
    this.blockedWords = [];
    this.reactions = null; // {name: count} (cumulative)
    this.giveaway = null; // the current giveaway
    this.modLog = []; // moderation events, newest first: {type, user, by_name, until, ts}
  }

  // --- snapshot / events --------------------------------------------------------------------

  applySnapshot(msg) {
    this.reset();
    for (const m of msg.chat || []) this.chat.set(m.id, { ...m });
    for (const q of msg.questions || []) this.questions.set(q.question, { ...q });
    for (const u of msg.moderators || []) this.moderators.add(u);
    for (const [u, until] of Object.entries(msg.muted || {})) this.muted.set(u, until);
    for (const u of msg.banned || []) this.banned.add(u);
    this.slowMode = msg.slow_mode ?? 0;
    this.blockedWords = [...(msg.blocked_words || [])];
    if (msg.reactions && typeof msg.reactions === "object") this.reactions = { ...msg.reactions };
    this.giveaway = msg.giveaway ? { ...msg.giveaway } : null;
    this._settleOutbox();
  }

  /** Apply one log event; false if it is not one of ours. */
  applyEvent(e) {
    switch (e.type) {
      case "chat": {
        const { type, ...m } = e;
        this.chat.set(m.id, m);
        if (this.chat.size > CHAT_KEEP) this.chat.delete(this.chat.keys().next().value);
        this._settleOutbox();
        return true;
      }
      case "chat_redacted": // a replayed `chat` event of a message deleted since
        this.chat.delete(e.message);
        return true;
      case "chat_deleted":
        this.chat.delete(e.message);
        this.questions.delete(e.message);
        return true;
      case "question": {
        const m = this.chat.get(e.question);
        if (m) m.question = true;
        this.questions.set(e.question, {
          question: e.question, user: e.user, name: e.name, text: e.text, ts: e.ts, votes: 0, status: "open",
        });
        return true;
      }
      case "question_answered": {
        const q = this.questions.get(e.question);
        if (q) Object.assign(q, { status: "answered", votes: e.votes ?? q.votes });
        return true;
      }
      case "user_muted":
        this.muted.set(e.user, e.until);
        this._modEvent(e);
        return true;
      case "user_unmuted":
        this.muted.delete(e.user);
        this._modEvent(e);
        return true;
      case "user_banned":
        this.banned.add(e.user);
        this._modEvent(e);
        return true;
      case "user_unbanned":
        this.banned.delete(e.user);
        this._modEvent(e);
        return true;
      case "moderator_granted":
        this.moderators.add(e.user);
        this._modEvent(e);
        return true;
      case "moderator_revoked":
        this.moderators.delete(e.user);
        this._modEvent(e);
        return true;
      case "slow_mode":
        this.slowMode = e.seconds;
        this._modEvent(e);
        return true;
      case "blocked_words":
        this.blockedWords = [...(e.words || [])];
        this._modEvent(e);
        return true;
      case "giveaway_opened":
        this.giveaway = {
          giveaway: e.giveaway, item: e.item, status: "open", commitment: e.commitment,
          opened_at: e.ts, entrants: 0, entered: false,
        };
        return true;
      case "giveaway_drawn":
        if (!this.giveaway || this.giveaway.giveaway !== e.giveaway) {
          this.giveaway = { giveaway: e.giveaway, item: e.item, entered: false };
        }
        Object.assign(this.giveaway, {
          status: "drawn", item: e.item, entrants: e.entrants, eligible: e.eligible, winner: e.winner,
          winner_name: e.winner_name, seed: e.seed, commitment: e.commitment, index: e.index,
          eligible_sha1: e.eligible_sha1,
        });
        return true;
      case "giveaway_cancelled":
        if (this.giveaway && this.giveaway.giveaway === e.giveaway) this.giveaway.status = "cancelled";
        return true;
      default:
        return false;
    }
  }

  _modEvent(e) {
    this.modLog.unshift({ type: e.type, user: e.user, by: e.by, by_name: e.by_name, until: e.until,
      seconds: e.seconds, words: e.words, ts: e.ts });
    if (this.modLog.length > 50) this.modLog.length = 50;
  }

  /** A coalesced `reactions` frame: cumulative counts; remembers the taps since the last one. */
  applyReactions(counts) {
    const before = this.reactions;
    const sum = (c) => Object.values(c || {}).reduce((a, b) => a + (Number(b) || 0), 0);
    if (before && sum(counts) < sum(before)) { // counts only grow: an older frame
      this.reactionDeltas = {};
      return {};
    }
    const deltas = {};
    for (const { name } of REACTIONS) {
      const now = counts?.[name] ?? 0;
      // no animation for the first counts this page sees (they are history, not taps)
      deltas[name] = before ? Math.max(0, now - (before[name] ?? 0)) : 0;
    }
    this.reactions = { ...counts };
    this.reactionDeltas = deltas;
    return deltas;
  }

  applyQuestionVotes(votes) {
    for (const [id, n] of Object.entries(votes || {})) {
      const q = this.questions.get(id);
      if (q && q.status === "open") q.votes = n;
    }
  }

  // --- my chat messages in flight -------------------------------------------------------------

  queueChat(cid, text) {
    const entry = { cid, text, state: "pending", id: null, error: null };
    this.outbox.push(entry);
    return entry;
  }

  chatSent(entry, ack) {
    entry.state = "sent";
    entry.id = ack.message;
    this._settleOutbox();
  }

  chatRefused(entry, err) {
    entry.state = "refused";
    entry.error = { code: err.code ?? null, message: err.message, fields: err.fields || {} };
    const refused = this.outbox.filter((e) => e.state === "refused");
    if (refused.length > REFUSED_KEEP) this.dismiss(refused[0].cid);
  }

  dismiss(cid) {
    this.outbox = this.outbox.filter((e) => e.cid !== cid);
  }

  // A sent message leaves the outbox once its `chat` event is in the transcript.
  _settleOutbox() {
    this.outbox = this.outbox.filter((e) => !(e.state === "sent" && this.chat.has(e.id)));
  }

  // --- views ----------------------------------------------------------------------------------

  openQuestions() {
    return [...this.questions.values()].filter((q) => q.status === "open")
      .sort((a, b) => (b.votes ?? 0) - (a.votes ?? 0) || (a.ts ?? 0) - (b.ts ?? 0));
  }

  mutedUntil(user, now) {
    const until = user ? this.muted.get(user) : undefined;
    return until !== undefined && until > now ? until : null;
  }

  toJSON() {
    return {
      chat: [...this.chat.values()], questions: [...this.questions.values()],
      outbox: this.outbox.map(({ cid, text, state, id, error }) => ({
        cid, text, state, id, code: error?.code ?? null, message: error?.message ?? null })),
      moderators: [...this.moderators], muted: Object.fromEntries(this.muted), banned: [...this.banned],
      slowMode: this.slowMode, blockedWords: this.blockedWords, reactions: this.reactions,
      giveaway: this.giveaway, upvoted: [...this.upvoted],
    };
  }
}
