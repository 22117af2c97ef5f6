// Pre-bids on the viewer page (docs/protocol.md "Pre-bids"): the upcoming (draft) lots, each with
// a max pre-bid form. A pre-bid goes pending -> placed (acked; it can be raised or changed:
// a new max replaces the old one) or refused with the reason. The server never says my max back
// (events carry only the count), so the page remembers it (RoomClient.myPrebids, per epoch).
// When the lot opens, the viewer's lot panel says whether the pre-bid made them the leader
// (prebidNote below, used by viewer_page.js).
//
// Elements: #prebid (hidden without draft lots) > #prebid-list > li.prebid-lot[data-lot]
// [data-state = none|pending|placed|refused] with #prebid-max-<lot> (input),
// #prebid-submit-<lot>, #prebid-status-<lot> (role=status), .prebid-count[data-count].

import { reasonText } from "./auction_ui.js";
import { formatMoney, parseMoney } from "./params.js";

function refusalText(err, lot) {
  if (err.code === "bid_too_low") {
    return `Too low: your max must be at least the start price ${formatMoney(err.fields?.min ?? lot?.start_price)}. (bid_too_low)`;
  }
  if (err.code === "invalid_state") {
    return `Pre-bids are closed: the lot is ${err.fields?.state ?? "no longer a draft"}. (invalid_state)`;
  }
  return reasonText(err);
}

export function mountPrebids(room) {
  const panel = document.getElementById("prebid");
  const list = document.getElementById("prebid-list");
  const items = new Map(); // lot id -> {li, input, button, status, count, title, start}
  const flight = new Map(); // lot id -> {state: "pending" | "refused", text} (placed: room.myPrebids)
  const api = { last: null }; // the last pre-bid's ack or refusal, for tests

  function canPrebid() {
    return room.status === "open" && room.identity?.role === "bidder" && !room.bannedReason;
  }

  async function submit(lotId) {
    const it = items.get(lotId);
    if (!it || flight.get(lotId)?.state === "pending") return;
    const max = parseMoney(it.input.value);
    if (max === null || max <= 0) {
      flight.set(lotId, { state: "refused", text: "Enter a max bid like 12.50." });
      render();
      return;
    }
    flight.set(lotId, { state: "pending", text: `Placing your pre-bid of ${formatMoney(max)}…` });
    render();
    try {
      const ack = await room.prebid(lotId, max);
      flight.delete(lotId);
      it.duplicate = !!ack.duplicate;
      it.input.value = "";
      api.last = { ok: true, ...ack };
    } catch (err) {
      flight.set(lotId, { state: "refused", text: refusalText(err, room.lots.get(lotId)) });
      api.last = { ok: false, code: err.code ?? null, message: err.message };
    }
    render();
  }

  function make(lot) {
    const id = lot.lot;
    const li = document.createElement("li");
    li.className = "item prebid-lot";
    li.dataset.lot = id;
    const head = document.createElement("div");
    head.className = "head";
    const title = document.createElement("span");
    title.className = "title";
    title.id = `prebid-title-${id}`;
    const count = document.createElement("span");
    count.className = "muted prebid-count";
    head.append(title, count);
    const start = document.createElement("div");
    start.className = "muted";
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("label");
    label.textContent = "Your max bid";
    const input = document.createElement("input");
    input.id = `prebid-max-${id}`;
    input.inputMode = "decimal";
    input.autocomplete = "off";
    input.placeholder = "secret ceiling";
    input.setAttribute("aria-describedby", `prebid-title-${id} prebid-status-${id}`);
    label.append(input);
    const button = document.createElement("button");
    button.type = "button";
    button.id = `prebid-submit-${id}`;
    button.addEventListener("click", () => submit(id));
    input.addEventListener("keydown", (ev) => { if (ev.key === "Enter") submit(id); });
    row.append(label, button);
    const status = document.createElement("div");
    status.className = "prebid-status";
    status.id = `prebid-status-${id}`;
    status.setAttribute("role", "status");
    li.append(head, start, row, status);
    return { li, input, button, status, count, title, start, duplicate: false };
  }

  function set(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  function render() {
    const drafts = [...room.lots.values()].filter((l) => l.status === "draft");
    const keep = new Set(drafts.map((l) => l.lot));
    for (const [id, it] of items) {
      if (!keep.has(id)) {
        it.li.remove();
        items.delete(id);
        flight.delete(id);
      }
    }
    const enabled = canPrebid();
    drafts.forEach((lot, i) => {
      let it = items.get(lot.lot);
      if (!it) {
        it = make(lot);
        items.set(lot.lot, it);
      }
      // only move a node that is out of place: moving one takes the focus out of its field
      if (list.children[i] !== it.li) list.insertBefore(it.li, list.children[i] ?? null);
      set(it.title, lot.title);
      const n = lot.prebids ?? 0;
      set(it.count, `${n} pre-bid${n === 1 ? "" : "s"}`);
      it.count.dataset.count = String(n);
      set(it.start, `Opens at ${formatMoney(lot.start_price)}. Your max stays secret; it bids for you, in turn, when the lot opens.`);
      const mine = room.myPrebids.get(lot.lot);
      const f = flight.get(lot.lot);
      const state = f ? f.state : mine !== undefined ? "placed" : "none";
      it.li.dataset.state = state;
      if (mine !== undefined) it.li.dataset.max = String(mine);
      else delete it.li.dataset.max;
      let text = f ? f.text : "";
      if (mine !== undefined) {
        const placed = `Your pre-bid: max ${formatMoney(mine)}${it.duplicate ? " (unchanged)" : ""}.`;
        text = f ? (f.state === "refused" ? `${f.text} ${placed}` : f.text) : `${placed} Enter a new max to raise it.`;
      } else if (!f) {
        text = enabled ? "" : room.identity ? "Pre-bids need a bidder token." : "Connecting to the room…";
      }
      set(it.status, text);
      set(it.button, mine !== undefined ? "Raise pre-bid" : "Pre-bid");
      // not `disabled` while pending: that would drop the keyboard focus from the button
      it.button.disabled = !enabled;
      it.button.setAttribute("aria-disabled", String(state === "pending"));
      it.input.disabled = !enabled;
    });
    panel.classList.toggle("hidden", drafts.length === 0);
  }

  room.addEventListener("change", render);
  render();
  return Object.assign(api, {
    submit,
    view: () => [...items.entries()].map(([lot, it]) => ({
      lot, state: it.li.dataset.state, status: it.status.textContent, count: Number(it.count.dataset.count),
    })),
  });
}

/** The pre-bid line for my status on an open lot, or "" when I had no pre-bid on it. */
export function prebidNote(room, lot, derived) {
  const max = room.myPrebids.get(lot.lot);
  if (max === undefined || lot.status !== "open") return "";
  const mine = `Your pre-bid (max ${formatMoney(max)})`;
  if (derived === "winning") return `${mine} made you the leader.`;
  if (derived === "outbid") return `${mine} was outbid: ${lot.leader_name || "someone"} leads at ${formatMoney(lot.price)}.`;
  return `${mine} was not placed: others pre-bid more; ${lot.leader_name || "someone"} leads at ${formatMoney(lot.price)}.`;
}
