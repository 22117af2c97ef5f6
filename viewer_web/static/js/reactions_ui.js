// Reaction buttons and their floating animation (docs/protocol.md "Reactions"). A tap is one
// `react` request; what floats up is driven by the room's coalesced `reactions` frames (at most
// ~5 a second, cumulative counts): each frame's new taps, capped per frame so a flood stays a
// flurry. The count badges are not a live region (they change several times a second).
//
// Elements: #<p>-bar > button.react[data-reaction=name] (aria-label) with .count;
// #<p>-stage (the floating layer, aria-hidden); #<p>-hint (a refusal, e.g. rate limited).

import { reasonText } from "./auction_ui.js";
import { REACTIONS } from "./show_state.js";

const MAX_FLOATS_PER_FRAME = 8; // per reaction
const FLOAT_MS = 1800;

export function mountReactions(room, { prefix = "react" } = {}) {
  const bar = document.getElementById(`${prefix}-bar`);
  const stage = document.getElementById(`${prefix}-stage`);
  const hint = document.getElementById(`${prefix}-hint`);
  const reduced = window.matchMedia?.("(prefers-reduced-motion: reduce)");
  const stats = { floated: 0, frames: 0 };
  const buttons = new Map();

  for (const r of REACTIONS) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "react";
    b.dataset.reaction = r.name;
    b.setAttribute("aria-label", `React with a ${r.label}`);
    b.title = r.label;
    const icon = document.createElement("span");
    icon.setAttribute("aria-hidden", "true");
    icon.textContent = r.emoji;
    const count = document.createElement("span");
    count.className = "count";
    count.setAttribute("aria-hidden", "true");
    b.append(icon, count);
    b.addEventListener("click", () => {
      hint.textContent = "";
      room.react(r.name).catch((err) => { hint.textContent = reasonText(err); });
    });
    bar.append(b);
    buttons.set(r.name, { b, count });
  }

  function float(emoji, i) {
    stats.floated += 1;
    if (reduced?.matches) return;
    const span = document.createElement("span");
    span.className = "float";
    span.textContent = emoji;
    span.style.left = `${10 + Math.random() * 80}%`;
    span.style.animationDelay = `${i * 90}ms`;
    span.style.animationDuration = `${FLOAT_MS}ms`;
    stage.append(span);
    const done = () => span.remove();
    span.addEventListener("animationend", done, { once: true });
    setTimeout(done, FLOAT_MS + i * 90 + 500); // hidden tabs may never end the animation
  }

  room.addEventListener("reactions", (ev) => {
    stats.frames += 1;
    for (const r of REACTIONS) {
      const n = Math.min(ev.detail.deltas[r.name] || 0, MAX_FLOATS_PER_FRAME);
      for (let i = 0; i < n; i++) float(r.emoji, i);
    }
  });

  function render() {
    const counts = room.show.reactions || {};
    const enabled = room.status === "open" && !!room.identity?.user && !room.bannedReason;
    for (const r of REACTIONS) {
      const { b, count } = buttons.get(r.name);
      const text = counts[r.name] ? String(counts[r.name]) : "";
      if (count.textContent !== text) count.textContent = text;
      b.dataset.count = String(counts[r.name] ?? 0);
      b.disabled = !enabled;
    }
  }

  room.addEventListener("change", render);
  render();
  return { stats: () => ({ ...stats, onStage: stage.childElementCount }) };
}
