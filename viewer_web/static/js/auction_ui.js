// Shared auction/poll helpers for the viewer page and the host console.

import { formatMoney } from "./params.js";

/** increment(p): the increment of the last row whose threshold <= p (docs/protocol.md). */
export function incrementAt(increments, price) {
  let step = increments?.[0]?.[1] ?? 1;
  for (const [threshold, inc] of increments || []) {
    if (threshold <= price) step = inc;
  }
  return step;
}

/** The three quick-bid amounts: next_min, then one and two increments above it. */
export function quickBids(lot) {
  const first = lot.next_min ?? lot.start_price;
  const second = first + incrementAt(lot.increments, first);
  const third = second + incrementAt(lot.increments, second);
  return [first, second, third];
}

export function formatCountdown(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms <= 0) return "0:00";
  const total = Math.ceil(ms / 1000);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const mm = h ? String(m).padStart(2, "0") : String(m);
  return `${h ? `${h}:` : ""}${mm}:${String(s).padStart(2, "0")}`;
}

const REASONS = {
  bid_too_low: (e) => `Too low: the minimum bid is ${formatMoney(e.fields?.min)}.`,
  lot_ended: () => "Too late: the lot has ended.",
  lot_closed: () => "The lot is closed.",
  lot_not_open: () => "The lot is not open yet.",
  unknown_lot: () => "That lot does not exist.",
  rate_limited: (e) => `Slow down: try again in ${Math.ceil((e.fields?.retry_ms ?? 1000) / 1000)} s.`,
  forbidden: () => "Your token may not do this (bidding needs a bidder token).",
  max_below_amount: () => "Your max bid must be at least your bid.",
  amount_not_positive: () => "Enter a positive amount.",
  amount_not_integer: () => "Enter an amount in whole cents.",
  amount_too_large: () => "That amount is too large.",
  duplicate_vote: () => "You already voted in this poll.",
  poll_closed: () => "The poll is closed.",
  bad_option: () => "That option does not exist.",
  unavailable: () => "The auction service is unavailable; try again.",
  // chat, moderation, Q&A
  muted: (e) => `You are muted until ${clockTime(e.fields?.until)}.`,
  banned: () => "You are banned from this room.",
  slow_mode: (e) => `Slow mode: one message every ${e.fields?.seconds ?? "few"} s; try again in ${Math.ceil((e.fields?.retry_ms ?? 1000) / 1000)} s.`,
  blocked_word: (e) => `Not sent: "${e.fields?.word ?? "a word"}" is not allowed in this chat.`,
  unknown_message: () => "That message is gone (deleted, or too old).",
  unknown_question: () => "That question is gone.",
  duplicate_upvote: () => "You already upvoted this question.",
  own_question: () => "You can't upvote your own question.",
  invalid_state: (e) => `Not possible now (it is ${e.fields?.state ?? "in another state"}).`,
  // giveaways, pre-bids, re-run
  duplicate_entry: () => "You are already in this giveaway.",
  giveaway_closed: (e) => `The giveaway is ${e.fields?.state ?? "closed"}.`,
  giveaway_full: () => "The giveaway is full.",
  unknown_giveaway: () => "That giveaway does not exist.",
  giveaway_in_progress: () => "A giveaway is still open: draw or cancel it first.",
  lot_is_open: () => "A lot is open: giveaways run between lots.",
  no_eligible_entrants: () => "None of the entrants is connected right now.",
  not_drawn: () => "The giveaway has not been drawn yet.",
  already_rerun: (e) => `This lot was already re-run (${e.fields?.rerun ?? "as a new lot"}).`,
  disconnected: () => "Connection lost before the server answered.",
  not_connected: () => "Not connected to the room yet.",
  timeout: () => "No answer from the server.",
};

function clockTime(ms) {
  if (typeof ms !== "number") return "later";
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/** A readable reason for a RequestError (falls back to the server's precise message). */
export function reasonText(err) {
  const make = REASONS[err.code];
  const text = make ? make(err) : err.message;
  return err.code ? `${text} (${err.code})` : text;
}

export function lotResultText(lot) {
  if (lot.status === "sold") {
    const how = lot.sold_by === "buy_now" ? " (buy-it-now)" : "";
    return `Sold to ${lot.winner_name || lot.winner} at ${formatMoney(lot.price)}${how}`;
  }
  if (lot.status === "unsold") {
    return lot.reason === "reserve_not_met" ? "Reserve not met — not sold" : "No bids — not sold";
  }
  return "";
}

/** Render poll options into `container` (reusing nodes). `onVote(i)` null hides vote buttons. */
export function renderPollOptions(container, poll, { idPrefix = "poll", myVote = null, canVote = false, onVote = null } = {}) {
  const total = poll.total || 0;
  if (container.dataset.poll !== poll.poll || container.children.length !== poll.options.length) {
    container.replaceChildren();
    container.dataset.poll = poll.poll;
    poll.options.forEach((label, i) => {
      const row = document.createElement("div");
      row.className = "poll-option";
      row.dataset.option = String(i);
      const line = document.createElement("div");
      line.className = "line";
      const name = document.createElement("span");
      name.textContent = label;
      const right = document.createElement("span");
      right.style.display = "flex";
      right.style.gap = "8px";
      right.style.alignItems = "center";
      const count = document.createElement("span");
      count.className = "count";
      count.id = `${idPrefix}-count-${i}`;
      right.append(count);
      if (onVote) {
        const btn = document.createElement("button");
        btn.type = "button";
        btn.className = "small";
        btn.id = `${idPrefix}-vote-${i}`;
        btn.textContent = "Vote";
        btn.addEventListener("click", () => onVote(i));
        right.append(btn);
      }
      line.append(name, right);
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.id = `${idPrefix}-fill-${i}`;
      bar.append(fill);
      row.append(line, bar);
      container.append(row);
    });
  }
  poll.options.forEach((_, i) => {
    const n = poll.counts?.[i] ?? 0;
    const pct = total ? Math.round((100 * n) / total) : 0;
    const row = container.children[i];
    row.dataset.mine = String(myVote === i);
    const count = document.getElementById(`${idPrefix}-count-${i}`);
    const text = `${n} · ${pct}%`;
    if (count.textContent !== text) count.textContent = text;
    const fill = document.getElementById(`${idPrefix}-fill-${i}`);
    fill.style.width = `${pct}%`;
    fill.dataset.pct = String(pct);
    fill.dataset.count = String(n);
    const btn = document.getElementById(`${idPrefix}-vote-${i}`);
    if (btn) {
      btn.disabled = !canVote;
      btn.textContent = myVote === i ? "Voted ✓" : "Vote";
    }
  });
}
