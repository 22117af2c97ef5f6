// The chat panel of both pages (docs/protocol.md "Chat", "Moderation"): the transcript in log
// order, my messages in flight (pending -> sent, or refused with the reason), deleted messages
// removed, auto-scroll that pauses while the reader is scrolled up, and for the host and
// moderators one-click delete / mute / ban (and, for the host, moderator) on a message's author.
//
// Screen readers: the list itself is not a live region (a busy chat would never stop talking);
// a polite summary ("3 new messages, latest from Ann: …") is updated at most every SUMMARY_MS,
// and the result of my own message goes to a status line.
//
// Elements, under `root` (ids prefixed with `prefix`, "chat" on both pages):
//   #<p>-list (ol; li.chat-msg[data-id][data-user][data-state=sent] for the transcript,
//   li.chat-msg[data-cid][data-state=pending|sent|refused] for my messages in flight, with
//   .reason; action buttons button.chat-act[data-act=question|delete|mute|ban|mod])
//   #<p>-new (jump to the newest), #<p>-summary (polite live summary), #<p>-input, #<p>-send,
//   #<p>-status (role=status: my message's result), #<p>-notice (data-state =
//   none|muted|banned|slow|signin: why I can or cannot chat)

import { reasonText } from "./auction_ui.js";

const SUMMARY_MS = 8000;
const FOLLOW_SLACK_PX = 40;

export function formatClock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function iconButton(act, emoji, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "small chat-act";
  b.dataset.act = act;
  b.textContent = emoji;
  b.setAttribute("aria-label", label);
  b.title = label;
  b.addEventListener("click", onClick);
  return b;
}

/**
 * @param {RoomClient} room
 * @param {{prefix?: string, muteMs?: () => number, onError?: (err) => void}} opts
 */
export function mountChat(room, opts = {}) {
  const p = opts.prefix || "chat";
  const el = (name) => document.getElementById(`${p}-${name}`);
  const list = el("list");
  const input = el("input");
  const send = el("send");
  const newBtn = el("new");
  const muteMs = opts.muteMs || (() => 5 * 60 * 1000);
  const onError = opts.onError || ((err) => setStatus(reasonText(err)));
  const nodes = new Map(); // key ("m:<id>" | "o:<cid>") -> li
  let follow = true;
  let unseen = 0;
  let unannounced = [];
  let lastAnnounce = 0;
  let summaryTimer = null;
  let statusText = "";
  const api = { follow: () => follow, unseen: () => unseen, render };

  function setStatus(text) {
    statusText = text;
    const s = el("status");
    if (s.textContent !== text) s.textContent = text;
  }

  function atBottom() {
    return list.scrollHeight - list.scrollTop - list.clientHeight <= FOLLOW_SLACK_PX;
  }

  function scrollToEnd() {
    list.scrollTop = list.scrollHeight;
    follow = true;
    unseen = 0;
    renderNewButton();
  }

  function renderNewButton() {
    newBtn.classList.toggle("hidden", unseen === 0);
    newBtn.textContent = `${unseen} new message${unseen === 1 ? "" : "s"} ↓`;
    newBtn.dataset.count = String(unseen);
  }

  list.addEventListener("scroll", () => {
    follow = atBottom();
    if (follow && unseen) {
      unseen = 0;
      renderNewButton();
    }
  });
  newBtn.addEventListener("click", () => {
    scrollToEnd();
    list.querySelector("li:last-child button, li:last-child")?.focus?.();
  });

  function announce() {
    summaryTimer = null;
    if (!unannounced.length) return;
    const last = unannounced[unannounced.length - 1];
    const n = unannounced.length;
    el("summary").textContent = `${n} new chat message${n === 1 ? "" : "s"}, latest from ${last.name || last.user}: ${last.text.slice(0, 80)}`;
    unannounced = [];
    lastAnnounce = Date.now();
  }

  function queueAnnounce(msgs) {
    unannounced.push(...msgs);
    if (summaryTimer) return;
    summaryTimer = setTimeout(announce, Math.max(0, lastAnnounce + SUMMARY_MS - Date.now()));
  }

  function moderate(type, fields) {
    room.request(type, fields).catch(onError);
  }

  function actionsFor(m, me) {
    const out = [];
    const mine = me && m.user === me;
    const mod = room.canModerate();
    const host = room.identity?.role === "host";
    const who = m.name || m.user;
    if (!m.question && (mine || mod)) {
      out.push(iconButton("question", "?", `Mark the message from ${who} as a question`,
        () => moderate("question_mark", { message: m.id })));
    }
    // only the host acts on a moderator (docs/protocol.md "Moderation": On whom)
    if (mod && !mine && m.role !== "host" && (host || m.role !== "moderator")) {
      out.push(iconButton("delete", "🗑", `Delete the message from ${who}`,
        () => moderate("chat_delete", { message: m.id })));
      out.push(iconButton("mute", "🔇", `Mute ${who} for ${Math.round(muteMs() / 60000)} min`,
        () => moderate("user_mute", { user: m.user, duration_ms: muteMs() })));
      out.push(iconButton("ban", "⛔", `Ban ${who} from the room`,
        () => moderate("user_ban", { user: m.user })));
      if (host && !room.show.moderators.has(m.user)) {
        out.push(iconButton("mod", "★", `Make ${who} a moderator`,
          () => moderate("moderator_grant", { user: m.user })));
      }
    } else if (mod && mine) {
      out.push(iconButton("delete", "🗑", "Delete my message",
        () => moderate("chat_delete", { message: m.id })));
    }
    return out;
  }

  function messageNode(key) {
    let li = nodes.get(key);
    if (!li) {
      li = document.createElement("li");
      li.className = "chat-msg";
      li.innerHTML = `<span class="who"></span><span class="role"></span><span class="text"></span><span class="reason"></span><span class="acts"></span>`;
      nodes.set(key, li);
    }
    return li;
  }

  function fill(li, { who, role, text, state, reason, sig, acts }) {
    if (li.dataset.sig === sig) return;
    li.dataset.sig = sig;
    li.dataset.state = state;
    li.querySelector(".who").textContent = who;
    const r = li.querySelector(".role");
    r.textContent = role && role !== "bidder" ? role : "";
    r.dataset.role = role || "";
    li.querySelector(".text").textContent = text;
    li.querySelector(".reason").textContent = reason;
    li.querySelector(".acts").replaceChildren(...acts());
  }

  function render() {
    const me = room.identity?.user ?? null;
    const show = room.show;
    const wanted = [];
    const fresh = [];
    const modSig = `${room.canModerate()}:${room.identity?.role}:${[...show.moderators].join(",")}`;
    for (const m of show.chat.values()) {
      const key = `m:${m.id}`;
      const isNew = !nodes.has(key);
      const li = messageNode(key);
      li.dataset.id = m.id;
      li.dataset.user = m.user;
      li.classList.toggle("mine", m.user === me);
      li.classList.toggle("question", !!m.question);
      fill(li, {
        who: m.user === me ? `${m.name || m.user} (you)` : (m.name || m.user),
        role: m.role, text: m.text, state: "sent", reason: m.question ? "question" : "",
        sig: `${m.question}:${m.user === me}:${modSig}`, acts: () => actionsFor(m, me),
      });
      wanted.push(li);
      if (isNew && m.user !== me) fresh.push(m);
    }
    for (const o of show.outbox) {
      const li = messageNode(`o:${o.cid}`);
      li.dataset.cid = o.cid;
      li.classList.add("mine");
      const reason = o.state === "refused" ? reasonText(o.error || {}) : o.state === "pending" ? "sending…" : "sent";
      fill(li, {
        who: "you", role: "", text: o.text, state: o.state, reason, sig: `${o.state}:${reason}`,
        acts: () => o.state !== "refused" ? [] : [iconButton("dismiss", "✕", "Dismiss the refused message", () => {
          show.dismiss(o.cid);
          render();
        })],
      });
      wanted.push(li);
    }
    const keep = new Set(wanted);
    for (const [key, li] of nodes) {
      if (!keep.has(li)) {
        li.remove();
        nodes.delete(key);
      }
    }
    // Reorder only where needed (appending is the common case).
    let cursor = list.firstElementChild;
    for (const li of wanted) {
      if (li === cursor) {
        cursor = cursor.nextElementSibling;
      } else {
        list.insertBefore(li, cursor);
      }
    }
    if (follow) {
      list.scrollTop = list.scrollHeight;
    } else if (fresh.length) {
      unseen += fresh.length;
      renderNewButton();
    }
    if (fresh.length) queueAnnounce(fresh);
    renderComposer(me);
    list.dataset.count = String(show.chat.size);
  }

  function renderComposer(me) {
    const show = room.show;
    const notice = el("notice");
    const until = show.mutedUntil(me, room.serverNow());
    let state = "none";
    let text = "";
    if (room.bannedReason) {
      state = "banned";
      text = "You are banned from this room: you can watch, but not chat, bid or vote.";
    } else if (!me) {
      state = "signin";
      text = "Sign in with a token to chat.";
    } else if (until) {
      state = "muted";
      text = `You are muted until ${formatClock(until - room.clockOffsetMs)}: you can watch, but not chat, bid or vote.`;
    } else if (show.slowMode > 0 && !room.canModerate()) {
      state = "slow";
      text = `Slow mode: one message every ${show.slowMode} s.`;
    }
    notice.dataset.state = state;
    if (notice.textContent !== text) notice.textContent = text;
    const blocked = state === "banned" || state === "signin" || state === "muted" || room.status !== "open";
    input.disabled = blocked;
    send.disabled = blocked;
  }

  async function submit() {
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    setStatus("Sending…");
    scrollToEnd();
    try {
      await room.sendChat(text);
      setStatus("Message sent.");
    } catch (err) {
      setStatus(`Message refused: ${reasonText(err)}`);
    }
    render();
  }

  send.addEventListener("click", submit);
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      submit();
    }
  });
  room.addEventListener("change", render);
  // a mute ends by time, without an event
  setInterval(() => renderComposer(room.identity?.user ?? null), 1000);
  api.status = () => statusText;
  /** What the panel shows (tests): [{id|cid, user, state, text, reason}] in order, the notice. */
  api.view = () => ({
    items: [...list.children].map((li) => ({
      id: li.dataset.id ?? null, cid: li.dataset.cid ?? null, user: li.dataset.user ?? null,
      state: li.dataset.state, text: li.querySelector(".text").textContent,
      reason: li.querySelector(".reason").textContent,
    })),
    notice: el("notice").dataset.state, noticeText: el("notice").textContent,
    status: statusText, follow, unseen,
  });
  render();
  return api;
}
