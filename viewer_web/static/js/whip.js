// WHIP publisher: one RTCPeerConnection, sendonly audio + video, published with one POST.
//
// The offer is sent once ICE gathering completes (bounded wait); candidates that arrive later
// are trickled with PATCH (ignored if the server answers 405/501 — aiortc-based servers gather
// everything up front and our loopback candidates are normally all in the offer).

import {
  deleteSession, discoverIceServers, iceCredentials, iceServersStale, newPeerConnection, patchCandidates, postOffer,
  preferCodecs,
  waitForIceGathering,
} from "./signaling.js";

const DISCONNECTED_GRACE_MS = 3000;
// no RTCP receiver report from the server for this long -> probe it (an OPTIONS with a 1 s
// bound: a reachable server costs nothing; a dead origin's stream is republished ~2 s sooner)
const SILENCE_MS = 1500;
const SUSPECT_SILENCE_MS = 1200; // ... or this long after the page saw the broadcaster drop

// Simulcast (RFC 8853): three VP8 layers, full / half / quarter resolution, listed top first
// (the broadcaster treats the a=simulcast order as high to low).
export const SIMULCAST_ENCODINGS = [
  { rid: "h", scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
  { rid: "m", scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: "l", scaleResolutionDownBy: 4, maxBitrate: 150_000 },
];

// Chromium's send-side estimate starts at 300 kb/s, and without REMB or transport-cc feedback
// (the broadcaster answers a simulcast offer without them, sdp.without_receive_estimate) it only
// grows ~8 % a second on loss-free receiver reports: a new session sent no top layer for ~11 s
// and paused its middle one for 1-2 s while the estimate settled, on every (re)publish, an origin
// move included. Starting at what the layers take (plus audio and headers) sends all three at
// once; a path that carries less loses packets and the loss-based estimate comes down from there.
export const SIMULCAST_START_KBPS = Math.round(
  SIMULCAST_ENCODINGS.reduce((sum, e) => sum + e.maxBitrate, 0) / 1000) + 100;

/** `sdp` (an answer) with x-google-start-bitrate on each VP8 payload type of its video section:
 * Chromium takes a sender's start estimate from the remote description's codec parameters. */
export function withStartBitrate(sdp, kbps) {
  const sections = sdp.split(/(?=\r?\nm=)/);
  return sections.map((section) => {
    if (!/^\r?\n?m=video /.test(section)) return section;
    const vp8 = [...section.matchAll(/a=rtpmap:(\d+) VP8\/90000/gi)].map((m) => m[1]);
    for (const pt of vp8) {
      const fmtp = new RegExp(`(a=fmtp:${pt} )([^\\r\\n]*)`);
      if (fmtp.test(section)) {
        section = section.replace(fmtp, (_m, head, params) => (/x-google-start-bitrate=/.test(params)
          ? `${head}${params}` : `${head}${params ? `${params};` : ""}x-google-start-bitrate=${kbps}`));
      } else {
        section = section.replace(new RegExp(`(a=rtpmap:${pt} VP8/90000)(\\r?\\n)`, "i"),
          `$1$2a=fmtp:${pt} x-google-start-bitrate=${kbps}$2`);
      }
    }
    return section;
  }).join("");
}

/** Simulcast layers are switched per viewer at VP8 key frames: only with a VP8 encoder. */
function canSimulcast() {
  const codecs = globalThis.RTCRtpSender?.getCapabilities?.("video")?.codecs || [];
  return codecs.some((c) => c.mimeType.toLowerCase() === "video/vp8");
}

/** A sendonly video transceiver with the simulcast layers when the browser takes them, else
 * one layer (no rids: the server then sees an ordinary single-layer offer). */
function addVideoTransceiver(pc, video, stream, simulcast) {
  if (simulcast && video && canSimulcast()) {
    try {
      const tx = pc.addTransceiver(video, {
        direction: "sendonly", streams: [stream], sendEncodings: SIMULCAST_ENCODINGS.map((e) => ({ ...e })),
      });
      const encodings = tx.sender.getParameters().encodings || [];
      if (encodings.length === SIMULCAST_ENCODINGS.length) return { tx, simulcast: true };
      pc.removeTrack(tx.sender);
      tx.stop();
    } catch {
      // no simulcast here: one layer below
    }
  }
  return { tx: pc.addTransceiver(video || "video", { direction: "sendonly", streams: [stream] }), simulcast: false };
}

export class WhipPublisher extends EventTarget {
  /**
   * @param {string} endpoint  e.g. "/whip/main"
   * @param {{token?: string, iceServers?: RTCIceServer[], videoCodecs?: string[], gatherTimeoutMs?: number, simulcast?: boolean}} opts
   */
  constructor(endpoint, opts = {}) {
    super();
    this.endpoint = endpoint;
    this.token = opts.token || null;
    this.iceServers = opts.iceServers ?? null; // null: ask the endpoint (OPTIONS, Link headers)
    this.videoCodecs = opts.videoCodecs || ["video/VP8", "video/H264"];
    this.gatherTimeoutMs = opts.gatherTimeoutMs ?? 1500;
    this.simulcast = opts.simulcast ?? false; // ask for SIMULCAST_ENCODINGS (VP8 only)
    this.simulcastActive = false; // the offer carried them
    this.pc = null;
    this.location = null;
    this.etag = null;
    this.state = "idle"; // idle | connecting | live | failed | stopped
    this.error = null;
    this._suspectUntil = 0;
  }

  _setState(state, error = null) {
    if (state === this.state && !error) return;
    this.state = state;
    this.error = error;
    this.dispatchEvent(new CustomEvent("statechange", { detail: { state, error } }));
  }

  /** Publish the tracks of `stream` (at most one audio and one video track). */
  async publish(stream) {
    if (this.pc) throw new Error(`already publishing (state ${this.state})`);
    this._setState("connecting");
    if (this.iceServers === null || iceServersStale(this.iceServers)) {
      this.iceServers = (await discoverIceServers(this.endpoint, { token: this.token }))
        ?? this.iceServers ?? [];
      if (this.state !== "connecting") return; // stopped meanwhile
    }
    const pc = newPeerConnection(this.iceServers);
    this.pc = pc;
    let lostTimer = null;
    pc.addEventListener("connectionstatechange", () => {
      this.dispatchEvent(new CustomEvent("connectionstatechange", { detail: pc.connectionState }));
      if (pc !== this.pc) return;
      clearTimeout(lostTimer);
      if (pc.connectionState === "connected") this._setState("live");
      else if (pc.connectionState === "failed") this._setState("failed", "ICE/DTLS connection failed");
      else if (pc.connectionState === "disconnected") {
        // ICE consent takes ~30 s to declare "failed"; a publisher should not wait that long.
        lostTimer = setTimeout(() => {
          if (pc === this.pc && pc.connectionState !== "connected") {
            this._setState("failed", "connection to the broadcaster lost");
          }
        }, DISCONNECTED_GRACE_MS);
      }
    });
    const audio = stream.getAudioTracks()[0];
    const video = stream.getVideoTracks()[0];
    if (!audio && !video) throw new Error("nothing to publish: no audio or video track");
    // Always negotiate both m-lines so the server sees a stable layout; a missing track is
    // simply an inactive sender.
    const audioTx = pc.addTransceiver(audio || "audio", { direction: "sendonly", streams: [stream] });
    const { tx: videoTx, simulcast } = addVideoTransceiver(pc, video, stream, this.simulcast);
    this.simulcastActive = simulcast;
    preferCodecs(audioTx, "audio", ["audio/opus"]);
    // simulcast layers are switched per viewer at VP8 key frames: VP8 first
    preferCodecs(videoTx, "video", simulcast ? ["video/VP8", ...this.videoCodecs.filter((c) => c !== "video/VP8")] : this.videoCodecs);

    const late = [];
    let posted = false;
    pc.addEventListener("icecandidate", (ev) => {
      if (posted && ev.candidate && ev.candidate.candidate) late.push(ev.candidate.candidate);
    });
    try {
      await pc.setLocalDescription(await pc.createOffer());
      const complete = await waitForIceGathering(pc, this.gatherTimeoutMs);
      posted = true;
      const result = await postOffer(this.endpoint, pc.localDescription.sdp, { token: this.token });
      this.location = result.location;
      this.etag = result.etag;
      if (pc !== this.pc) return; // stopped meanwhile
      const answer = simulcast ? withStartBitrate(result.answer, SIMULCAST_START_KBPS) : result.answer;
      await pc.setRemoteDescription({ type: "answer", sdp: answer });
      if (!complete) this._trickleRest(pc, late);
      this._startWatchdog(pc);
    } catch (err) {
      this._setState("failed", err.message || String(err));
      await this._teardown();
      throw err;
    }
  }

  /**
   * The server answers our media with RTCP receiver reports about once a second. When they stop
   * for a few seconds, check whether the broadcaster is reachable at all; if it is not, fail now
   * instead of waiting for ICE consent to expire.
   */
  _startWatchdog(pc) {
    let lastCount = -1;
    let lastChange = performance.now();
    let probing = false;
    const timer = setInterval(async () => {
      if (pc !== this.pc || pc.connectionState === "closed") {
        clearInterval(timer);
        return;
      }
      let reports = 0;
      try {
        (await pc.getStats()).forEach((s) => {
          if (s.type === "remote-inbound-rtp") reports += s.roundTripTimeMeasurements || 0;
        });
      } catch {
        return;
      }
      const now = performance.now();
      if (reports !== lastCount) {
        lastCount = reports;
        lastChange = now;
        return;
      }
      // (no report yet counts too: a server killed before its first one answers no probe)
      if (now < this._suspectUntil && now - lastChange >= SUSPECT_SILENCE_MS) {
        // The page saw the broadcaster go away (its room socket dropped) and RTCP stopped too.
        clearInterval(timer);
        this._setState("failed", "broadcaster connection lost");
        return;
      }
      if (probing || now - lastChange < SILENCE_MS) return;
      probing = true;
      let reachable = true;
      const ctrl = new AbortController();
      const t = setTimeout(() => ctrl.abort(), 1000);
      try {
        await fetch(this.endpoint, { method: "OPTIONS", cache: "no-store", signal: ctrl.signal });
      } catch {
        reachable = false;
      } finally {
        clearTimeout(t);
        probing = false;
      }
      if (!reachable && pc === this.pc) {
        clearInterval(timer);
        this._setState("failed", "broadcaster unreachable");
      } else {
        lastChange = now; // reachable: look again after another silent stretch
      }
    }, 500);
  }

  async _trickleRest(pc, late) {
    await waitForIceGathering(pc, 5000);
    if (pc !== this.pc || !this.location) return;
    const { ufrag, pwd, mid } = iceCredentials(pc.localDescription.sdp);
    await patchCandidates(this.location, {
      etag: this.etag, token: this.token, ufrag, pwd, mid, candidates: late, end: true,
    });
  }

  /** A hint from the page (e.g. its WebSocket to the same server dropped): check sooner. */
  suspect() {
    this._suspectUntil = performance.now() + 10000;
  }

  /** Swap the outgoing track of one kind without renegotiating (device change while live). */
  async replaceTrack(kind, track) {
    if (!this.pc) return;
    const tx = this.pc.getTransceivers().find((t) => t.receiver.track?.kind === kind);
    if (tx) await tx.sender.replaceTrack(track);
  }

  async _teardown() {
    const pc = this.pc;
    const location = this.location;
    this.pc = null;
    this.location = null;
    if (pc) pc.close();
    if (location) await deleteSession(location, this.token);
  }

  /** DELETE the session and close the connection. */
  async stop() {
    await this._teardown();
    this._setState("stopped");
  }
}
