"""Real Chromium, real nodes and Redis: the chat panel of the viewer page and the host console
(issue 10). Two viewers on two relays chat; both pages show the same transcript in the same
order; the host deletes a message with one click and both pages drop it; the host mutes a viewer,
whose page says why (the notice, and a message refused with the reason)."""

from __future__ import annotations

from typing import Any

import pytest
from browser_support import PageLog, chromium, cluster, open_page, wait_for

from lotcast.redis_server import RedisServer

STREAM = "browser-chat"


async def chat_view(page: Any) -> dict[str, Any]:
    return await page.evaluate("window.lotcast.chatView()")  # type: ignore[no-any-return]


def transcript(view: dict[str, Any]) -> list[tuple[str, str]]:
    """(message id, text) of the messages in the log, in page order."""
    return [(i["id"], i["text"]) for i in view["items"] if i["id"] is not None]


def shows_texts(page: Any, texts: list[str]) -> Any:
    async def check() -> list[tuple[str, str]] | None:
        got = transcript(await chat_view(page))
        return got if [t for _, t in got] == texts else None
    return check


def attr_is(page: Any, selector: str, name: str, want: str) -> Any:
    async def check() -> bool:
        return await page.get_attribute(selector, name) == want
    return check


async def send(page: Any, text: str) -> None:
    await page.fill("#chat-input", text)
    await page.press("#chat-input", "Enter")


async def outbox(page: Any) -> list[dict[str, Any]]:
    state = await page.evaluate("window.lotcast.roomState()")
    return state["show"]["outbox"]  # type: ignore[no-any-return]


@pytest.mark.timeout(180)
async def test_two_viewers_chat_host_deletes_and_mutes(redis_server: RedisServer) -> None:
    log = PageLog()
    with cluster(redis_server.url, relays=2) as c:
        async with chromium() as browser:
            host = await open_page(
                browser, f"{c.origin.url}/host?stream={STREAM}#token={c.host_token()}", log, "host")
            alice = await open_page(
                browser,
                f"{c.relays[0].url}/watch?stream={STREAM}#token={c.bidder_token('u-alice', 'Alice')}",
                log, "alice")
            bob = await open_page(
                browser,
                f"{c.relays[1].url}/watch?stream={STREAM}#token={c.bidder_token('u-bob', 'Bob')}",
                log, "bob")
            anon = await open_page(browser, f"{c.relays[0].url}/watch?stream={STREAM}", log, "anon")
            pages = {"host": host, "alice": alice, "bob": bob}
            for name, page in (*pages.items(), ("anon", anon)):
                await wait_for(attr_is(page, "#room-state", "data-state", "open"), 30,
                               f"{name} room open", log)
            # Anonymous viewers read the chat but can't write in it.
            assert await anon.get_attribute("#chat-notice", "data-state") == "signin"
            assert await anon.is_disabled("#chat-input")

            # --- two viewers chat: one transcript, same order on every page ------------------
            await send(alice, "hello from alice")
            await wait_for(shows_texts(alice, ["hello from alice"]), 20, "alice sees hers", log)
            await send(bob, "hi alice, bob here")
            await send(alice, "is the camera still for sale?")
            want = ["hello from alice", "hi alice, bob here", "is the camera still for sale?"]
            views = {}
            for name, page in (*pages.items(), ("anon", anon)):
                views[name] = await wait_for(shows_texts(page, want), 20, f"{name} transcript", log)
            assert len({tuple(v) for v in views.values()}) == 1, views
            ids = [i for i, _ in views["alice"]]
            assert len(set(ids)) == 3
            # My messages left the outbox once sent (no pending / refused leftovers) and the
            # author's own page marks them as mine.
            assert await outbox(alice) == []
            assert await alice.get_attribute(f'#chat-list li[data-id="{ids[0]}"]', "class") == \
                "chat-msg mine"
            assert "you" in (await alice.text_content(f'#chat-list li[data-id="{ids[0]}"] .who') or "")
            # Viewers get no moderation buttons; the host gets them on every viewer's message.
            assert await alice.locator("#chat-list button[data-act=delete]").count() == 0
            for act in ("delete", "mute", "ban", "mod"):
                btn = host.locator(f'#chat-list li[data-id="{ids[1]}"] button[data-act={act}]')
                assert await btn.count() == 1, act
                assert "Bob" in (await btn.get_attribute("aria-label") or ""), act

            # --- the host deletes a message with one click: gone from every page -------------
            await host.click(f'#chat-list li[data-id="{ids[0]}"] button[data-act=delete]')
            left = want[1:]
            for name, page in (*pages.items(), ("anon", anon)):
                got = await wait_for(shows_texts(page, left), 20, f"{name} drops the message", log)
                assert [i for i, _ in got] == ids[1:], name
            # ... and from what a fresh page loads (the snapshot).
            late = await open_page(
                browser, f"{c.relays[1].url}/watch?stream={STREAM}", log, "late")
            got = await wait_for(shows_texts(late, left), 30, "late page's snapshot", log)
            assert [i for i, _ in got] == ids[1:]

            # --- the host mutes Bob: Bob's page says why -------------------------------------
            await host.select_option("#mod-mute-min", "15")
            await host.click(f'#chat-list li[data-id="{ids[1]}"] button[data-act=mute]')
            await wait_for(attr_is(bob, "#chat-notice", "data-state", "muted"), 20,
                           "bob's page shows he is muted", log)
            notice = await bob.text_content("#chat-notice") or ""
            assert "You are muted until" in notice, notice
            assert await bob.is_disabled("#chat-input")
            assert await bob.is_disabled("#chat-send")
            # The host's moderation panel lists him with an unmute button.
            await wait_for(lambda: host.locator('#mod-muted li[data-user="u-bob"] button'
                                                '[data-act=unmute]').count(), 20,
                           "host lists bob as muted", log)
            # A message he still sends (e.g. from a page that had not seen the mute) is refused
            # with the reason, shown on his message.
            await bob.evaluate("window.lotcast.room.sendChat('can I still talk?').catch(() => {})")

            async def refused() -> dict[str, Any] | None:
                items = [i for i in (await chat_view(bob))["items"] if i["cid"] is not None]
                return items[0] if items and items[0]["state"] == "refused" else None
            item = await wait_for(refused, 20, "bob's message refused", log)
            assert item["text"] == "can I still talk?"
            assert "muted until" in item["reason"] and "(muted)" in item["reason"], item
            box = await outbox(bob)
            assert [(o["state"], o["code"]) for o in box] == [("refused", "muted")]
            # Nobody else ever sees it; Alice's page is not muted.
            assert [t for _, t in transcript(await chat_view(alice))] == left
            assert await alice.get_attribute("#chat-notice", "data-state") == "none"

            # Unmuted by the host: Bob can chat again.
            await host.click('#mod-muted li[data-user="u-bob"] button[data-act=unmute]')
            await wait_for(attr_is(bob, "#chat-notice", "data-state", "none"), 20, "bob unmuted",
                           log)
            await send(bob, "thanks!")
            await wait_for(shows_texts(alice, [*left, "thanks!"]), 20, "bob talks again", log)
            await late.context.close()
            for page in (host, alice, bob, anon):
                await page.context.close()
