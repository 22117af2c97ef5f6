"""Task lifecycle helpers: every task we start is cancelled and awaited when its owner closes."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` (if any, and not the caller itself) and wait until it has finished."""
    if task is None or task is asyncio.current_task() or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
