// WHIP (RFC 9725) / WHEP HTTP signaling shared by the publisher and the player.
//
// One offer/answer exchange: POST application/sdp -> 201 + answer + Location (+ ETag).
// Non-201 answers become a SignalingError carrying status, Retry-After and the server's reason,
// so callers can decide to wait (409 not live, 503 overloaded) or give up (4xx).
// fetch() follows 307/308 itself (method and body are kept); `response.url` is then the URL that
// answered, which is how a caller learns which relay it was placed on.

export class SignalingError extends Error {
  constructor(message, { status = 0, retryAfter = null, url = "" } = {}) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter; // seconds, or null
    this.url = url;
  }
  get retryable() {
    return this.status === 0 || this.status === 409 || this.status === 503 || this.status === 429 ||
      this.status >= 500;
  }
}

/** Seconds from a Retry-After header (delta-seconds or HTTP-date), or null. */
export function parseRetryAfter(value) {
  if (!value) return null;
  const trimmed = value.trim();
  if (/^\d+(\.\d+)?$/.test(trimmed)) return Number(trimmed);
  const when = Date.parse(trimmed);
  if (Number.isNaN(when)) return null;
  return Math.max(0, (when - Date.now()) / 1000);
}

/** Parse `Link: <stun:...>; rel="ice-server"; username=...; credential=...` into RTCIceServers. */
export function parseIceServerLinks(header) {
  const servers = [];
  if (!header) return servers;
  for (const part of header.split(/,(?=\s*<)/)) {
    const m = part.match(/<([^>]+)>(.*)/);
    if (!m || !/rel="?ice-server"?/i.test(m[2])) continue;
    const server = { urls: m[1] };
    const user = m[2].match(/username="([^"]*)"/i);
    const cred = m[2].match(/credential="([^"]*)"/i);
    if (user) server.username = user[1];
    if (cred) server.credential = cred[1];
    if (/^turns?:/i.test(server.urls) && !(user && cred)) {
      console.warn(`ignoring ${server.urls}: a TURN server needs username and credential`);
      continue;
    }
    servers.push(server);
  }
  return servers;
}

/**
 * True when a TURN credential among `servers` expires within `marginSec` (TURN REST usernames
 * are "<expiry unix seconds>:<user>"): a new session must ask the node for fresh ones first.
 */
export function iceServersStale(servers, marginSec = 300) {
  const now = Date.now() / 1000;
  return (servers || []).some((s) => {
    const m = /^(\d+):/.exec(s.username || "");
    return m !== null && Number(m[1]) - now < marginSec;
  });
}

/**
 * The ICE servers an endpoint advertises (`Link: <...>; rel="ice-server"` on OPTIONS, RFC 9725
 * §4.6), or null when it cannot tell (unreachable, or no answer within `timeoutMs`).
 */
export async function discoverIceServers(endpoint, { token = null, timeoutMs = 1500 } = {}) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), timeoutMs);
  try {
    const res = await fetch(endpoint, {
      method: "OPTIONS", headers: authHeaders(token), cache: "no-store", signal: ctrl.signal,
    });
    return parseIceServerLinks(res.headers.get("Link"));
  } catch {
    return null;
  } finally {
    clearTimeout(timer);
  }
}

/** An RTCPeerConnection with the given ICE servers, or with none if the browser refuses them. */
export function newPeerConnection(iceServers) {
  try {
    return new RTCPeerConnection({ iceServers: iceServers || [], bundlePolicy: "max-bundle" });
  } catch (err) {
    console.warn("ICE server configuration refused; using none", err);
    return new RTCPeerConnection({ iceServers: [], bundlePolicy: "max-bundle" });
  }
}

/** Resolve when ICE gathering is complete or `timeoutMs` passed (whichever comes first). */
export function waitForIceGathering(pc, timeoutMs = 1500) {
  if (pc.iceGatheringState === "complete") return Promise.resolve(true);
  return new Promise((resolve) => {
    const done = (complete) => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", onChange);
      resolve(complete);
    };
    const onChange = () => { if (pc.iceGatheringState === "complete") done(true); };
    const timer = setTimeout(() => done(false), timeoutMs);
    pc.addEventListener("icegatheringstatechange", onChange);
  });
}

function authHeaders(token) {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function reasonOf(response) {
  try {
    let text = (await response.text()).trim();
    if (/^<!doctype|^<html/i.test(text)) {
      const title = text.match(/<title>([^<]*)<\/title>/i);
      text = title ? title[1] : "";
    }
    return text.replace(/\s+/g, " ").slice(0, 200);
  } catch {
    return "";
  }
}

/**
 * POST an SDP offer. Returns {answer, location, etag, url, iceServers}.
 * `url` is the endpoint that finally answered (after any 307), `location` the absolute session URL.
 */
export async function postOffer(endpoint, sdp, { token = null, signal } = {}) {
  let response;
  const init = {
    method: "POST",
    headers: { "Content-Type": "application/sdp", ...authHeaders(token) },
    body: sdp,
    redirect: "follow",
    cache: "no-store",
    signal,
  };
  try {
    response = await fetch(endpoint, init);
    // Browsers drop Authorization when a redirect crosses origins; ask the new origin directly.
    if (response.status === 401 && response.redirected && token) {
      response = await fetch(response.url, init);
    }
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new SignalingError(`cannot reach ${endpoint}: ${err.message}`, { status: 0, url: endpoint });
  }
  const url = response.url || endpoint;
  if (response.status !== 201 && response.status !== 200) {
    const reason = await reasonOf(response);
    throw new SignalingError(`${response.status} ${response.statusText}${reason ? `: ${reason}` : ""}`, {
      status: response.status,
      retryAfter: parseRetryAfter(response.headers.get("Retry-After")),
      url,
    });
  }
  const answer = await response.text();
  const locationHeader = response.headers.get("Location");
  if (!locationHeader) {
    throw new SignalingError(
      `${response.status} from ${url} has no readable Location header ` +
      "(cross-origin servers must send Access-Control-Expose-Headers: Location, ETag)",
      { status: response.status, url },
    );
  }
  return {
    answer,
    location: new URL(locationHeader, url).href,
    etag: response.headers.get("ETag"),
    url,
    iceServers: parseIceServerLinks(response.headers.get("Link")),
  };
}

/** Send trickled candidates (RFC 9725 §4.3.1). Returns false if the server does not trickle. */
export async function patchCandidates(location, { etag, token, ufrag, pwd, mid, candidates, end = false }) {
  const lines = [`a=ice-ufrag:${ufrag}`, `a=ice-pwd:${pwd}`, `m=audio 9 RTP/AVP 0`, `a=mid:${mid}`];
  for (const c of candidates) lines.push(`a=${c}`);
  if (end) lines.push("a=end-of-candidates");
  const headers = { "Content-Type": "application/trickle-ice-sdpfrag", ...authHeaders(token) };
  if (etag) headers["If-Match"] = etag;
  try {
    const response = await fetch(location, { method: "PATCH", headers, body: lines.join("\r\n") + "\r\n" });
    return response.ok;
  } catch {
    return false;
  }
}

/** End a session; never throws (the server may already be gone) and never waits longer than
 *  `timeoutMs` (a hung server accepts the connection and never answers). */
export async function deleteSession(location, token = null, { timeoutMs = 2000 } = {}) {
  if (!location) return false;
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), timeoutMs);
  try {
    const response = await fetch(location, {
      method: "DELETE", headers: authHeaders(token), keepalive: true, signal: ctrl.signal,
    });
    return response.ok;
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
  }
}

/** ice-ufrag / ice-pwd of a local description, for trickle PATCH bodies. */
export function iceCredentials(sdp) {
  const ufrag = sdp.match(/a=ice-ufrag:(\S+)/);
  const pwd = sdp.match(/a=ice-pwd:(\S+)/);
  const mid = sdp.match(/a=mid:(\S+)/);
  return { ufrag: ufrag ? ufrag[1] : "", pwd: pwd ? pwd[1] : "", mid: mid ? mid[1] : "0" };
}

/** Move preferred codecs to the front of a transceiver's list (if the browser supports it). */
export function preferCodecs(transceiver, kind, mimeTypes) {
  if (!transceiver.setCodecPreferences || !window.RTCRtpReceiver?.getCapabilities) return;
  const caps = RTCRtpReceiver.getCapabilities(kind);
  if (!caps) return;
  const wanted = mimeTypes.map((m) => m.toLowerCase());
  const rank = (c) => {
    const i = wanted.indexOf(c.mimeType.toLowerCase());
    return i === -1 ? wanted.length : i;
  };
  const codecs = [...caps.codecs].sort((a, b) => rank(a) - rank(b));
  try {
    transceiver.setCodecPreferences(codecs);
  } catch (err) {
    console.warn("setCodecPreferences failed", err);
  }
}

export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); reject(new DOMException("aborted", "AbortError")); }, { once: true });
  });
}
