// Host page: pick sources, preview, publish over WHIP, live stats; the console lives in
// host_console.js. Element ids: see host.html.

import { mountHostConsole } from "./host_console.js";
import { $, pageParams, setText, tokenClaims } from "./params.js";
import { RoomClient } from "./room.js";
import { PublisherStats, formatBitrate, formatMs } from "./stats.js";
import { WhipPublisher } from "./whip.js";

const TOKEN_KEY = "lotcast.host.token";
const params = pageParams();
let token = params.token || sessionStorage.getItem(TOKEN_KEY) || null;
if (params.token) sessionStorage.setItem(TOKEN_KEY, params.token);

setText("stream-name", `stream ${params.stream}`);
const preview = $("preview");

let media = null; // the MediaStream being previewed / published
let publisher = null;
let publishState = "idle";
let lastStats = null;
const publisherStats = new PublisherStats();

function setPublishState(state, detail = "") {
  publishState = state;
  const badge = $("publish-state");
  badge.dataset.state = state;
  badge.textContent = {
    idle: "offline", previewing: "preview", connecting: "going live…", live: "LIVE",
    failed: "failed", stopped: "stopped",
  }[state] || state;
  setText("publish-detail", detail);
  $("go-live").disabled = state === "connecting" || state === "live";
  $("stop").disabled = !(state === "connecting" || state === "live");
}

function showError(text) {
  setText("publish-error", text || "");
}

function showIdentity() {
  const claims = tokenClaims(token);
  if (!claims) setText("identity", "no token: paste a host token to go live");
  else setText("identity", `${claims.name || claims.sub} (${claims.role})`);
}

// --- capture -----------------------------------------------------------------------------------

async function listDevices() {
  if (!navigator.mediaDevices?.enumerateDevices) return;
  const devices = await navigator.mediaDevices.enumerateDevices();
  const fill = (select, kind, extra) => {
    const current = select.value;
    const options = [["", "default"], ...extra];
    devices.filter((d) => d.kind === kind).forEach((d, i) => {
      if (d.deviceId && d.deviceId !== "default") options.push([d.deviceId, d.label || `${kind} ${i + 1}`]);
    });
    select.replaceChildren(...options.map(([value, label]) => {
      const o = document.createElement("option");
      o.value = value;
      o.textContent = label;
      return o;
    }));
    if (options.some(([v]) => v === current)) select.value = current;
  };
  fill($("camera-select"), "videoinput", []);
  fill($("mic-select"), "audioinput", [["none", "none"]]);
}

async function capture() {
  const source = $("source-select").value;
  const cam = $("camera-select").value;
  const mic = $("mic-select").value;
  const audio = mic === "none" ? false : (mic ? { deviceId: { exact: mic } } : true);
  let stream;
  if (source === "screen") {
    if (!navigator.mediaDevices.getDisplayMedia) throw new Error("screen capture is not supported here");
    stream = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: 30 }, audio: true });
    if (audio && stream.getAudioTracks().length === 0) {
      const micStream = await navigator.mediaDevices.getUserMedia({ audio });
      micStream.getAudioTracks().forEach((t) => stream.addTrack(t));
    }
  } else {
    stream = await navigator.mediaDevices.getUserMedia({
      video: { ...(cam ? { deviceId: { exact: cam } } : {}), width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
      audio,
    });
  }
  return stream;
}

async function startPreview() {
  showError("");
  try {
    const next = await capture();
    const old = media;
    media = next;
    preview.srcObject = media;
    $("preview-note").classList.add("hidden");
    if (publisher?.pc) {
      await publisher.replaceTrack("video", media.getVideoTracks()[0] || null);
      await publisher.replaceTrack("audio", media.getAudioTracks()[0] || null);
    }
    if (old) old.getTracks().forEach((t) => t.stop());
    media.getVideoTracks()[0]?.addEventListener("ended", () => {
      if (publishState === "live") showError("the video source ended (screen share stopped?)");
    });
    if (publishState === "idle" || publishState === "stopped" || publishState === "failed") {
      setPublishState("previewing", "preview running");
    }
    await listDevices();
  } catch (err) {
    showError(`cannot capture: ${err.message || err}`);
    throw err;
  }
}

// --- publishing ----------------------------------------------------------------------------------

// While the host wants to be live, a publisher that was live and then failed (network blip,
// broadcaster restart) is replaced automatically with backoff. Refusals (bad token, bad SDP)
// stop the retries; so does "Stop".
let wantLive = false;
let wasLive = false;
let retryTimer = null;
let retryAttempt = 0;
const RETRY_S = [0, 1, 2, 4, 8, 10]; // the first at once: a dead origin is replaced by placement

async function goLive() {
  showError("");
  if (!token) {
    showError("a host token is needed to go live: open the URL printed by `lotcast up` or paste one");
    return;
  }
  try {
    if (!media) await startPreview();
  } catch {
    return;
  }
  wantLive = true;
  wasLive = false;
  retryAttempt = 0;
  clearTimeout(retryTimer);
  await publishOnce();
}

function scheduleRepublish(why) {
  if (!wantLive || !wasLive) {
    setPublishState("failed", "");
    showError(`publishing failed: ${why}`);
    return;
  }
  const delay = RETRY_S[Math.min(retryAttempt, RETRY_S.length - 1)];
  retryAttempt += 1;
  setPublishState("connecting", `${why}; publishing again in ${delay} s`);
  clearTimeout(retryTimer);
  retryTimer = setTimeout(() => { if (wantLive) publishOnce(); }, delay * 1000);
}

// Several origins (issue 13): ask an origin where the stream goes (GET .../ingest), then POST
// there. The origins we know are learned from every answer (Lotcast-Origins), so when the origin
// we publish to dies, the retry asks the others instead of only the dead URL.
const knownOrigins = [location.origin];
let publishOrigin = null; // base URL of the origin of the current session

function learnOrigins(list) {
  for (const url of list || []) {
    const base = String(url).replace(/\/+$/, "");
    if (base && !knownOrigins.includes(base)) knownOrigins.push(base);
  }
}

async function placeIngest() {
  const id = encodeURIComponent(params.stream);
  // the origin we were on first: if it is alive it is most likely still the stream's origin
  const order = [...new Set([publishOrigin, ...knownOrigins].filter(Boolean))];
  for (const base of order) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), 2000);
    try {
      const r = await fetch(`${base}/api/streams/${id}/ingest`, { cache: "no-store", signal: ctrl.signal });
      if (!r.ok) continue;
      const body = await r.json();
      learnOrigins(body.origins);
      if (body.whip_url) return body.whip_url;
    } catch {
      // that origin is down: ask the next one
    } finally {
      clearTimeout(timer);
    }
  }
  return `/whip/${id}`; // no placement answer (one origin without the registry): publish here
}

function originOf(url) {
  return new URL(url, location.href).origin;
}

/** A new WhipPublisher whose state changes drive the page while it is the current one. */
function newPublisher(endpoint, negotiation) {
  // three simulcast layers unless ?simulcast=0 (docs/operations.md "Simulcast"); the
  // publisher falls back to one layer where the browser has no VP8 encoder
  const simulcast = new URLSearchParams(location.search).get("simulcast") !== "0";
  const pub = new WhipPublisher(endpoint, { token, simulcast });
  pub.addEventListener("statechange", (ev) => {
    if (publisher !== pub) return;
    const { state, error } = ev.detail;
    if (state === "live") {
      wasLive = true;
      retryAttempt = 0;
      showError("");
      setPublishState("live", `publishing ${params.stream}`);
    } else if (state === "failed" && !negotiation.active) {
      scheduleRepublish(error || "connection failed");
    } else if (state === "connecting") setPublishState("connecting", "sending offer…");
  });
  pub.addEventListener("connectionstatechange", (ev) => {
    if (publisher === pub) setText("connection-state", ev.detail);
  });
  return pub;
}

async function publishOnce() {
  const old = publisher;
  if (old) await old.stop();
  publisher = null;
  setPublishState("connecting", "finding an origin…");
  const endpoint = await placeIngest();
  if (!wantLive || publisher !== null) return; // stopped (or replaced) meanwhile
  const negotiation = { active: true }; // failures during publish() are handled by its catch
  const pub = newPublisher(endpoint, negotiation);
  publisher = pub;
  publishOrigin = originOf(endpoint);
  setPublishState("connecting", "sending offer…");
  try {
    await pub.publish(media);
    negotiation.active = false;
    if (pub.location) publishOrigin = originOf(pub.location);
    if (publisher === pub && pub.state === "failed") scheduleRepublish(pub.error || "connection failed");
    else if (publisher === pub && pub.state === "connecting") setPublishState("connecting", "connecting media…");
  } catch (err) {
    negotiation.active = false;
    if (publisher !== pub) return;
    const status = err.status ?? 0;
    const refused = status >= 400 && status < 500 && status !== 409 && status !== 429;
    if (refused) wantLive = false;
    scheduleRepublish(err.message || String(err));
  }
}

// The origin we publish to is draining (a `republish` message on the room socket): publish to
// the origin it names, make before break — the old session ends only once the new one is live,
// so viewers see no gap. If the new one fails, the old one keeps going (until the drain ends it).
let moving = null;
const MOVE_LIVE_TIMEOUT_MS = 10000;
// The draining origin ends the old session itself once every relay has switched to the new
// origin; the page lets it go after this long in any case (an origin that is stuck).
const MOVE_OVERLAP_MS = 10000;

function waitLive(pub, ms) {
  return new Promise((resolve, reject) => {
    if (pub.state === "live") return resolve();
    const timer = setTimeout(() => reject(new Error("new session did not go live in time")), ms);
    pub.addEventListener("statechange", (ev) => {
      if (ev.detail.state === "live") { clearTimeout(timer); resolve(); }
      if (ev.detail.state === "failed" || ev.detail.state === "stopped") {
        clearTimeout(timer);
        reject(new Error(ev.detail.error || ev.detail.state));
      }
    });
  });
}

async function moveTo(url) {
  if (!wantLive || !media || moving || publishState !== "live") return;
  const old = publisher;
  if (old?.location && originOf(old.location) === originOf(url)) return; // already there
  const negotiation = { active: true };
  const pub = newPublisher(url, negotiation);
  moving = pub;
  setPublishState("live", `publishing ${params.stream}; moving to another origin…`);
  try {
    await pub.publish(media);
    await waitLive(pub, MOVE_LIVE_TIMEOUT_MS);
  } catch (err) {
    moving = null;
    await pub.stop();
    if (publisher === old) setPublishState("live", `publishing ${params.stream} (move failed: ${err.message || err})`);
    return;
  }
  negotiation.active = false;
  moving = null;
  if (publisher !== old || !wantLive) { // stopped or replaced meanwhile
    await pub.stop();
    return;
  }
  publisher = pub;
  publishOrigin = originOf(pub.location || url);
  setPublishState("live", `publishing ${params.stream}`);
  if (old) setTimeout(() => old.stop(), MOVE_OVERLAP_MS);
}

async function stop() {
  wantLive = false;
  clearTimeout(retryTimer);
  const pub = publisher;
  publisher = null;
  if (pub) await pub.stop();
  setText("connection-state", "–");
  setPublishState(media ? "stopped" : "idle", "session ended");
}

$("preview-start").addEventListener("click", () => startPreview().catch(() => {}));
$("go-live").addEventListener("click", goLive);
$("stop").addEventListener("click", stop);
for (const id of ["camera-select", "mic-select", "source-select"]) {
  $(id).addEventListener("change", () => { if (media) startPreview().catch(() => {}); });
}
window.addEventListener("pagehide", () => { publisher?.stop(); });

async function statsTick() {
  try {
    const s = await publisherStats.sample(publisher?.pc);
    lastStats = s;
    if (!s) return;
    setText("stat-bitrate", formatBitrate(s.videoBitrate));
    setText("stat-audio-bitrate", formatBitrate(s.audioBitrate));
    setText("stat-rtt", s.rtt === null ? "–" : formatMs(s.rtt * 1000));
    setText("stat-lost", s.packetsLost);
    setText("stat-frames", s.framesEncoded ?? 0);
    setText("stat-fps", s.framesPerSecond === null ? "–" : Math.round(s.framesPerSecond));
    setText("stat-resolution", s.frameWidth ? `${s.frameWidth}×${s.frameHeight}` : "–");
    setText("stat-codec", s.codec ? s.codec.split("/")[1] : "–");
  } catch (err) {
    console.warn("stats", err);
  }
}
setInterval(statsTick, 1000);

// --- console -------------------------------------------------------------------------------------

const room = new RoomClient({ room: params.stream, token });
room.addEventListener("republish", (ev) => {
  const { stream, whipUrl } = ev.detail;
  if (stream === params.stream && typeof whipUrl === "string") moveTo(whipUrl);
});
room.addEventListener("status", (ev) => {
  // The console socket and the WHIP session go to the same broadcaster: a dropped socket is a
  // hint that the media connection may be gone too.
  if (ev.detail.status === "reconnecting" && publishState === "live") publisher?.suspect();
  const badge = $("room-state");
  badge.dataset.state = ev.detail.status;
  badge.textContent = {
    connecting: "console connecting", open: "console live", reconnecting: "console reconnecting",
    closed: "console closed", failed: "console: sign-in failed",
  }[ev.detail.status] || ev.detail.status;
  badge.title = ev.detail.detail || "";
});
room.addEventListener("change", () => setText("viewer-count", room.viewers ?? "–"));
room.addEventListener("authfailed", (ev) => {
  setText("console-error", `host token rejected by the server (${ev.detail.reason}); paste a valid one`);
});
const hostConsole = mountHostConsole(room);

$("token-apply").addEventListener("click", () => {
  const value = $("token-input").value.trim();
  token = value || null;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  $("token-input").value = "";
  showIdentity();
  room.setToken(token);
});

// --- test hook -----------------------------------------------------------------------------------

window.lotcast = {
  get publisher() { return publisher; },
  get origins() { return [...knownOrigins]; },
  get publishOrigin() { return publishOrigin; },
  room,
  console: hostConsole,
  get pc() { return publisher?.pc ?? null; },
  get lastStatus() { return publisher?.error ?? null; },
  state() {
    return {
      publish: publishState, detail: $("publish-detail").textContent,
      error: $("publish-error").textContent, session: publisher?.location ?? null,
      connection: publisher?.pc?.connectionState ?? null,
      room: room.status, viewers: room.viewers, identity: room.identity,
    };
  },
  stats() { return lastStats; },
  async rawStats() {
    const pc = publisher?.pc;
    if (!pc) return null;
    const out = {};
    (await pc.getStats()).forEach((s) => {
      if (s.type === "outbound-rtp") {
        out[s.kind] = { packetsSent: s.packetsSent, bytesSent: s.bytesSent, framesEncoded: s.framesEncoded };
      }
    });
    return out;
  },
  roomState() { return room.snapshot(); },
  chatView: () => hostConsole.chat.view(),
  startPreview,
  goLive,
  stop,
};

showIdentity();
setPublishState("idle");
listDevices().catch(() => {});
room.start();
