// Viewer page: WHEP player + room (auction, poll, viewer count, chat, Q&A, reactions, giveaway).
// Element ids: see viewer.html.

import {
  formatCountdown, lotResultText, quickBids, reasonText, renderPollOptions,
} from "./auction_ui.js";
import { mountChat } from "./chat_ui.js";
import { mountGiveawayBanner } from "./giveaway_ui.js";
import { $, formatMoney, pageParams, parseMoney, setText, tokenClaims } from "./params.js";
import { mountPrebids, prebidNote } from "./prebid_ui.js";
import { mountQuestions } from "./qa_ui.js";
import { mountReactions } from "./reactions_ui.js";
import { RoomClient } from "./room.js";
import { PlayerStats, formatBitrate, formatMs } from "./stats.js";
import { WhepPlayer } from "./whep.js";

const TOKEN_KEY = "lotcast.viewer.token";
const params = pageParams();
let token = params.token || sessionStorage.getItem(TOKEN_KEY) || null;
if (params.token) sessionStorage.setItem(TOKEN_KEY, params.token);

const video = $("video");
setText("stream-name", `stream ${params.stream}`);

// --- media -------------------------------------------------------------------------------------

const nodeIds = new Map(); // relay origin -> node id, learnt from the room's welcome
const player = new WhepPlayer({
  stream: params.stream, nodes: params.nodes, token, video, nodeIdOf: (origin) => nodeIds.get(origin) ?? null,
});
const playerStats = new PlayerStats();
let lastStats = null;

const MEDIA_LABELS = {
  idle: "media idle", connecting: "connecting", waiting: "waiting for stream",
  connected: "live", reconnecting: "reconnecting", failed: "media failed", stopped: "stopped",
};

player.addEventListener("statechange", (ev) => {
  const { state, detail } = ev.detail;
  console.info(`[lotcast] media ${state}${detail ? `: ${detail}` : ""}`);
  const badge = $("media-state");
  badge.dataset.state = state;
  badge.textContent = MEDIA_LABELS[state] || state;
  setText("media-detail", detail || "");
  updateVideoNote();
});

player.addEventListener("relaychange", (ev) => {
  console.info(`[lotcast] media relay ${ev.detail.origin}`);
  setText("relay-origin", ev.detail.origin);
  // The room socket follows the media to the relay we were placed on.
  if (room.url && new URL(room.url).host !== new URL(ev.detail.origin).host) {
    room.reconnectNow("following media to its relay");
  }
});

// --- WHEP extensions: viewer count from SSE, quality menu --------------------------------------

player.addEventListener("viewercount", () => render());
player.addEventListener("layers", () => renderQuality());
player.addEventListener("layerchange", () => renderQuality());
player.addEventListener("session", () => renderQuality());

/** Quality menu entries for the layers the stream has, best first (by width, else bitrate). */
function qualityChoices(layers) {
  const ranked = [...layers].sort((a, b) => (b.width ?? b.bitrate ?? 0) - (a.width ?? a.bitrate ?? 0));
  if (ranked.length < 2) return [];
  const picks = ranked.length === 2 ? [["high", ranked[0]], ["low", ranked[1]]] :
    [["high", ranked[0]], ["medium", ranked[Math.floor((ranked.length - 1) / 2)]], ["low", ranked[ranked.length - 1]]];
  return picks;
}

function layerLabel(layer) {
  if (!layer) return player.layers.length > 1 ? "auto" : "auto (single layer)";
  const size = layer.width && layer.height ? ` ${layer.width}×${layer.height}` : "";
  return `${layer.encodingId ?? "default"}${size}`;
}

function renderQuality() {
  const select = $("quality");
  const choices = qualityChoices(player.layers);
  // one layer (no simulcast): nothing to choose, the menu stays hidden
  $("quality-wrap").classList.toggle("hidden", choices.length === 0);
  for (const option of select.options) {
    if (option.value === "auto") continue;
    option.hidden = !choices.some(([name]) => name === option.value);
  }
  const wanted = player.wantedLayer;
  const current = choices.find(([, layer]) => layer === wanted);
  select.value = current ? current[0] : "auto";
  setText("stat-layer", layerLabel(wanted));
}

$("quality").addEventListener("change", async (ev) => {
  const value = ev.currentTarget.value;
  const pick = qualityChoices(player.layers).find(([name]) => name === value);
  await player.chooseLayer(pick ? pick[1] : null);
  renderQuality();
});

let playing = false;
video.addEventListener("playing", () => { playing = true; updateVideoNote(); });
video.addEventListener("waiting", () => updateVideoNote());
video.addEventListener("emptied", () => { playing = false; updateVideoNote(); });

function updateVideoNote() {
  const note = $("video-note");
  const state = player.state;
  let text = "";
  if (state === "waiting") text = `Waiting for the stream to start… (${player.detail})`;
  else if (state === "failed") text = `Cannot play: ${player.detail}`;
  else if (state === "reconnecting") text = "Reconnecting…";
  else if (!playing) text = "Connecting…";
  note.textContent = text;
  note.classList.toggle("hidden", !text);
}

$("unmute").addEventListener("click", () => {
  video.muted = !video.muted;
  if (!video.muted) video.play().catch(() => {});
  updateMuteButton();
});
video.addEventListener("volumechange", updateMuteButton);
function updateMuteButton() {
  $("unmute").textContent = video.muted ? "Unmute" : "Mute";
}

async function statsTick() {
  try {
    const s = await playerStats.sample(player.pc);
    lastStats = s;
    if (s) {
      setText("latency", formatMs(s.latencyMs));
      setText("latency-e2e", formatMs(s.e2eMs));
      setText("stat-fps", s.framesPerSecond === null ? "–" : Math.round(s.framesPerSecond));
      setText("stat-bitrate", formatBitrate((s.videoBitrate ?? 0) + (s.audioBitrate ?? 0)));
      setText("stat-frames", s.framesDecoded);
      setText("stat-resolution", s.frameWidth ? `${s.frameWidth}×${s.frameHeight}` : "–");
      setText("stat-lost", s.packetsLost);
      setText("stat-rtt", s.rtt === null ? "–" : formatMs(s.rtt * 1000));
      setText("stat-codec", [s.codec, s.audioCodec].filter(Boolean).map((c) => c.split("/")[1]).join(" + ") || "–");
    }
  } catch (err) {
    console.warn("stats", err);
  }
}
setInterval(statsTick, 1000);

// --- room --------------------------------------------------------------------------------------

const room = new RoomClient({
  room: params.stream,
  token,
  baseUrl: () => player.relayOrigin || location.origin,
});

room.addEventListener("status", (ev) => {
  console.info(`[lotcast] room ${ev.detail.status}${ev.detail.detail ? `: ${ev.detail.detail}` : ""}`);
  const badge = $("room-state");
  badge.dataset.state = ev.detail.status;
  badge.textContent = {
    connecting: "room connecting", open: "room live", reconnecting: "room reconnecting",
    closed: "room closed", failed: "room: sign-in failed",
  }[ev.detail.status] || ev.detail.status;
  badge.title = ev.detail.detail || "";
  render();
});

room.addEventListener("welcome", (ev) => {
  if (room.url && ev.detail.message.node) nodeIds.set(new URL(room.url).origin.replace(/^ws/, "http"), ev.detail.message.node);
});

room.addEventListener("moved", () => {
  // The relay is draining or going away: re-run placement; the socket follows via relaychange.
  player.replace("relay draining");
});

room.addEventListener("change", render);
room.addEventListener("authfailed", (ev) => {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  player.token = null;
  render();
  setText("identity", `token rejected (${ev.detail.reason}); watching anonymously`);
});

room.addEventListener("banned", () => {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  render();
});

const chat = mountChat(room);
const questions = mountQuestions(room);
const reactions = mountReactions(room);
const giveaway = mountGiveawayBanner(room);
const prebids = mountPrebids(room);

const feeds = new Map(); // lot id -> [{name, amount, price, ts}]
room.addEventListener("logevent", (ev) => {
  const e = ev.detail.event;
  if (e.type !== "bid") return;
  const list = feeds.get(e.lot) || [];
  list.unshift({ name: e.bidder_name || e.bidder, amount: e.amount, price: e.price, me: e.bidder === room.identity?.user });
  if (list.length > 30) list.length = 30;
  feeds.set(e.lot, list);
});

// "My status" bookkeeping: an ack is the truth until the log catches up to its offset; a rejection
// is shown until the next action or until the lot changes (a new bid, a status change).
let ackOverride = null; // {lot, status, offset}
let rejection = null; // {lot, reason, derived, bids, status}
let pending = null; // lot id of an in-flight bid

function derivedStatus(lot) {
  if (ackOverride && ackOverride.lot === lot.lot && (room.offset ?? 0) < ackOverride.offset) {
    return ackOverride.status;
  }
  const s = room.myStatus(lot);
  if (s === "won" && lot.sold_by === "buy_now") return "bought";
  return s;
}

function statusView(lot) {
  const derived = derivedStatus(lot);
  if (pending === lot.lot) return { status: "pending", text: "Placing your bid…", reason: "" };
  if (rejection && rejection.lot === lot.lot && rejection.derived === derived &&
      rejection.bids === (lot.bids ?? 0) && rejection.status === lot.status) {
    return { status: "rejected", text: "Bid rejected", reason: rejection.reason };
  }
  const price = formatMoney(lot.price);
  const pre = prebidNote(room, lot, derived);
  switch (derived) {
    case "winning": return { status: "winning", text: `You're winning at ${price}`, reason: pre };
    case "outbid": return {
      status: "outbid", text: "You've been outbid",
      reason: pre || `${lot.leader_name || "Someone"} leads at ${price}`,
    };
    case "won": return { status: "won", text: `You won at ${price}`, reason: "" };
    case "bought": return { status: "bought", text: `You bought it at ${price}`, reason: "" };
    case "lost": return {
      status: "lost", text: "You did not win this lot", reason: lot.status === "sold" ? lotResultText(lot) : "",
    };
    default:
      if (pre) return { status: "outbid", text: "Your pre-bid was not placed", reason: pre };
      return { status: "none", text: canBid() ? "You have not bid on this lot." : "Sign in with a bidder token to bid.", reason: "" };
  }
}

function rejectionOf(lot, reason) {
  return { lot: lot.lot, reason, derived: derivedStatus(lot), bids: lot.bids ?? 0, status: lot.status };
}

function canBid() {
  return room.status === "open" && room.identity?.role === "bidder";
}

async function placeBid(amount, max = null) {
  const lot = room.currentLot();
  if (!lot) return;
  rejection = null;
  if (amount === null) {
    rejection = rejectionOf(lot, "Enter an amount like 12.50.");
    render();
    return;
  }
  pending = lot.lot;
  render();
  try {
    const ack = await room.bid(lot.lot, amount, max);
    ackOverride = { lot: lot.lot, status: ack.status, offset: ack.offset };
    window.lotcast.lastBidResult = { ok: true, ...ack };
  } catch (err) {
    pending = null;
    rejection = rejectionOf(room.lots.get(lot.lot) || lot, reasonText(err));
    window.lotcast.lastBidResult = { ok: false, code: err.code, message: err.message };
  } finally {
    pending = null;
    render();
  }
}

for (let i = 0; i < 3; i++) {
  $(`bid-quick-${i}`).addEventListener("click", (ev) => {
    placeBid(Number(ev.currentTarget.dataset.amount), parseOptional($("bid-max").value));
  });
}
$("bid-submit").addEventListener("click", () => {
  placeBid(parseMoney($("bid-amount").value), parseOptional($("bid-max").value));
});
$("bid-amount").addEventListener("keydown", (ev) => { if (ev.key === "Enter") $("bid-submit").click(); });

function parseOptional(text) {
  return text.trim() ? parseMoney(text) : null;
}

async function vote(option) {
  const poll = room.currentPoll();
  if (!poll) return;
  setText("poll-message", "");
  try {
    await room.vote(poll.poll, option);
  } catch (err) {
    setText("poll-message", reasonText(err));
  }
  render();
}

// --- rendering ---------------------------------------------------------------------------------

function render() {
  // the WHEP SSE count of the stream when the relay sends one, else the room's
  setText("viewer-count", player.viewerCount ?? room.viewers ?? "–");
  const who = room.identity;
  if (room.bannedReason && !token) setText("identity", `banned from this room (${room.bannedReason}); watching anonymously`);
  else if (room.authError && !token) setText("identity", `token rejected (${room.authError}); watching anonymously`);
  else if (who && who.role !== "viewer") setText("identity", `${who.name || who.user} (${who.role})`);
  else if (token) {
    const claims = tokenClaims(token);
    setText("identity", claims ? `${claims.name || claims.sub} (${claims.role})` : "token set");
  } else setText("identity", "watching anonymously");
  renderLot();
  renderPoll();
}

function renderLot() {
  const lot = room.currentLot();
  const panel = $("lot");
  $("lot-empty").classList.toggle("hidden", !!lot);
  $("lot-body").classList.toggle("hidden", !lot);
  if (!lot) {
    panel.dataset.status = "none";
    delete panel.dataset.lot;
    return;
  }
  panel.dataset.lot = lot.lot;
  panel.dataset.status = lot.status;
  setText("lot-title", lot.title);
  const pill = $("lot-status");
  pill.dataset.status = lot.status;
  setText("lot-status", lot.status);
  setText("lot-price", lot.price !== undefined && lot.price !== null ? formatMoney(lot.price) : `${formatMoney(lot.start_price)}`);
  setText("lot-leader", lot.leader_name || lot.leader || "no bids yet");
  setText("lot-bids", lot.bids ?? 0);
  setText("lot-next-min", lot.status === "open" ? formatMoney(lot.next_min) : "–");
  setText("lot-reserve", !lot.has_reserve ? "" : lot.reserve_met ? "reserve met" :
    lot.status === "open" || lot.status === "draft" ? "reserve not met yet" : "reserve not met");
  setText("lot-buy-now", lot.buy_now && !lot.bids && lot.status === "open" ? `buy now ${formatMoney(lot.buy_now)}` : "");
  const result = $("lot-result");
  const resultText = lotResultText(lot);
  result.classList.toggle("hidden", !resultText);
  result.dataset.result = lot.status;
  setText("lot-result", resultText);

  const open = lot.status === "open";
  const enabled = open && canBid() && pending === null;
  $("bid-controls").classList.toggle("hidden", !open);
  quickBids(lot).forEach((amount, i) => {
    const btn = $(`bid-quick-${i}`);
    btn.dataset.amount = String(amount);
    setText(`bid-quick-${i}`, `Bid ${formatMoney(amount)}`);
    btn.disabled = !enabled;
  });
  $("bid-submit").disabled = !enabled;
  setText("bid-hint", !open ? "" : canBid() ? `Minimum bid ${formatMoney(lot.next_min)}` :
    (room.identity ? "Bidding needs a bidder token." : "Connecting to the room…"));

  const view = statusView(lot);
  const box = $("my-status");
  box.dataset.status = view.status;
  setText("my-status-text", view.text);
  setText("my-status-reason", view.reason);

  const feed = $("lot-feed");
  const items = feeds.get(lot.lot) || [];
  const key = items.map((b) => `${b.name}:${b.amount}:${b.price}`).join("|");
  if (feed.dataset.key !== key) {
    feed.dataset.key = key;
    feed.replaceChildren(...items.map((b) => {
      const li = document.createElement("li");
      const who = document.createElement("span");
      who.textContent = b.me ? `${b.name} (you)` : b.name;
      const amount = document.createElement("span");
      amount.className = "amount";
      amount.textContent = formatMoney(b.price);
      li.append(who, amount);
      return li;
    }));
  }
  tickCountdown();
}

function renderPoll() {
  const poll = room.currentPoll();
  const panel = $("poll");
  $("poll-empty").classList.toggle("hidden", !!poll);
  $("poll-body").classList.toggle("hidden", !poll);
  if (!poll) {
    panel.dataset.status = "none";
    delete panel.dataset.poll;
    return;
  }
  panel.dataset.poll = poll.poll;
  panel.dataset.status = poll.status;
  setText("poll-question", poll.question);
  $("poll-status").dataset.status = poll.status;
  setText("poll-status", poll.status);
  setText("poll-total", poll.total ?? 0);
  const mine = room.myVotes.has(poll.poll) ? room.myVotes.get(poll.poll) : null;
  const canVote = poll.status === "open" && canBid() && !room.myVotes.has(poll.poll);
  renderPollOptions($("poll-options"), poll, { idPrefix: "poll", myVote: mine, canVote, onVote: vote });
  tickCountdown();
}

function tickCountdown() {
  const lot = room.currentLot();
  const el = $("lot-countdown");
  if (lot && lot.status === "open" && lot.ends_at) {
    const left = lot.ends_at - room.serverNow();
    setText("lot-countdown", formatCountdown(left));
    el.dataset.urgent = String(left <= (lot.soft_close_ms || 10000));
    el.dataset.remainingMs = String(Math.max(0, Math.round(left)));
  } else {
    setText("lot-countdown", lot ? (lot.status === "draft" ? "not open" : "ended") : "–");
    el.dataset.urgent = "false";
  }
  const poll = room.currentPoll();
  if (poll) {
    setText("poll-countdown", poll.status === "open" && poll.ends_at ?
      `closes in ${formatCountdown(poll.ends_at - room.serverNow())}` : "closed");
  }
}
setInterval(tickCountdown, 250);

// --- sign-in -----------------------------------------------------------------------------------

$("token-apply").addEventListener("click", () => {
  const value = $("token-input").value.trim();
  token = value || null;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  $("token-input").value = "";
  player.token = token;
  room.setToken(token);
  render();
});

// --- test hook ---------------------------------------------------------------------------------

window.lotcast = {
  player,
  room,
  get pc() { return player.pc; },
  get lastStatus() { return player.lastStatus; },
  lastBidResult: null,
  /** Media + room state summary (JSON-friendly). */
  state() {
    return {
      media: player.state, mediaDetail: player.detail, relay: player.relayOrigin,
      lastStatus: player.lastStatus, lastError: player.lastError, reconnects: player.reconnects,
      sessions: player.sessionsStarted, nodes: [...player.nodes], serving: [...player.serving],
      currentTime: video.currentTime, paused: video.paused,
      muted: video.muted, readyState: video.readyState,
      videoWidth: video.videoWidth, videoHeight: video.videoHeight,
      room: room.status, roomDetail: room.statusDetail, viewers: room.viewers,
      myStatus: $("my-status").dataset.status,
      events: player.eventsState, sseViewers: player.viewerCount, layers: player.layers,
      wantedLayer: player.wantedLayer, layerStatus: player.layerStatus,
      streamActive: player.streamActive, reconnectEvents: player.reconnectEvents,
      reconnectUrl: player.lastReconnectUrl,
    };
  },
  /** The last getStats() summary from the 1 s sampler. */
  stats() { return lastStats; },
  /** Fresh inbound-rtp counters straight from getStats(). */
  async rawStats() {
    const pc = player.pc;
    if (!pc) return null;
    const out = {};
    (await pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp") {
        out[s.kind] = {
          packetsReceived: s.packetsReceived, bytesReceived: s.bytesReceived,
          framesDecoded: s.framesDecoded, framesReceived: s.framesReceived,
          totalSamplesReceived: s.totalSamplesReceived, packetsLost: s.packetsLost,
          jitterBufferDelay: s.jitterBufferDelay, jitterBufferEmittedCount: s.jitterBufferEmittedCount,
        };
      }
    });
    return out;
  },
  roomState() { return room.snapshot(); },
  chat,
  questions,
  reactions,
  giveaway,
  prebids,
  chatView: () => chat.view(),
  bid: placeBid,
  vote,
};

// Leaving the page ends the WHEP session at once (DELETE with keepalive) instead of letting the
// relay time it out, so its seat is free for the next viewer.
window.addEventListener("pagehide", () => {
  player.stop();
  room.stop();
});

updateMuteButton();
renderQuality();
render();
room.start();
player.start();
