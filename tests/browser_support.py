"""Shared pieces for the real-browser tests: Chromium launcher, a static page server and a
broadcaster + relay cluster started as real processes.

Nothing here skips: a missing chromium, redis-server or service fails the test loudly.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lotcast.auth import Role, TokenAuthority
from lotcast.supervisor import ServiceProcess
from viewer_web import STATIC_DIR

CHROMIUM = os.environ.get("LOTCAST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    # Background tabs/contexts must keep decoding and running timers at full speed.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--autoplay-policy=no-user-gesture-required",
]


def chromium_path() -> str:
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if not path:
        raise RuntimeError(f"chromium not found at {CHROMIUM} or on PATH: apt-get install chromium")
    return path


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium (Playwright async API); closed on exit whatever happens."""
    from playwright.async_api import async_playwright

    path = chromium_path()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class PageLog:
    """Console messages and page errors of one page, for failure messages."""

    lines: list[str] = field(default_factory=list)
    repeats: dict[str, int] = field(default_factory=dict)

    started: float = field(default_factory=time.monotonic)

    def add(self, line: str) -> None:
        # Retry loops repeat the same message; keep the first and count the rest.
        if line in self.repeats:
            self.repeats[line] += 1
            return
        self.repeats[line] = 0
        self.lines.append(f"{time.monotonic() - self.started:7.2f} {line}")

    def attach(self, page: Any, name: str) -> None:
        page.on("console", lambda m: self.add(f"[{name} console.{m.type}] {m.text}"))
        page.on("pageerror", lambda e: self.add(f"[{name} pageerror] {e}"))

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])


async def open_page(browser: Any, url: str, log: PageLog, name: str) -> Any:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    log.attach(page, name)
    await page.goto(url)
    return page


async def wait_for(
    check: Callable[[], Awaitable[Any]], within: float, what: str, log: PageLog | None = None,
    interval: float = 0.2,
) -> Any:
    """Poll an async predicate until it returns a truthy value (for at most `within` seconds);
    fail with the last value and the pages' console otherwise."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            detail = f"\nlast value: {last!r}"
            if log is not None:
                detail += f"\npage log:\n{log.tail()}"
            raise AssertionError(f"timed out after {within}s waiting for {what}{detail}")
        await asyncio.sleep(interval)


_TRACE_JS = """() => {
    window.__trace = [[performance.now() | 0, 'trace start']];
    const p = window.lotcast.player;
    p.addEventListener('statechange',
        (e) => window.__trace.push([performance.now() | 0, e.detail.state, e.detail.detail]));
    p.addEventListener('relaychange',
        (e) => window.__trace.push([performance.now() | 0, 'relay', e.detail.origin]));
    let frames = 0;
    let lastPc = null;
    const timer = setInterval(async () => {
        const pc = window.lotcast.pc;
        if (!pc) return;
        if (pc !== lastPc) { lastPc = pc; frames = 0; }
        let decoded = 0;
        (await pc.getStats()).forEach((s) => {
            if (s.type === 'inbound-rtp' && s.kind === 'video') decoded = s.framesDecoded || 0;
        });
        if (decoded > 0 && frames === 0) window.__trace.push([performance.now() | 0, 'first frame']);
        frames = decoded;
    }, 50);
    window.__traceStop = () => clearInterval(timer);
}"""


async def trace_player(page: Any) -> None:
    """Record the viewer page's player state changes (and first frames) with page timestamps."""
    await page.evaluate(_TRACE_JS)


async def player_trace(page: Any) -> list[list[Any]]:
    return await page.evaluate("window.__trace || []")  # type: ignore[no-any-return]


# --- static pages without services (msgpack and rendering tests) ------------------------------

class _StaticHandler(http.server.SimpleHTTPRequestHandler):
    ROUTES = {"/host": "host.html", "/watch": "viewer.html"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(STATIC_DIR), **kwargs)

    def translate_path(self, path: str) -> str:
        clean = path.split("?", 1)[0].split("#", 1)[0]
        if clean in self.ROUTES:
            return str(Path(STATIC_DIR) / self.ROUTES[clean])
        if clean.startswith("/static/"):
            return super().translate_path(clean[len("/static"):])
        return super().translate_path("/__nothing_here__")

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


_StaticHandler.extensions_map = {
    **http.server.SimpleHTTPRequestHandler.extensions_map,
    ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
}


@contextmanager
def static_server() -> Iterator[str]:
    """Serve viewer_web/static like the services do (/host, /watch, /static/...); yields the URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StaticHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- a real cluster: broadcaster + relay processes --------------------------------------------

@dataclass
class Cluster:
    origin: ServiceProcess
    relays: list[ServiceProcess]
    authority: TokenAuthority
    redis_url: str
    env: dict[str, str]
    extra: list[ServiceProcess] = field(default_factory=list)

    @property
    def relay(self) -> ServiceProcess:
        return self.relays[0]

    def host_token(self) -> str:
        return self.authority.mint(Role.HOST, "host", "Host")

    def bidder_token(self, user_id: str, name: str) -> str:
        return self.authority.mint(Role.BIDDER, user_id, name)

    def restart_origin(self) -> ServiceProcess:
        """kill -9 the broadcaster and start a new one on the same port (same secret, same Redis)."""
        port = self.origin.url.rsplit(":", 1)[1].rstrip("/")
        self.origin.kill()
        origin = ServiceProcess("broadcaster", ["--port", port, "--redis-url", self.redis_url],
                                env=self.env)
        self.extra.append(origin)
        deadline = time.monotonic() + 15
        while True:  # the old socket may linger for a moment
            try:
                origin.start()
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        self.origin = origin
        return origin

    def logs(self, n: int = 60) -> str:
        parts = []
        for p in [self.origin, *self.relays]:
            parts.append(f"--- {p.command} ({'alive' if p.alive() else 'exited'}) ---")
            parts.append("".join(p.output[-n:]))
        return "\n".join(parts)


@contextmanager
def cluster(redis_url: str, relays: int = 1, relay_args: list[str] | None = None) -> Iterator[Cluster]:
    """Start a broadcaster and `relays` relays sharing one JWT secret and one Redis."""
    secret = secrets.token_urlsafe(32)
    env = {"LOTCAST_JWT_SECRET": secret, "LOTCAST_REDIS_URL": redis_url}
    procs: list[ServiceProcess] = []
    try:
        origin = ServiceProcess("broadcaster", ["--port", "0", "--redis-url", redis_url], env=env)
        procs.append(origin)
        origin.start()
        started: list[ServiceProcess] = []
        for i in range(relays):
            relay = ServiceProcess("relay", ["--port", "0", "--origin-url", origin.url,
                                             "--redis-url", redis_url, "--node-id", f"relay-{i}",
                                             *(relay_args or [])], env=env)
            procs.append(relay)
            relay.start()
            started.append(relay)
        c = Cluster(origin=origin, relays=started, authority=TokenAuthority(secret),
                    redis_url=redis_url, env=env)
        try:
            yield c
        finally:
            for p in c.extra:
                p.stop()
    finally:
        for p in reversed(procs):
            p.stop()


async def page_state(page: Any) -> dict[str, Any]:
    """The viewer page's `window.lotcast.state()` (relay, media state, sessions, currentTime…)."""
    return await page.evaluate("window.lotcast.state()")  # type: ignore[no-any-return]


def playing_on(page: Any, relay_url: str, frames: int) -> Any:
    """A wait_for check: the page plays from ``relay_url`` with ``frames`` decoded and audio."""
    async def check() -> dict[str, Any] | None:
        s = await page_state(page)
        if s["relay"] != relay_url.rstrip("/") or s["media"] != "connected":
            return None
        raw = await page.evaluate("window.lotcast.rawStats()") or {}
        decoded = raw.get("video", {}).get("framesDecoded", 0)
        return s if decoded >= frames and raw.get("audio", {}).get("packetsReceived") else None
    return check
