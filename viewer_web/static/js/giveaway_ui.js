// Giveaways (docs/protocol.md "Giveaways"): the viewer's banner (enter / entered / winner) and
// the host's panel (open between lots, draw, cancel, the recorded draw).
//
// Viewer elements: #giveaway (data-state = none|open|entered|won|drawn|cancelled,
// data-giveaway = id), #giveaway-item, #giveaway-text (role=status), #giveaway-enter.
// Host elements: #hg-item (input), #hg-open, #hg-current (data-state = none|open|drawn|cancelled,
// data-giveaway), #hg-text, #hg-draw, #hg-cancel, #hg-proof (the recorded draw), #hg-entrants.
//
// The host's entrant count is not live: the server logs no event per entry and sends no count
// frame (docs/protocol.md "Giveaways": entries are counted in the snapshot, the draw and the
// `no_eligible_entrants` refusal only). #hg-entrants shows the last known count and where it came
// from (data-source = none|opened|snapshot|draw_attempt|draw) and says it is not live.

import { reasonText } from "./auction_ui.js";

/** The viewer page's banner state for the current giveaway. */
export function giveawayView(room) {
  const g = room.show.giveaway;
  const me = room.identity?.user ?? null;
  if (!g) return { state: "none", text: "" };
  if (g.status === "open") {
    if (g.entered) return { state: "entered", text: "You're in! The winner is drawn live; stay connected to be eligible." };
    return { state: "open", text: me ? "Enter for free: one entry per viewer; be connected at the draw." : "Sign in with a bidder token to enter." };
  }
  if (g.status === "drawn") {
    if (me && g.winner === me) return { state: "won", text: `You won ${g.item}!` };
    return { state: "drawn", text: `Winner: ${g.winner_name || g.winner} (drawn from ${g.eligible} connected of ${g.entrants} entrants)` };
  }
  return { state: "cancelled", text: "The giveaway was cancelled." };
}

export function mountGiveawayBanner(room) {
  const box = document.getElementById("giveaway");
  const enter = document.getElementById("giveaway-enter");
  let error = "";
  enter.addEventListener("click", async () => {
    const g = room.show.giveaway;
    if (!g) return;
    error = "";
    enter.disabled = true;
    try {
      await room.enterGiveaway(g.giveaway);
    } catch (err) {
      if (err.code !== "duplicate_entry") error = reasonText(err);
    }
    render();
  });

  function render() {
    const g = room.show.giveaway;
    const view = giveawayView(room);
    box.dataset.state = view.state;
    box.classList.toggle("hidden", view.state === "none");
    if (g) box.dataset.giveaway = g.giveaway;
    else delete box.dataset.giveaway;
    const item = document.getElementById("giveaway-item");
    if (item.textContent !== (g?.item ?? "")) item.textContent = g?.item ?? "";
    const text = error ? `${view.text} ${error}` : view.text;
    const t = document.getElementById("giveaway-text");
    if (t.textContent !== text) t.textContent = text;
    const canEnter = view.state === "open" && room.identity?.role === "bidder" && room.status === "open" && !room.bannedReason;
    enter.classList.toggle("hidden", view.state !== "open");
    enter.disabled = !canEnter;
  }

  room.addEventListener("change", render);
  render();
  return { view: () => giveawayView(room) };
}

const COUNT_SOURCES = {
  opened: "when it opened",
  snapshot: "at the console's last (re)connect",
  draw_attempt: "at the last draw attempt",
  draw: "at the draw",
};

export function mountGiveawayHost(room, { run, showError }) {
  const current = document.getElementById("hg-current");
  const entrants = document.getElementById("hg-entrants");
  const known = { giveaway: null, count: null, source: "none", at: null }; // the last known count
  let snapshots = room.snapshots;

  function learn(source, count) {
    const g = room.show.giveaway;
    if (!g || typeof count !== "number") return;
    Object.assign(known, { giveaway: g.giveaway, count, source, at: Date.now() });
  }
  room.addEventListener("logevent", (ev) => {
    const e = ev.detail.event;
    if (e.type === "giveaway_opened") learn("opened", 0);
    else if (e.type === "giveaway_drawn") learn("draw", e.entrants);
  });
  document.getElementById("hg-open").addEventListener("click", () => {
    const item = document.getElementById("hg-item").value.trim();
    if (!item) {
      showError(new Error("the giveaway needs an item"));
      return;
    }
    run("giveaway_open", { item }).catch(() => {});
  });
  document.getElementById("hg-draw").addEventListener("click", () => {
    const g = room.show.giveaway;
    if (!g) return;
    run("giveaway_draw", { giveaway: g.giveaway }).catch((err) => {
      if (err.code === "no_eligible_entrants" && typeof err.fields?.entrants === "number") {
        g.entrants = err.fields.entrants;
        learn("draw_attempt", err.fields.entrants);
        render();
      }
    });
  });
  document.getElementById("hg-cancel").addEventListener("click", () => {
    const g = room.show.giveaway;
    if (g) run("giveaway_cancel", { giveaway: g.giveaway }).catch(() => {});
  });

  function renderCount(g) {
    if (room.snapshots !== snapshots) { // a fresh snapshot: its giveaway carries the count
      snapshots = room.snapshots;
      learn("snapshot", g?.entrants);
    }
    const mine = g && known.giveaway === g.giveaway;
    const source = mine ? known.source : "none";
    entrants.dataset.source = source;
    entrants.dataset.count = mine ? String(known.count) : "";
    let text = "";
    if (g && g.status === "open") {
      text = mine
        ? `${known.count} entered ${COUNT_SOURCES[source]} (${new Date(known.at).toLocaleTimeString()}). `
        : "";
      text += "Not a live count: the server sends no update per entry; it refreshes when the console reconnects and on a draw attempt.";
    }
    if (entrants.textContent !== text) entrants.textContent = text;
  }

  function render() {
    const g = room.show.giveaway;
    const state = g ? g.status : "none";
    renderCount(g);
    current.dataset.state = state;
    if (g) current.dataset.giveaway = g.giveaway;
    else delete current.dataset.giveaway;
    const lotOpen = [...room.lots.values()].some((l) => l.status === "open");
    let text = "No giveaway yet.";
    if (g && g.status === "open") text = `${g.item}: open`;
    else if (g && g.status === "drawn") text = `${g.item}: won by ${g.winner_name || g.winner} (${g.eligible} eligible of ${g.entrants} entrants)`;
    else if (g) text = `${g.item}: cancelled`;
    const t = document.getElementById("hg-text");
    if (t.textContent !== text) t.textContent = text;
    document.getElementById("hg-draw").classList.toggle("hidden", state !== "open");
    document.getElementById("hg-cancel").classList.toggle("hidden", state !== "open");
    const open = document.getElementById("hg-open");
    open.disabled = state === "open" || lotOpen;
    open.title = lotOpen ? "Giveaways run between lots: close the open lot first" : "";
    const proof = document.getElementById("hg-proof");
    proof.classList.toggle("hidden", state !== "drawn");
    if (state === "drawn") {
      const lines = `seed ${g.seed}\ncommitment sha256(seed) ${g.commitment}\nwinner = eligible[HMAC-SHA256(seed, "${g.giveaway}") mod ${g.eligible}] = #${g.index}\nsha1 of the sorted eligible list ${g.eligible_sha1}`;
      if (proof.textContent !== lines) proof.textContent = lines;
    }
  }

  room.addEventListener("change", render);
  render();
  return { entrants: () => ({ ...known }) };
}
