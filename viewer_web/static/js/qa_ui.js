// The Q&A list (docs/protocol.md "Q&A"): open questions sorted by votes. Viewers upvote (once;
// not their own); the host marks one answered. Votes come coalesced (`question_votes`).
//
// Elements: #<p>-list > li.question[data-question=id][data-votes] with .votes, .text, .who and
// button.qa-upvote (viewer) / button.qa-answer (host); #<p>-empty; #<p>-count.

import { reasonText } from "./auction_ui.js";

export function mountQuestions(room, { prefix = "qa", host = false, onError = null } = {}) {
  const list = document.getElementById(`${prefix}-list`);
  const empty = document.getElementById(`${prefix}-empty`);
  const count = document.getElementById(`${prefix}-count`);
  const fail = onError || ((err) => console.warn("qa", reasonText(err)));

  function item(q, me) {
    const li = document.createElement("li");
    li.className = "question";
    li.dataset.question = q.question;
    li.dataset.votes = String(q.votes ?? 0);
    const votes = document.createElement("span");
    votes.className = "votes";
    votes.textContent = String(q.votes ?? 0);
    votes.setAttribute("aria-label", `${q.votes ?? 0} votes`);
    const body = document.createElement("span");
    body.className = "body";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = q.text;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = q.user === me ? "you" : (q.name || q.user);
    body.append(text, who);
    li.append(votes, body);
    if (host) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "small qa-answer";
      b.textContent = "Answered";
      b.setAttribute("aria-label", `Mark the question from ${q.name || q.user} answered`);
      b.addEventListener("click", () => room.request("question_answer", { question: q.question }).catch(fail));
      li.append(b);
    } else {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "small qa-upvote";
      const done = room.show.upvoted.has(q.question);
      b.textContent = done ? "▲ voted" : "▲";
      b.setAttribute("aria-label", done ? "You upvoted this question" : `Upvote the question from ${q.name || q.user}`);
      b.setAttribute("aria-pressed", String(done));
      b.disabled = done || q.user === me || !me || room.status !== "open" ||
        !!room.show.mutedUntil(me, room.serverNow()); // a muted user's upvote is refused
      b.addEventListener("click", () => room.upvote(q.question).catch(fail));
      li.append(b);
    }
    return li;
  }

  function render() {
    const me = room.identity?.user ?? null;
    const open = room.show.openQuestions();
    const sig = JSON.stringify([me, room.status, open.map((q) => [q.question, q.votes, room.show.upvoted.has(q.question)])]);
    if (list.dataset.sig === sig) return;
    list.dataset.sig = sig;
    // keep keyboard focus on the same question's button across re-renders
    const focused = document.activeElement?.closest?.(".question")?.dataset.question;
    list.replaceChildren(...open.map((q) => item(q, me)));
    if (focused) list.querySelector(`.question[data-question="${CSS.escape(focused)}"] button`)?.focus();
    empty.classList.toggle("hidden", open.length > 0);
    if (count) count.textContent = String(open.length);
  }

  room.addEventListener("change", render);
  render();
  return { render };
}
