// The host's moderation panel (docs/protocol.md "Moderation"): moderators (grant by user id,
// revoke), muted and banned users (unmute, unban), slow mode, blocked words, and the moderation
// log. One-click delete / mute / ban on a message's author live in the chat panel (chat_ui.js);
// its mute uses the duration chosen here.
//
// Elements: #mod-mute-min (select, minutes), #mod-user (input) #mod-grant, #mod-moderators,
// #mod-muted, #mod-banned (ul > li[data-user] with a button), #mod-slow (input, seconds)
// #mod-slow-set #mod-slow-state, #mod-words (textarea, one per line) #mod-words-save, #mod-log.

import { formatClock } from "./chat_ui.js";

function userItem(user, label, act, actLabel, onClick) {
  const li = document.createElement("li");
  li.dataset.user = user;
  const who = document.createElement("span");
  who.textContent = label;
  const b = document.createElement("button");
  b.type = "button";
  b.className = "small";
  b.dataset.act = act;
  b.textContent = actLabel;
  b.setAttribute("aria-label", `${actLabel} ${user}`);
  b.addEventListener("click", onClick);
  li.append(who, b);
  return li;
}

const LOG_TEXT = {
  user_muted: (e) => `${e.by_name || e.by} muted ${e.user} until ${formatClock(e.until)}`,
  user_unmuted: (e) => `${e.by_name || e.by} unmuted ${e.user}`,
  user_banned: (e) => `${e.by_name || e.by} banned ${e.user}`,
  user_unbanned: (e) => `${e.by_name || e.by} unbanned ${e.user}`,
  moderator_granted: (e) => `${e.by_name || e.by} made ${e.user} a moderator`,
  moderator_revoked: (e) => `${e.by_name || e.by} revoked moderator from ${e.user}`,
  slow_mode: (e) => (e.seconds ? `${e.by_name || e.by} set slow mode to ${e.seconds} s` : `${e.by_name || e.by} turned slow mode off`),
  blocked_words: (e) => `${e.by_name || e.by} set ${e.words?.length ?? 0} blocked word(s)`,
};

export function mountModeration(room, { run, showError }) {
  const $ = (id) => document.getElementById(id);
  const muteMs = () => Number($("mod-mute-min").value || 5) * 60 * 1000;
  let wordsDirty = false;

  $("mod-grant").addEventListener("click", () => {
    const user = $("mod-user").value.trim();
    if (!user) { showError(new Error("enter the user id to make a moderator")); return; }
    run("moderator_grant", { user }).then(() => { $("mod-user").value = ""; }, () => {});
  });
  $("mod-slow-set").addEventListener("click", () => {
    const seconds = Number($("mod-slow").value.trim() || 0);
    if (!Number.isInteger(seconds) || seconds < 0 || seconds > 3600) {
      showError(new Error("slow mode is a whole number of seconds, 0 (off) to 3600"));
      return;
    }
    run("slow_mode", { seconds }).catch(() => {});
  });
  $("mod-words").addEventListener("input", () => { wordsDirty = true; });
  $("mod-words-save").addEventListener("click", () => {
    const words = $("mod-words").value.split("\n").map((w) => w.trim()).filter(Boolean);
    run("blocked_words", { words }).then(() => { wordsDirty = false; }, () => {});
  });

  function list(id, items) {
    const ul = $(id);
    const sig = JSON.stringify(items.map((i) => i.sig));
    if (ul.dataset.sig === sig) return;
    ul.dataset.sig = sig;
    ul.replaceChildren(...items.map((i) => i.node()));
  }

  function render() {
    const show = room.show;
    const now = room.serverNow();
    list("mod-moderators", [...show.moderators].sort().map((u) => ({
      sig: u, node: () => userItem(u, u, "revoke", "Revoke", () => run("moderator_revoke", { user: u }).catch(() => {})),
    })));
    list("mod-muted", [...show.muted].filter(([, until]) => until > now).map(([u, until]) => ({
      sig: `${u}:${until}`,
      node: () => userItem(u, `${u} until ${formatClock(until - room.clockOffsetMs)}`, "unmute", "Unmute",
        () => run("user_unmute", { user: u }).catch(() => {})),
    })));
    list("mod-banned", [...show.banned].sort().map((u) => ({
      sig: u, node: () => userItem(u, u, "unban", "Unban", () => run("user_unban", { user: u }).catch(() => {})),
    })));
    const slow = show.slowMode ? `on: one message per ${show.slowMode} s` : "off";
    if ($("mod-slow-state").textContent !== slow) $("mod-slow-state").textContent = slow;
    if (!wordsDirty && document.activeElement !== $("mod-words")) {
      const text = show.blockedWords.join("\n");
      if ($("mod-words").value !== text) $("mod-words").value = text;
    }
    list("mod-log", show.modLog.slice(0, 20).map((e) => ({
      sig: `${e.type}:${e.user}:${e.ts}`,
      node: () => {
        const li = document.createElement("li");
        li.textContent = (LOG_TEXT[e.type] || ((x) => x.type))(e);
        return li;
      },
    })));
  }

  room.addEventListener("change", render);
  render();
  return { muteMs };
}
