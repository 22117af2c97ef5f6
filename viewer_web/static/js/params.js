// Page parameters: ?stream=<id> (default "main"), ?nodes=<origin>,<origin> (extra nodes the viewer
// may use for placement), and the JWT in the fragment #token=<jwt> (fragments never reach server
// logs). The token is removed from the address bar once read.

export function pageParams() {
  const query = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = fragment.get("token") || null;
  if (token && history.replaceState) {
    fragment.delete("token");
    const rest = fragment.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  }
  const nodes = (query.get("nodes") || "").split(",").map((s) => s.trim()).filter(Boolean);
  return { stream: query.get("stream") || "main", token, nodes };
}

/** The (unverified) claims of a JWT, for display only; the server verifies. */
export function tokenClaims(token) {
  if (!token) return null;
  try {
    const part = token.split(".")[1];
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    return JSON.parse(decodeURIComponent(escape(json)));
  } catch {
    return null;
  }
}

/** Integer minor units (cents) -> "12.34". */
export function formatMoney(cents, currency = "") {
  if (cents === null || cents === undefined) return "–";
  const n = typeof cents === "bigint" ? Number(cents) : cents;
  const sign = n < 0 ? "-" : "";
  const abs = Math.abs(n);
  const text = `${sign}${Math.floor(abs / 100).toLocaleString("en-US")}.${String(abs % 100).padStart(2, "0")}`;
  return currency ? `${currency}${text}` : text;
}

/** "12.34" / "12" / "12,5" -> 1234 cents, or null if not a positive amount with ≤ 2 decimals. */
export function parseMoney(text) {
  const t = String(text).trim().replace(",", ".");
  const m = t.match(/^(\d{1,12})(?:\.(\d{1,2}))?$/);
  if (!m) return null;
  return Number(m[1]) * 100 + Number((m[2] || "0").padEnd(2, "0"));
}

export function $(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing element #${id}`);
  return el;
}

export function setText(id, text) {
  const el = document.getElementById(id);
  if (el && el.textContent !== String(text)) el.textContent = text;
}
