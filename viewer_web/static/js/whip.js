// WHIP publisher: one RTCPeerConnection, sendonly audio + video, published with one POST.
//
// The offer is sent once ICE gathering completes (bounded wait); candidates that arrive later
// are trickled with PATCH (ignored if the server answers 405/501 — aiortc-based servers gather
// everything up front and our loopback candidates are normally all in the offer).

import {
  deleteSession, iceCredentials, patchCandidates, postOffer, preferCodecs, waitForIceGathering,
} from "./signaling.js";

export class WhipPublisher extends EventTarget {
  /**
   * @param {string} endpoint  e.g. "/whip/main"
   * @param {{token?: string, iceServers?: RTCIceServer[], videoCodecs?: string[], gatherTimeoutMs?: number}} opts
   */
  constructor(endpoint, opts = {}) {
    super();
    this.endpoint = endpoint;
    this.token = opts.token || null;
    this.iceServers = opts.iceServers || [];
    this.videoCodecs = opts.videoCodecs || ["video/VP8", "video/H264"];
    this.gatherTimeoutMs = opts.gatherTimeoutMs ?? 1500;
    this.pc = null;
    this.location = null;
    this.etag = null;
    this.state = "idle"; // idle | connecting | live | failed | stopped
    this.error = null;
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
    const pc = new RTCPeerConnection({ iceServers: this.iceServers, bundlePolicy: "max-bundle" });
    this.pc = pc;
    pc.addEventListener("connectionstatechange", () => {
      this.dispatchEvent(new CustomEvent("connectionstatechange", { detail: pc.connectionState }));
      if (pc !== this.pc) return;
      if (pc.connectionState === "connected") this._setState("live");
      else if (pc.connectionState === "failed") this._setState("failed", "ICE/DTLS connection failed");
    });
    const audio = stream.getAudioTracks()[0];
    const video = stream.getVideoTracks()[0];
    if (!audio && !video) throw new Error("nothing to publish: no audio or video track");
    // Always negotiate both m-lines so the server sees a stable layout; a missing track is
    // simply an inactive sender.
    const audioTx = pc.addTransceiver(audio || "audio", { direction: "sendonly", streams: [stream] });
    const videoTx = pc.addTransceiver(video || "video", { direction: "sendonly", streams: [stream] });
    preferCodecs(audioTx, "audio", ["audio/opus"]);
    preferCodecs(videoTx, "video", this.videoCodecs);

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
      await pc.setRemoteDescription({ type: "answer", sdp: result.answer });
      if (!complete) this._trickleRest(pc, late);
    } catch (err) {
      this._setState("failed", err.message || String(err));
      await this._teardown();
      throw err;
    }
  }

  async _trickleRest(pc, late) {
    await waitForIceGathering(pc, 5000);
    if (pc !== this.pc || !this.location) return;
    const { ufrag, pwd, mid } = iceCredentials(pc.localDescription.sdp);
    await patchCandidates(this.location, {
      etag: this.etag, token: this.token, ufrag, pwd, mid, candidates: late, end: true,
    });
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
