"""A WHEP viewer in its own process, so a test can kill -9 it (vanish without DELETE)."""

from __future__ import annotations

import asyncio
import sys

from media_support import Viewer


async def main(base_url: str, stream: str) -> None:
    viewer = Viewer(base_url, stream)
    await viewer.start()
    await viewer.wait_frames(5, timeout=30)
    print("PLAYING", flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
