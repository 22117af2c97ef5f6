"""Real Chromium, real nodes and Redis (issue 10, pages): the chat's auto-scroll pauses while the
reader is scrolled up and resumes at the bottom; a message marked as a question is upvoted once
and answered by the host on every page; reaction taps float up from the coalesced counts; the
panel's live region is a summary, not the list."""

from __future__ import annotations

from typing import Any

import pytest
from browser_support import PageLog, chromium, cluster, open_page, wait_for

from lotcast.redis_server import RedisServer

STREAM = "browser-chat-qa"


def attr_is(page: Any, selector: str, name: str, want: str) -> Any:
    async def check() -> bool:
        return await page.get_attribute(selector, name) == want
    return check


def gone(page: Any, selector: str) -> Any:
    async def check() -> bool:
        return await page.locator(selector).count() == 0
    return check


def chat_count(page: Any, n: int) -> Any:
    async def check() -> bool:
        return await page.get_attribute("#chat-list", "data-count") == str(n)
    return check


async def send_texts(page: Any, texts: list[str]) -> None:
    """Send each text from this page's user, waiting out the per-user chat rate limit (and
    dropping those refusals from the page), until every one is acknowledged."""
    await page.evaluate(
        """async (texts) => {
            const room = window.lotcast.room;
            for (const text of texts) {
              for (let attempt = 0; ; attempt++) {
                try { await room.sendChat(text); break; } catch (e) {
                  if (e.code !== 'rate_limited' || attempt > 20) throw e;
                  room.show.outbox = room.show.outbox.filter((o) => o.state !== 'refused');
                  await new Promise((r) => setTimeout(r, (e.fields.retry_ms || 500) + 50));
                }
              }
            }
        }""",
        texts,
    )


async def send_many(page: Any, prefix: str, n: int) -> None:
    await send_texts(page, [f"{prefix} {i}" for i in range(n)])


async def scroll(page: Any) -> dict[str, Any]:
    return await page.evaluate(  # type: ignore[no-any-return]
        """() => { const l = document.getElementById('chat-list');
                   return {top: l.scrollTop, height: l.scrollHeight, client: l.clientHeight}; }""")


@pytest.mark.timeout(180)
async def test_autoscroll_questions_reactions(redis_server: RedisServer) -> None:
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
            for name, page in (("host", host), ("alice", alice), ("bob", bob)):
                await wait_for(attr_is(page, "#room-state", "data-state", "open"), 30,
                               f"{name} room open", log)

            # --- accessibility: the list is not a live region; a polite summary is ------------
            assert await alice.get_attribute("#chat-list", "aria-live") is None
            assert await alice.get_attribute("#chat-list", "role") is None
            assert await alice.get_attribute("#chat-summary", "aria-live") == "polite"
            for name in ("heart", "fire", "laugh", "clap"):
                label = await alice.get_attribute(f'#react-bar button[data-reaction="{name}"]',
                                                  "aria-label")
                assert label and label.startswith("React with"), (name, label)

            # --- auto-scroll: follows at the bottom, pauses when scrolled up ----------------
            await send_many(alice, "alice says", 5)
            await send_many(bob, "bob says", 5)
            await send_many(host, "host says", 5)
            for page in (alice, bob, host):
                await wait_for(chat_count(page, 15), 20, "15 messages", log)
            s = await scroll(alice)
            assert s["height"] > s["client"], "the transcript overflows its box"
            assert s["height"] - s["top"] - s["client"] <= 40, s  # followed to the bottom
            summary = await wait_for(lambda: alice.text_content("#chat-summary"), 15,
                                     "a polite summary", log)
            assert "new chat message" in summary and "latest from" in summary, summary
            # Alice scrolls up to read; Bob's next message does not move her view.
            await alice.evaluate("document.getElementById('chat-list').scrollTop = 0")
            await wait_for(lambda: alice.evaluate("!window.lotcast.chat.follow()"), 10,
                           "alice paused", log)
            await send_texts(bob, ["while you scroll"])
            await wait_for(chat_count(alice, 16), 20, "16 messages", log)
            await wait_for(attr_is(alice, "#chat-new", "data-count", "1"), 10, "1 new", log)
            assert (await scroll(alice))["top"] == 0
            assert await alice.is_visible("#chat-new")
            # The "new messages" button (keyboard: focus + Enter) jumps back and resumes.
            await alice.focus("#chat-new")
            await alice.keyboard.press("Enter")
            await wait_for(lambda: alice.evaluate("window.lotcast.chat.follow()"), 10,
                           "alice follows again", log)
            assert await alice.is_hidden("#chat-new")
            s = await scroll(alice)
            assert s["height"] - s["top"] - s["client"] <= 40, s

            # --- Q&A: Alice marks her message; Bob upvotes once; the host answers -----------
            await alice.fill("#chat-input", "does the camera come with a lens?")
            await alice.press("#chat-input", "Enter")
            await wait_for(chat_count(alice, 17), 20, "17 messages", log)
            view = await alice.evaluate("window.lotcast.chatView()")
            qid = next(i["id"] for i in view["items"] if i["text"].startswith("does the camera"))
            await alice.click(f'#chat-list li[data-id="{qid}"] button[data-act=question]')
            for name, page, prefix in (("alice", alice, "qa"), ("bob", bob, "qa"),
                                       ("host", host, "hqa")):
                await wait_for(lambda page=page, prefix=prefix: page.locator(
                    f'#{prefix}-list li[data-question="{qid}"]').count(), 20,
                    f"{name} lists the question", log)
            # Not her own question; Bob's upvote counts once on every page.
            assert await alice.is_disabled(f'#qa-list li[data-question="{qid}"] .qa-upvote')
            await bob.click(f'#qa-list li[data-question="{qid}"] .qa-upvote')
            for name, page, prefix in (("alice", alice, "qa"), ("bob", bob, "qa"),
                                       ("host", host, "hqa")):
                await wait_for(attr_is(page, f'#{prefix}-list li[data-question="{qid}"]',
                                       "data-votes", "1"), 20, f"{name}: 1 vote", log)
            btn = f'#qa-list li[data-question="{qid}"] .qa-upvote'
            await wait_for(attr_is(bob, btn, "aria-pressed", "true"), 10, "bob voted", log)
            assert await bob.is_disabled(btn)
            again = await bob.evaluate(
                f"window.lotcast.room.upvote({qid!r}).then(() => 'ok', (e) => e.code)")
            assert again == "duplicate_upvote"
            await host.click(f'#hqa-list li[data-question="{qid}"] .qa-answer')
            for name, page, prefix in (("alice", alice, "qa"), ("bob", bob, "qa"),
                                       ("host", host, "hqa")):
                await wait_for(gone(page, f'#{prefix}-list li[data-question="{qid}"]'), 20,
                               f"{name}: answered, off the list", log)

            # --- reactions: taps float up on every page from the coalesced counts -----------
            for _ in range(3):
                await bob.click('#react-bar button[data-reaction="heart"]')
            await alice.click('#react-bar button[data-reaction="fire"]')
            for name, page in (("alice", alice), ("bob", bob)):
                await wait_for(attr_is(page, '#react-bar button[data-reaction="heart"]',
                                       "data-count", "3"), 20, f"{name}: 3 hearts", log)
                await wait_for(attr_is(page, '#react-bar button[data-reaction="fire"]',
                                       "data-count", "1"), 20, f"{name}: 1 fire", log)
            for name, page in (("alice", alice), ("bob", bob)):
                stats = await page.evaluate("window.lotcast.reactions.stats()")
                # exactly the new taps since the snapshot floated, in at most one frame per tap
                assert stats["floated"] == 4, (name, stats)
                assert 1 <= stats["frames"] <= 4, (name, stats)
            for page in (host, alice, bob):
                await page.context.close()
