"""Drain notices between origins: "the host of stream S should publish to URL U now".

A draining origin cannot assume the host page's room socket is on itself (the page may have been
served by any origin), so it publishes the notice on `keys.ORIGIN_NOTICES`; every origin listens
and hands it to the host sockets of that room it holds (`deliver`). At-most-once, like all
pub/sub: the draining origin repeats a notice until the stream has moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lotcast import keys
from lotcast.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

Deliver = Callable[[str, str], int]  # (stream, whip url) -> host sockets told


class OriginNotices:
    def __init__(self, redis: aioredis.Redis, deliver: Deliver) -> None:
        self.redis = redis
        self.deliver = deliver
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0

    async def publish(self, stream: str, whip_url: str) -> int:
        """Send the notice to every origin; returns how many origins listen."""
        payload = msgpack.packb({"stream": stream, "whip_url": whip_url}, use_bin_type=True)
        return int(await self.redis.publish(keys.ORIGIN_NOTICES, payload))

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(keys.ORIGIN_NOTICES)
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                           timeout=1.0)
                        if message is not None:
                            self._handle(message.get("data"))
            except (RedisError, OSError) as exc:
                logger.warning("origin notices: subscription lost (%r); resubscribing", exc)
                await asyncio.sleep(1.0)

    def _handle(self, data: Any) -> None:
        try:
            notice = msgpack.unpackb(data, raw=False)
            stream, url = str(notice["stream"]), str(notice["whip_url"])
        except (ValueError, TypeError, KeyError, msgpack.ExtraData) as exc:
            logger.warning("origin notices: ignoring a malformed notice: %r", exc)
            return
        self.delivered += self.deliver(stream, url)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await cancel_and_wait(self._task)
