// WHEP player with a reconnect ladder.
//
// start(): POST a recvonly audio+video offer to <node>/whep/<stream>; fetch follows 307s, and the
// URL that finally answered names the relay we were placed on (`relayOrigin`). 409/503/5xx and
// network errors are retried, honouring Retry-After.
//
// When the connection breaks the ladder climbs one rung at a time:
//   1. ICE restart over PATCH (RFC 9725 §4.3.2), if the server supports it;
//   2. a new WHEP session on the same relay;
//   3. re-placement: /api/streams/<id>/edge or a WHEP POST on any known node (which may 307),
//      skipping the relay that failed.
// Known nodes: the page's origin, ?nodes=, and every serving relay the placement API lists
// (`nodes` / `Lotcast-Nodes`, refreshed with `?peek=1` while playing), so the ladder never
// depends on one node: when the relay that served the page dies, the others still place us.
// `replace(reason)` jumps straight to rung 3 (used for a server drain/reconnect event).
//
// WHEP extensions (draft-ietf-wish-whep, docs/http-api.md): each session subscribes to the
// server-sent events it advertises (Link rel urn:ietf:params:whep:ext:core:server-sent-events;
// a node whose Link header the page cannot read is tried at <session>/sse). `viewercount`,
// `layers` and `active`/`inactive` become properties and events of the player; `reconnect`
// moves make-before-break to the URL it names (then placement, as for any re-placement).
// `chooseLayer()` POSTs the viewer's layer choice (rel urn:ietf:params:whep:ext:core:layer).
//
// States: idle, connecting, waiting (stream not live / overloaded, will retry), connected,
// reconnecting, failed, stopped. Events: "statechange" {state, detail}, "relaychange" {origin},
// "viewercount" {count}, "layers" {layers}, "streamactive" {active}, "layerchange" {layer}.

import {
  SignalingError, deleteSession, discoverIceServers, iceCredentials, iceServersStale, newPeerConnection, postOffer,
  preferCodecs, sleep, waitForIceGathering,
} from "./signaling.js";

const DEFAULT_RETRY_S = 2;
const MAX_RETRY_S = 30;
const DISCONNECT_GRACE_MS = 1500;
// No media bytes for this long makes the watchdog probe our session on the relay; only an
// unreachable relay, or one that no longer knows the session (it restarted, e.g. under a
// supervisor on the same port), triggers the ladder (a paused publisher is not a relay failure).
const STALL_MS = 1000;
const PROBE_TIMEOUT_MS = 1000;
// How often the list of serving nodes is refreshed while the player runs.
const NODES_REFRESH_MS = 5000;
const EDGE_TIMEOUT_MS = 2000;
const SSE_REL = "urn:ietf:params:whep:ext:core:server-sent-events";
const LAYER_REL = "urn:ietf:params:whep:ext:core:layer";
const SSE_EVENTS = ["active", "inactive", "layers", "reconnect", "viewercount"];

/** rel -> absolute URL from a Link header (only link-values with a rel). */
export function parseLinks(header, base) {
  const out = {};
  for (const part of (header || "").split(/,(?=\s*<)/)) {
    const m = part.match(/<([^>]+)>(.*)/);
    const rel = m && m[2].match(/rel="?([^";]+)"?/i);
    if (m && rel) out[rel[1]] = new URL(m[1], base).href;
  }
  return out;
}

function originOf(url) {
  return new URL(url, location.href).origin;
}

export class WhepPlayer extends EventTarget {
  /**
   * @param {{stream: string, nodes?: string[], token?: string|null, video: HTMLVideoElement,
   *          videoCodecs?: string[], gatherTimeoutMs?: number}} opts
   * `nodes` are base URLs (origins) of nodes that can place us; the page's origin is always one.
   */
  constructor(opts) {
    super();
    this.stream = opts.stream;
    this.token = opts.token || null;
    this.video = opts.video;
    this.videoCodecs = opts.videoCodecs || ["video/VP8", "video/H264"];
    this.gatherTimeoutMs = opts.gatherTimeoutMs ?? 1000;
    this.nodes = [...new Set([location.origin, ...(opts.nodes || []).map(originOf)])];
    this.serving = []; // origins of the relays the registry last listed as serving
    this._nodesTimer = null;
    this.pc = null;
    this.session = null; // {location, etag, endpoint}
    this.relayOrigin = null;
    this.state = "idle";
    this.detail = "";
    this.lastStatus = null; // last HTTP status seen from a WHEP endpoint
    this.lastError = null;
    this.reconnects = 0;
    this.sessionsStarted = 0;
    this._run = 0; // generation counter: bumping it cancels older loops
    this._abort = null;
    this._disconnectTimer = null;
    this._replacing = false;
    this._previous = null; // {pc, session} kept playing during a make-before-break move
    // Optional: origin -> node id (from the room's welcome), sent as ?exclude= on re-placement.
    this.nodeIdOf = opts.nodeIdOf || null;
    this.iceServers = opts.iceServers ?? null; // null: ask the first node (OPTIONS)
    // WHEP extensions of the current session
    this.events = null; // EventSource of the current session, when it has one
    this.eventsState = "none"; // none | subscribing | open | unsupported
    this.viewerCount = null; // from `viewercount`
    this.layers = []; // the `layers` event's video layers
    this.streamActive = null; // from `active` / `inactive`
    this.wantedLayer = null; // null = Auto; else the layer object POSTed
    this.layerStatus = null; // HTTP status of the last layer POST
    this.reconnectEvents = 0;
    this.lastReconnectUrl = null;
  }

  get endpointPath() {
    return `/whep/${encodeURIComponent(this.stream)}`;
  }

  _setState(state, detail = "") {
    if (state === this.state && detail === this.detail) return;
    this.state = state;
    this.detail = detail;
    this.dispatchEvent(new CustomEvent("statechange", { detail: { state, detail } }));
  }

  _setRelay(origin) {
    if (origin === this.relayOrigin) return;
    this.relayOrigin = origin;
    if (!this.nodes.includes(origin)) this.nodes.push(origin);
    this.dispatchEvent(new CustomEvent("relaychange", { detail: { origin } }));
  }

  /** Merge a placement answer's list of serving nodes (base URLs) into the known nodes. */
  learnNodes(urls) {
    const origins = [];
    for (const url of urls) {
      try {
        origins.push(originOf(url));
      } catch {
        // not a URL: ignore
      }
    }
    this.serving = [...new Set(origins)];
    for (const origin of this.serving) if (!this.nodes.includes(origin)) this.nodes.push(origin);
  }

  /** Ask the current relay (else any known node) which nodes are serving; places nobody. */
  async refreshNodes() {
    const first = this.relayOrigin ? [this.relayOrigin] : [];
    for (const node of [...new Set([...first, ...this.serving, ...this.nodes])]) {
      const url = new URL(`${node}/api/streams/${encodeURIComponent(this.stream)}/edge`);
      url.searchParams.set("peek", "1");
      const res = await this._fetchEdge(url);
      if (res) return true;
    }
    return false;
  }

  /** GET a placement URL with a timeout; learns its node list. Null when unreachable. */
  async _fetchEdge(url) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), EDGE_TIMEOUT_MS);
    try {
      const res = await fetch(url, {
        headers: { Accept: "application/json" }, cache: "no-store", signal: ctrl.signal,
      });
      const type = res.headers.get("Content-Type") || "";
      const body = res.ok && type.includes("json") ? await res.json() : null;
      const listed = body && Array.isArray(body.nodes) ? body.nodes :
        (res.headers.get("Lotcast-Nodes") || "").split(",").map((s) => s.trim()).filter(Boolean);
      if (listed.length) this.learnNodes(listed);
      return { res, body };
    } catch {
      return null; // no placement API here, or the node is down
    } finally {
      clearTimeout(timer);
    }
  }

  /** Begin playing; resolves once the first session is up (or the player is stopped). */
  async start() {
    const run = ++this._run;
    this._setState("connecting");
    clearInterval(this._nodesTimer);
    this._nodesTimer = setInterval(() => { void this.refreshNodes(); }, NODES_REFRESH_MS);
    // STUN/TURN servers the node advertises (none on a loopback setup); later 201 answers may
    // update them (Link headers) for the next session.
    if (this.iceServers === null) {
      this.iceServers = (await discoverIceServers(this.nodes[0] + this.endpointPath, { token: this.token })) ?? [];
    }
    await this._connectLoop(run, { endpoints: () => this.nodes.map((n) => n + this.endpointPath) });
  }

  /** Jump to re-placement (server asked us to move, or the relay is gone). */
  async replace(reason = "re-placement", preferred = null) {
    if (this._replacing) return; // one re-placement at a time
    this._replacing = true;
    try {
      await this._replace(reason, preferred);
    } finally {
      this._replacing = false;
    }
  }

  async _replace(reason, preferred) {
    const run = ++this._run;
    const avoid = this.relayOrigin;
    this.reconnects += 1;
    this._setState("reconnecting", reason);
    // Make before break: the old relay keeps playing (a draining relay still forwards) until the
    // new session shows its first frame; only then is the old session closed.
    this._detachPrevious();
    // A server-named URL (SSE `reconnect`) first, then placement as usual.
    const endpoints = async () => [...new Set([
      ...(preferred ? [preferred] : []), ...(await this._placementEndpoints(avoid))])];
    await this._connectLoop(run, { endpoints, avoid });
  }

  async stop() {
    this._run++;
    this._closeEvents();
    clearInterval(this._nodesTimer);
    this._nodesTimer = null;
    this._abort?.abort();
    await this._closePrevious();
    await this._closeSession();
    this._setState("stopped");
  }

  _detachPrevious() {
    if (!this.pc) return;
    this._closeEvents(); // the old relay has nothing more to tell
    this._closePrevious();
    clearTimeout(this._disconnectTimer);
    this._disconnectTimer = null;
    this._previous = { pc: this.pc, session: this.session };
    this.pc = null;
    this.session = null;
  }

  async _closePrevious() {
    const prev = this._previous;
    this._previous = null;
    if (!prev) return;
    prev.pc.close();
    if (prev.session) await deleteSession(prev.session.location, this.token);
  }

  /** Show `media` once `pc` decoded a frame (or after a bound), then drop the previous session. */
  async _handover(pc, media) {
    const deadline = performance.now() + 8000;
    while (performance.now() < deadline && pc === this.pc && pc.connectionState !== "closed") {
      let decoded = 0;
      try {
        (await pc.getStats()).forEach((s) => {
          if (s.type === "inbound-rtp" && s.kind === "video") decoded = s.framesDecoded || 0;
        });
      } catch {
        break;
      }
      if (decoded > 0) break;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    if (pc !== this.pc) return; // superseded meanwhile
    this._attach(media);
    await this._closePrevious();
  }

  _attach(media) {
    if (this.video.srcObject !== media) this.video.srcObject = media;
    this.video.play().catch(() => { /* autoplay policy: muted play normally succeeds */ });
  }

  // --- connection establishment -------------------------------------------------------------

  async _placementEndpoints(avoid) {
    // Serving relays first (freshest knowledge), then every other node we know, the failed one
    // last. The first placement answer is enough; the direct WHEP endpoints follow as fallbacks.
    const others = [...new Set([...this.serving, ...this.nodes])].filter((n) => n !== avoid);
    const out = [];
    for (const node of [...others, ...(avoid ? [avoid] : [])]) {
      const edge = await this._askEdge(node, avoid);
      if (edge && originOf(edge) !== avoid) {
        out.push(edge);
        break;
      }
    }
    for (const node of others) out.push(node + this.endpointPath);
    if (avoid) out.push(avoid + this.endpointPath); // last resort: it may have recovered
    return [...new Set(out)];
  }

  /**
   * Ask a node's placement API: GET /api/streams/<id>/edge with Accept: application/json answers
   * {whep_url, relay, node_id, nodes, ...}; a node that only redirects (307 to the WHEP URL) is
   * read from the final response URL. `exclude` names the node we are leaving.
   */
  async _askEdge(node, avoid) {
    const url = new URL(`${node}/api/streams/${encodeURIComponent(this.stream)}/edge`);
    const excluded = avoid && this.nodeIdOf ? this.nodeIdOf(avoid) : null;
    if (excluded) url.searchParams.set("exclude", excluded);
    const answer = await this._fetchEdge(url);
    if (!answer) return null;
    const { res, body } = answer;
    const target = body && (body.whep_url || body.url || body.location);
    if (target) return new URL(target, url).href;
    if (res.redirected && /\/whep\//.test(res.url)) return res.url;
    return null;
  }

  async _connectLoop(run, { endpoints, avoid = null }) {
    let attempt = 0;
    while (run === this._run) {
      const list = await endpoints();
      let wait = null;
      for (const endpoint of list) {
        if (run !== this._run) return;
        try {
          await this._openSession(run, endpoint);
          return;
        } catch (err) {
          if (err.name === "AbortError" || run !== this._run) return;
          this.lastError = err.message || String(err);
          if (err instanceof SignalingError) {
            this.lastStatus = err.status;
            if (!err.retryable) {
              this._setState("failed", this.lastError);
              return;
            }
            if (err.status === 409 || err.status === 503 || err.status === 429) {
              const s = err.retryAfter ?? DEFAULT_RETRY_S;
              wait = wait === null ? s : Math.min(wait, s);
            }
          }
          console.warn("WHEP", endpoint, this.lastError);
        }
      }
      attempt += 1;
      const backoff = wait ?? Math.min(MAX_RETRY_S, DEFAULT_RETRY_S * 2 ** Math.min(attempt - 1, 4) / 2);
      const seconds = Math.min(MAX_RETRY_S, Math.max(0.25, backoff));
      const why = this.lastStatus === 409 ? "stream not live yet" :
        this.lastStatus === 503 ? "relay at capacity" : this.lastError || "unreachable";
      this._setState("waiting", `${why}; retrying in ${seconds.toFixed(1)} s`);
      try {
        this._abort = new AbortController();
        await sleep(seconds * 1000, this._abort.signal);
      } catch {
        return;
      }
      void avoid;
    }
  }

  async _openSession(run, endpoint) {
    if (iceServersStale(this.iceServers)) {
      // a reconnect hours after the last 201: its TURN credentials are about to expire
      this.iceServers = (await discoverIceServers(endpoint, { token: this.token })) ?? this.iceServers;
    }
    const pc = newPeerConnection(this.iceServers);
    const audioTx = pc.addTransceiver("audio", { direction: "recvonly" });
    const videoTx = pc.addTransceiver("video", { direction: "recvonly" });
    preferCodecs(audioTx, "audio", ["audio/opus"]);
    preferCodecs(videoTx, "video", this.videoCodecs);
    const media = new MediaStream();
    const handover = !!this._previous; // keep showing the old relay until this one has a frame
    pc.addEventListener("track", (ev) => {
      media.addTrack(ev.track);
      if (!handover) this._attach(media);
    });
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await waitForIceGathering(pc, this.gatherTimeoutMs);
      this._abort = new AbortController();
      const result = await postOffer(endpoint, pc.localDescription.sdp, {
        token: this.token, signal: this._abort.signal,
      });
      this.lastStatus = 201;
      if (result.iceServers.length) this.iceServers = result.iceServers;
      if (run !== this._run) {
        pc.close();
        await deleteSession(result.location, this.token);
        return;
      }
      await pc.setRemoteDescription({ type: "answer", sdp: result.answer });
      await this._closeSession(); // an older session, if any
      this.pc = pc;
      this.session = { location: result.location, etag: result.etag, endpoint: result.url };
      this.sessionsStarted += 1;
      this.session.links = parseLinks(result.linkHeader, result.location);
      void this._subscribeEvents(run, this.session);
      if (this.wantedLayer) void this.chooseLayer(this.wantedLayer); // the choice moves along
      this._setRelay(originOf(result.url));
      this._watch(run, pc);
      this._setState("connecting", `session on ${originOf(result.url)}`);
      this.dispatchEvent(new CustomEvent("session", { detail: { ...this.session } }));
      void this.refreshNodes(); // know where else to go before this relay can fail
      if (handover) this._handover(pc, media);
    } catch (err) {
      pc.close();
      throw err;
    }
  }

  _watch(run, pc) {
    const onChange = () => {
      if (run !== this._run || pc !== this.pc) return;
      const s = pc.connectionState;
      if (s === "connected") {
        clearTimeout(this._disconnectTimer);
        this._disconnectTimer = null;
        this._setState("connected", "");
      } else if (s === "failed") {
        this._climb(run, "connection failed");
      } else if (s === "disconnected" && !this._disconnectTimer) {
        this._setState("reconnecting", "connection interrupted");
        this._disconnectTimer = setTimeout(() => {
          this._disconnectTimer = null;
          if (run === this._run && pc === this.pc && pc.connectionState !== "connected") {
            this._climb(run, "connection lost");
          }
        }, DISCONNECT_GRACE_MS);
      }
    };
    pc.addEventListener("connectionstatechange", onChange);
    pc.addEventListener("iceconnectionstatechange", onChange);
    this._startWatchdog(run, pc);
  }

  /** Detect a dead relay faster than ICE consent does (which takes several seconds). */
  _startWatchdog(run, pc) {
    let lastBytes = -1;
    let lastChange = performance.now();
    let probing = false;
    let quietUntil = 0;
    const timer = setInterval(async () => {
      if (run !== this._run || pc !== this.pc || pc.connectionState === "closed") {
        clearInterval(timer);
        return;
      }
      let bytes = 0;
      try {
        (await pc.getStats()).forEach((s) => { if (s.type === "inbound-rtp") bytes += s.bytesReceived || 0; });
      } catch {
        return;
      }
      const now = performance.now();
      if (bytes !== lastBytes) {
        lastBytes = bytes;
        lastChange = now;
        return;
      }
      if (probing || now - lastChange < STALL_MS || now < quietUntil || bytes === 0) return;
      probing = true;
      const verdict = await this._probeSession(pc, this.session);
      probing = false;
      if (run !== this._run || pc !== this.pc) return;
      if (verdict === "ok") {
        quietUntil = now + 3000; // relay and session are fine: the stream itself paused
      } else {
        clearInterval(timer);
        if (verdict === "unreachable") this._climb(run, "relay unreachable", { unreachable: true });
        else this._climb(run, "session gone (relay restarted?)");
      }
    }, 250);
  }

  /**
   * Does the relay still have our session? A trickle PATCH without candidates (our current ICE
   * credentials, so never an ICE restart) changes nothing on a live session; a relay that lost
   * it answers 404. Returns "ok", "gone" (404) or "unreachable" (no answer in time).
   */
  async _probeSession(pc, session) {
    if (!session?.location || !pc.localDescription) return "ok";
    const { ufrag, pwd } = iceCredentials(pc.localDescription.sdp);
    const headers = { "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": session.etag || "*" };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), PROBE_TIMEOUT_MS);
    try {
      const res = await fetch(session.location, {
        method: "PATCH", headers, body: `a=ice-ufrag:${ufrag}\r\na=ice-pwd:${pwd}\r\n`,
        cache: "no-store", signal: ctrl.signal,
      });
      return res.status === 404 ? "gone" : "ok";
    } catch {
      return "unreachable";
    } finally {
      clearTimeout(timer);
    }
  }

  // --- reconnect ladder ---------------------------------------------------------------------

  async _climb(run, reason, { unreachable = false } = {}) {
    if (run !== this._run) return;
    const next = ++this._run;
    this.reconnects += 1;
    this._setState("reconnecting", reason);
    const failed = this.session;
    // Rung 1: ICE restart on the same session.
    if (failed && !unreachable && (await this._iceRestart(next))) return;
    if (next !== this._run) return;
    // Rung 2: a fresh session on the same relay (one quick try).
    await this._closeSession({ wait: !unreachable });
    if (failed && !unreachable) {
      try {
        await this._openSession(next, failed.endpoint);
        return;
      } catch (err) {
        if (next !== this._run) return;
        this.lastError = err.message || String(err);
        if (err instanceof SignalingError) this.lastStatus = err.status;
      }
    }
    // Rung 3: re-placement, avoiding the relay that failed.
    const avoid = failed ? originOf(failed.endpoint) : null;
    await this._connectLoop(next, { endpoints: () => this._placementEndpoints(avoid), avoid });
  }

  /** ICE restart via PATCH with If-Match; true if the server took it and ICE came back. */
  async _iceRestart(run) {
    const pc = this.pc;
    const session = this.session;
    if (!pc || !session?.etag || pc.signalingState === "closed") return false;
    try {
      const offer = await pc.createOffer({ iceRestart: true });
      await pc.setLocalDescription(offer);
      const ufrag = offer.sdp.match(/a=ice-ufrag:(\S+)/)[1];
      const pwd = offer.sdp.match(/a=ice-pwd:(\S+)/)[1];
      const body = `a=ice-ufrag:${ufrag}\r\na=ice-pwd:${pwd}\r\n`;
      const headers = { "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*" };
      if (this.token) headers.Authorization = `Bearer ${this.token}`;
      const res = await fetch(session.location, { method: "PATCH", headers, body });
      if (res.status !== 200 || run !== this._run) {
        await pc.setLocalDescription({ type: "rollback" }).catch(() => {});
        return false;
      }
      const frag = await res.text();
      const rUfrag = frag.match(/a=ice-ufrag:(\S+)/);
      const rPwd = frag.match(/a=ice-pwd:(\S+)/);
      if (!rUfrag || !rPwd) return false;
      let sdp = pc.remoteDescription.sdp
        .replace(/a=ice-ufrag:\S+/g, `a=ice-ufrag:${rUfrag[1]}`)
        .replace(/a=ice-pwd:\S+/g, `a=ice-pwd:${rPwd[1]}`);
      const cands = frag.match(/a=candidate:[^\r\n]+/g) || [];
      if (cands.length) {
        sdp = sdp.replace(/a=candidate:[^\r\n]+\r\n/g, "");
        sdp = sdp.replace(/(m=[^\r\n]+\r\n)/, `$1${cands.join("\r\n")}\r\n`);
      }
      await pc.setRemoteDescription({ type: "answer", sdp });
      session.etag = res.headers.get("ETag") || session.etag;
      const ok = await new Promise((resolve) => {
        const timer = setTimeout(() => resolve(false), 3000);
        const check = () => {
          if (pc.connectionState === "connected") { clearTimeout(timer); resolve(true); }
        };
        pc.addEventListener("connectionstatechange", check);
        check();
      });
      if (ok && run === this._run) {
        this._watch(run, pc);
        this._setState("connected", "");
        return true;
      }
    } catch (err) {
      console.warn("ICE restart not possible", err);
    }
    return false;
  }

  /** Close the current session; `wait: false` sends the DELETE without waiting for it (the
   *  relay is unreachable: a hung relay would hold the ladder for the DELETE's timeout). */
  async _closeSession({ wait = true } = {}) {
    this._closeEvents();
    clearTimeout(this._disconnectTimer);
    this._disconnectTimer = null;
    const pc = this.pc;
    const session = this.session;
    this.pc = null;
    this.session = null;
    if (pc) pc.close();
    if (!session) return;
    const sent = deleteSession(session.location, this.token);
    if (wait) await sent;
  }

  // --- WHEP extensions: server-sent events and layer choice ----------------------------------

  _emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }

  _closeEvents() {
    if (this.events) this.events.close();
    this.events = null;
    if (this.eventsState !== "unsupported") this.eventsState = "none";
  }

  /** POST the wanted event list to the session's SSE link; 201 names the event stream. */
  async _subscribeEvents(run, session) {
    const url = session.links?.[SSE_REL] ?? `${session.location}/sse`;
    this.eventsState = "subscribing";
    let res;
    try {
      const headers = { "Content-Type": "application/json" };
      if (this.token) headers.Authorization = `Bearer ${this.token}`;
      res = await fetch(url, { method: "POST", headers, body: JSON.stringify(SSE_EVENTS), cache: "no-store" });
    } catch {
      res = null;
    }
    if (run !== this._run || session !== this.session) return;
    if (!res || res.status !== 201 || !res.headers.get("Location")) {
      this.eventsState = "unsupported"; // a plain WHEP server: the ladder and the room remain
      return;
    }
    const source = new EventSource(new URL(res.headers.get("Location"), url).href);
    this.events = source;
    this.eventsState = "open";
    const on = (name, handler) => source.addEventListener(name, (ev) => {
      if (source !== this.events) return;
      let data = {};
      try {
        data = JSON.parse(ev.data || "{}");
      } catch {
        return;
      }
      handler(data);
    });
    on("viewercount", (data) => {
      if (typeof data.viewercount !== "number") return;
      this.viewerCount = data.viewercount;
      this._emit("viewercount", { count: data.viewercount });
    });
    on("layers", (data) => {
      this.layers = Array.isArray(data.video?.layers) ? data.video.layers : [];
      this._emit("layers", { layers: this.layers });
    });
    on("active", () => { this.streamActive = true; this._emit("streamactive", { active: true }); });
    on("inactive", () => { this.streamActive = false; this._emit("streamactive", { active: false }); });
    on("reconnect", (data) => {
      this.reconnectEvents += 1;
      this.lastReconnectUrl = typeof data.url === "string" ? new URL(data.url, url).href : null;
      this._closeEvents();
      void this.replace("relay asked us to reconnect", this.lastReconnectUrl);
    });
    source.addEventListener("error", () => {
      // The stream ended (session gone, relay exited) or broke: EventSource retries by itself
      // while the relay answers; a closed one is done.
      if (source === this.events && source.readyState === EventSource.CLOSED) this.events = null;
    });
  }

  /**
   * Ask for a layer: null = Auto (the server chooses), else one of `this.layers` (its
   * encodingId / spatialLayerId / temporalLayerId). Resolves to the HTTP status (0: unreachable).
   */
  async chooseLayer(layer) {
    const session = this.session;
    if (!session) return 0;
    const url = session.links?.[LAYER_REL] ?? `${session.location}/layer`;
    const body = {};
    if (layer) {
      if (layer.encodingId !== undefined) body.encodingId = layer.encodingId;
      if (layer.spatialLayerId !== undefined) body.spatialLayerId = layer.spatialLayerId;
      if (layer.temporalLayerId !== undefined) body.temporalLayerId = layer.temporalLayerId;
    }
    const headers = { "Content-Type": "application/json" };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    try {
      const res = await fetch(url, { method: "POST", headers, body: JSON.stringify(body), cache: "no-store" });
      this.layerStatus = res.status;
      if (res.ok) {
        this.wantedLayer = layer;
        this._emit("layerchange", { layer });
      }
      return res.status;
    } catch {
      this.layerStatus = 0;
      return 0;
    }
  }
}
