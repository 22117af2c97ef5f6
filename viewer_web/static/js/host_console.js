// Host console: create/open/extend/close/re-run lots (sudden death, pre-bid counts), open/close
// polls, watch bids and tallies live; chat with moderation, the moderation panel, Q&A and
// giveaways. Talks to the room with the host token (docs/protocol.md).

import { formatCountdown, lotResultText, reasonText, renderPollOptions } from "./auction_ui.js";
import { mountChat } from "./chat_ui.js";
import { mountGiveawayHost } from "./giveaway_ui.js";
import { mountModeration } from "./moderation_ui.js";
import { $, formatMoney, parseMoney, setText } from "./params.js";
import { mountQuestions } from "./qa_ui.js";
import { mountReactions } from "./reactions_ui.js";

/** "0: 1.00\n100: 5.00" -> [[0, 100], [10000, 500]] (cents), or throws with a readable message. */
export function parseIncrements(text) {
  const rows = [];
  for (const [i, raw] of text.split(/[\n;]+/).entries()) {
    const line = raw.trim();
    if (!line) continue;
    const m = line.match(/^([^:=]+)[:=](.+)$/);
    if (!m) throw new Error(`increment rule ${i + 1}: write "from price: increment", e.g. "100: 5.00"`);
    const threshold = parseMoney(m[1]);
    const step = parseMoney(m[2]);
    if (threshold === null || step === null || step <= 0) {
      throw new Error(`increment rule ${i + 1}: "${line}" needs two amounts, increment > 0`);
    }
    rows.push([threshold, step]);
  }
  if (!rows.length) throw new Error("the increment table needs at least one rule");
  rows.sort((a, b) => a[0] - b[0]);
  if (rows[0][0] !== 0) throw new Error("the first increment rule must start at price 0");
  return rows;
}

function seconds(id, name) {
  const v = Number($(id).value.trim());
  if (!Number.isFinite(v) || v <= 0) throw new Error(`${name} must be a positive number of seconds`);
  return Math.round(v * 1000);
}

function optionalMoney(id, name) {
  const text = $(id).value.trim();
  if (!text) return undefined;
  const v = parseMoney(text);
  if (v === null || v <= 0) throw new Error(`${name} must be an amount like 25.00`);
  return v;
}

function button(id, label, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.id = id;
  b.className = `small ${cls || ""}`;
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

export function mountHostConsole(room) {
  const api = { lastError: null, lastAck: null };
  const bidFeed = [];

  function showError(err) {
    const text = err ? (err.code ? reasonText(err) : err.message || String(err)) : "";
    api.lastError = err ? { code: err.code ?? null, message: text } : null;
    setText("console-error", text);
  }

  async function run(type, fields) {
    showError(null);
    try {
      const ack = await room.request(type, fields);
      api.lastAck = ack;
      return ack;
    } catch (err) {
      showError(err);
      throw err;
    }
  }

  api.createLot = (fields) => run("lot_create", fields);
  api.openLot = (lot) => run("lot_open", { lot });
  api.extendLot = (lot, byMs) => run("lot_extend", { lot, by_ms: byMs });
  api.closeLot = (lot) => run("lot_close", { lot });
  api.openPoll = (fields) => run("poll_open", fields);
  api.closePoll = (poll) => run("poll_close", { poll });
  api.rerunLot = (lot, open = false) => run("lot_rerun", open ? { lot, open: true } : { lot });
  api.run = run;

  const moderation = mountModeration(room, { run, showError });
  api.chat = mountChat(room, { muteMs: moderation.muteMs, onError: showError });
  api.questions = mountQuestions(room, { prefix: "hqa", host: true, onError: showError });
  api.giveaway = mountGiveawayHost(room, { run, showError });
  api.reactions = mountReactions(room, { prefix: "hreact" });

  const sudden = $("lot-sudden-death");
  sudden.addEventListener("change", () => {
    $("lot-soft-close").disabled = sudden.checked; // a sudden-death lot has no soft close
  });

  $("lot-create").addEventListener("click", async () => {
    let fields;
    try {
      const start = parseMoney($("lot-start-price").value);
      if (start === null || start <= 0) throw new Error("start price must be an amount like 10.00");
      fields = {
        title: $("lot-title-input").value.trim(),
        start_price: start,
        increments: parseIncrements($("lot-increments").value),
        duration_ms: seconds("lot-duration", "duration"),
        soft_close_ms: sudden.checked ? 0 : Math.round(Number($("lot-soft-close").value || 0) * 1000),
        reserve: optionalMoney("lot-reserve", "reserve"),
        buy_now: optionalMoney("lot-buy-now", "buy it now"),
        sudden_death: sudden.checked ? true : undefined,
      };
      if (!fields.title) throw new Error("the lot needs a title");
    } catch (err) {
      showError(err);
      return;
    }
    await api.createLot(fields).catch(() => {});
  });

  $("poll-create").addEventListener("click", async () => {
    let fields;
    try {
      const options = [0, 1, 2, 3, 4, 5].map((i) => $(`poll-option-${i}`).value.trim()).filter(Boolean);
      if (options.length < 2) throw new Error("a poll needs at least two options");
      fields = {
        question: $("poll-question-input").value.trim(),
        options,
        duration_ms: seconds("poll-duration", "poll duration"),
      };
      if (!fields.question) throw new Error("the poll needs a question");
    } catch (err) {
      showError(err);
      return;
    }
    await api.openPoll(fields).catch(() => {});
  });

  room.addEventListener("logevent", (ev) => {
    const e = ev.detail.event;
    if (e.type !== "bid") return;
    bidFeed.unshift(e);
    if (bidFeed.length > 100) bidFeed.length = 100;
  });

  function renderLots() {
    const box = $("lots");
    const lots = [...room.lots.values()].reverse();
    $("lots-empty")?.classList.toggle("hidden", lots.length > 0);
    const seen = new Set();
    for (const lot of lots) {
      const id = lot.lot;
      seen.add(id);
      let item = box.querySelector(`.item[data-lot="${CSS.escape(id)}"]`);
      if (!item) {
        item = document.createElement("div");
        item.className = "item";
        item.dataset.lot = id;
        item.innerHTML = `
          <div class="head"><span class="title"></span><span class="status-pill"></span></div>
          <div class="lot-meta">
            <span>price <strong class="price"></strong></span>
            <span>leader <strong class="leader"></strong></span>
            <span><span class="bids"></span> bids</span>
            <span class="countdown-small"></span>
            <span class="reserve"></span>
            <span class="prebids"></span>
            <span class="mode"></span>
          </div>
          <div class="result"></div>
          <div class="actions"></div>`;
        item.querySelector(".price").id = `lot-price-${id}`;
        item.querySelector(".leader").id = `lot-leader-${id}`;
        item.querySelector(".countdown-small").id = `lot-countdown-${id}`;
        item.querySelector(".result").id = `lot-result-${id}`;
        item.querySelector(".prebids").id = `lot-prebids-${id}`;
        const actions = item.querySelector(".actions");
        actions.append(
          button(`lot-open-${id}`, "Open", "primary", () => api.openLot(id).catch(() => {})),
          button(`lot-extend-${id}`, "Extend", "", () => {
            let by;
            try { by = seconds("lot-extend-by", "extend by"); } catch (err) { showError(err); return; }
            api.extendLot(id, by).catch(() => {});
          }),
          button(`lot-close-${id}`, "Close now", "danger", () => api.closeLot(id).catch(() => {})),
          button(`lot-rerun-${id}`, "Re-run", "", () => api.rerunLot(id).catch(() => {})),
          button(`lot-rerun-open-${id}`, "Re-run and open", "primary", () => api.rerunLot(id, true).catch(() => {})),
        );
        box.prepend(item);
      }
      item.dataset.status = lot.status;
      item.querySelector(".title").textContent = lot.title;
      const pill = item.querySelector(".status-pill");
      pill.dataset.status = lot.status;
      pill.textContent = lot.status;
      item.querySelector(".price").textContent =
        lot.price !== undefined && lot.price !== null ? formatMoney(lot.price) : `start ${formatMoney(lot.start_price)}`;
      item.querySelector(".leader").textContent = lot.leader_name || lot.leader || "–";
      item.querySelector(".bids").textContent = String(lot.bids ?? 0);
      item.querySelector(".reserve").textContent = lot.has_reserve ? (lot.reserve_met ? "reserve met" : "reserve not met") : "";
      const prebids = lot.prebids ?? 0;
      const pre = item.querySelector(".prebids");
      pre.textContent = lot.status === "draft" || prebids ? `${prebids} pre-bid${prebids === 1 ? "" : "s"}` : "";
      pre.dataset.count = String(prebids);
      item.dataset.suddenDeath = String(!!lot.sudden_death);
      item.querySelector(".mode").textContent = [lot.sudden_death ? "sudden death" : "",
        lot.rerun_of ? `re-run of ${room.lots.get(lot.rerun_of)?.title ?? lot.rerun_of}` : "",
        lot.rerun ? `re-run as ${lot.rerun}` : ""].filter(Boolean).join(" · ");
      const result = item.querySelector(".result");
      result.textContent = lotResultText(lot);
      result.dataset.result = lot.status;
      result.className = `result${lot.status === "sold" || lot.status === "unsold" ? "" : " hidden"}`;
      $(`lot-open-${id}`).classList.toggle("hidden", lot.status !== "draft");
      $(`lot-extend-${id}`).classList.toggle("hidden", lot.status !== "open");
      $(`lot-close-${id}`).classList.toggle("hidden", lot.status !== "open");
      const rerunnable = lot.status === "unsold" && !lot.rerun;
      $(`lot-rerun-${id}`).classList.toggle("hidden", !rerunnable);
      $(`lot-rerun-open-${id}`).classList.toggle("hidden", !rerunnable);
    }
    for (const item of [...box.querySelectorAll(".item[data-lot]")]) {
      if (!seen.has(item.dataset.lot)) item.remove();
    }
    const feed = $("bid-feed");
    const key = bidFeed.map((b) => b.offset).join(",");
    if (feed.dataset.key !== key) {
      feed.dataset.key = key;
      feed.replaceChildren(...bidFeed.map((b) => {
        const li = document.createElement("li");
        const who = document.createElement("span");
        const lot = room.lots.get(b.lot);
        who.textContent = `${b.bidder_name || b.bidder} → ${lot ? lot.title : b.lot}`;
        const amount = document.createElement("span");
        amount.className = "amount";
        amount.textContent = b.amount === b.price ? formatMoney(b.price)
          : `${formatMoney(b.amount)} · price ${formatMoney(b.price)}`;
        li.append(who, amount);
        return li;
      }));
    }
  }

  function renderPolls() {
    const box = $("polls");
    const polls = [...room.polls.values()].reverse();
    $("polls-empty")?.classList.toggle("hidden", polls.length > 0);
    const seen = new Set();
    for (const poll of polls) {
      const id = poll.poll;
      seen.add(id);
      let item = box.querySelector(`.item[data-poll="${CSS.escape(id)}"]`);
      if (!item) {
        item = document.createElement("div");
        item.className = "item";
        item.dataset.poll = id;
        item.innerHTML = `
          <div class="head"><span class="title"></span><span class="status-pill"></span></div>
          <div class="options" style="margin-top: 8px"></div>
          <div class="muted"><span class="total"></span> votes · <span class="when"></span></div>
          <div class="actions"></div>`;
        item.querySelector(".total").id = `poll-total-${id}`;
        item.querySelector(".actions").append(
          button(`poll-close-${id}`, "Close poll", "danger", () => api.closePoll(id).catch(() => {})),
        );
        box.prepend(item);
      }
      item.dataset.status = poll.status;
      item.querySelector(".title").textContent = poll.question;
      const pill = item.querySelector(".status-pill");
      pill.dataset.status = poll.status;
      pill.textContent = poll.status;
      item.querySelector(".total").textContent = String(poll.total ?? 0);
      renderPollOptions(item.querySelector(".options"), poll, { idPrefix: `hpoll-${id}` });
      $(`poll-close-${id}`).classList.toggle("hidden", poll.status !== "open");
    }
    for (const item of [...box.querySelectorAll(".item[data-poll]")]) {
      if (!seen.has(item.dataset.poll)) item.remove();
    }
  }

  function tick() {
    for (const lot of room.lots.values()) {
      const el = document.getElementById(`lot-countdown-${lot.lot}`);
      if (!el) continue;
      el.textContent = lot.status === "open" && lot.ends_at ?
        `ends in ${formatCountdown(lot.ends_at - room.serverNow())}` : "";
    }
    for (const poll of room.polls.values()) {
      const el = document.querySelector(`.item[data-poll="${CSS.escape(poll.poll)}"] .when`);
      if (el) {
        el.textContent = poll.status === "open" && poll.ends_at ?
          `closes in ${formatCountdown(poll.ends_at - room.serverNow())}` : "closed";
      }
    }
  }

  room.addEventListener("change", () => {
    renderLots();
    renderPolls();
    tick();
  });
  setInterval(tick, 250);
  return api;
}
