// getStats() summaries for the publisher (host) and the player (viewer).
//
// Each sampler keeps the previous report so rates (bits/s, frames/s) are computed over the
// interval between two calls. Values are plain numbers (or null when unknown) so the pages and
// the Playwright tests can read them from `window.lotcast`.

const NTP_EPOCH_OFFSET_MS = 2208988800000; // 1900-01-01 -> 1970-01-01

function byType(report, type, kind) {
  const out = [];
  report.forEach((s) => {
    if (s.type === type && (!kind || s.kind === kind || s.mediaType === kind)) out.push(s);
  });
  return out;
}

function selectedPair(report) {
  let pair = null;
  report.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId);
  });
  if (!pair) {
    report.forEach((s) => {
      if (s.type === "candidate-pair" && (s.selected || (s.nominated && s.state === "succeeded"))) pair = s;
    });
  }
  return pair;
}

function rate(now, prev, field, scale = 1) {
  if (!now || !prev || now[field] === undefined || prev[field] === undefined) return null;
  const dt = (now.timestamp - prev.timestamp) / 1000;
  if (dt <= 0) return null;
  return ((now[field] - prev[field]) * scale) / dt;
}

export class PublisherStats {
  constructor() {
    this.prev = new Map();
  }

  async sample(pc) {
    if (!pc) return null;
    const report = await pc.getStats();
    const vOut = byType(report, "outbound-rtp", "video")[0];
    const aOut = byType(report, "outbound-rtp", "audio")[0];
    const vRemote = byType(report, "remote-inbound-rtp", "video")[0];
    const aRemote = byType(report, "remote-inbound-rtp", "audio")[0];
    const pair = selectedPair(report);
    const summary = {
      videoBitrate: rate(vOut, this.prev.get("v"), "bytesSent", 8),
      audioBitrate: rate(aOut, this.prev.get("a"), "bytesSent", 8),
      framesEncoded: vOut?.framesEncoded ?? null,
      framesPerSecond: vOut?.framesPerSecond ?? rate(vOut, this.prev.get("v"), "framesEncoded"),
      frameWidth: vOut?.frameWidth ?? null,
      frameHeight: vOut?.frameHeight ?? null,
      packetsSent: (vOut?.packetsSent ?? 0) + (aOut?.packetsSent ?? 0),
      audioPacketsSent: aOut?.packetsSent ?? null,
      videoPacketsSent: vOut?.packetsSent ?? null,
      packetsLost: (vRemote?.packetsLost ?? 0) + (aRemote?.packetsLost ?? 0),
      rtt: vRemote?.roundTripTime ?? aRemote?.roundTripTime ?? pair?.currentRoundTripTime ?? null,
      nackCount: vOut?.nackCount ?? null,
      pliCount: vOut?.pliCount ?? null,
      qualityLimitation: vOut?.qualityLimitationReason ?? null,
      codec: vOut?.codecId ? report.get(vOut.codecId)?.mimeType ?? null : null,
    };
    if (vOut) this.prev.set("v", vOut);
    if (aOut) this.prev.set("a", aOut);
    return summary;
  }
}

export class PlayerStats {
  constructor() {
    this.prev = new Map();
  }

  async sample(pc) {
    if (!pc) return null;
    const report = await pc.getStats();
    const vIn = byType(report, "inbound-rtp", "video")[0];
    const aIn = byType(report, "inbound-rtp", "audio")[0];
    const pair = selectedPair(report);
    const pv = this.prev.get("v");
    const rtt = pair?.currentRoundTripTime ?? null;
    // Jitter-buffer delay over the last interval (seconds of buffering per emitted frame).
    let jitterBuffer = null;
    if (vIn?.jitterBufferEmittedCount) {
      const dCount = vIn.jitterBufferEmittedCount - (pv?.jitterBufferEmittedCount ?? 0);
      const dDelay = vIn.jitterBufferDelay - (pv?.jitterBufferDelay ?? 0);
      jitterBuffer = dCount > 0 ? dDelay / dCount : vIn.jitterBufferDelay / vIn.jitterBufferEmittedCount;
    }
    let decodeTime = null;
    if (vIn?.framesDecoded && vIn.totalDecodeTime !== undefined) {
      const dFrames = vIn.framesDecoded - (pv?.framesDecoded ?? 0);
      const dTime = vIn.totalDecodeTime - (pv?.totalDecodeTime ?? 0);
      decodeTime = dFrames > 0 ? dTime / dFrames : vIn.totalDecodeTime / vIn.framesDecoded;
    }
    // Network + buffering estimate: half the RTT, the jitter buffer and decoding.
    let latencyMs = null;
    if (jitterBuffer !== null) {
      latencyMs = 1000 * ((rtt ?? 0) / 2 + jitterBuffer + (decodeTime ?? 0));
    }
    // Sender-clock estimate: estimatedPlayoutTimestamp is the sender's NTP time of the media
    // being played now. It is only meaningful when the sender's clock agrees with ours (same
    // machine, or NTP-synced), so implausible values are dropped.
    let e2eMs = null;
    const ept = vIn?.estimatedPlayoutTimestamp ?? aIn?.estimatedPlayoutTimestamp;
    if (ept) {
      const v = (vIn ?? aIn).timestamp - (ept - NTP_EPOCH_OFFSET_MS);
      if (v > 0 && v < 10000) e2eMs = v;
    }
    const summary = {
      framesDecoded: vIn?.framesDecoded ?? 0,
      framesReceived: vIn?.framesReceived ?? null,
      framesDropped: vIn?.framesDropped ?? null,
      keyFramesDecoded: vIn?.keyFramesDecoded ?? null,
      framesPerSecond: vIn?.framesPerSecond ?? rate(vIn, pv, "framesDecoded"),
      frameWidth: vIn?.frameWidth ?? null,
      frameHeight: vIn?.frameHeight ?? null,
      videoBitrate: rate(vIn, pv, "bytesReceived", 8),
      audioBitrate: rate(aIn, this.prev.get("a"), "bytesReceived", 8),
      videoPacketsReceived: vIn?.packetsReceived ?? 0,
      audioPacketsReceived: aIn?.packetsReceived ?? 0,
      audioSamplesReceived: aIn?.totalSamplesReceived ?? null,
      packetsLost: (vIn?.packetsLost ?? 0) + (aIn?.packetsLost ?? 0),
      nackCount: vIn?.nackCount ?? null,
      pliCount: vIn?.pliCount ?? null,
      jitter: vIn?.jitter ?? null,
      rtt,
      jitterBufferMs: jitterBuffer === null ? null : jitterBuffer * 1000,
      latencyMs,
      e2eMs,
      codec: vIn?.codecId ? report.get(vIn.codecId)?.mimeType ?? null : null,
      audioCodec: aIn?.codecId ? report.get(aIn.codecId)?.mimeType ?? null : null,
    };
    if (vIn) this.prev.set("v", vIn);
    if (aIn) this.prev.set("a", aIn);
    return summary;
  }
}

export function formatBitrate(bps) {
  if (bps === null || bps === undefined || Number.isNaN(bps)) return "–";
  if (bps >= 1e6) return `${(bps / 1e6).toFixed(2)} Mbit/s`;
  return `${Math.round(bps / 1e3)} kbit/s`;
}

export function formatMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
  return `${Math.round(ms)} ms`;
}
