"""Synthetic media that proves what a viewer decoded: each video frame carries its frame number
and capture time painted as black/white cells, readable after lossy VP8/H.264 coding.

Used by the tests and the benchmarks (publishers and decoding viewers), never by the services.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
from aiortc import MediaStreamTrack

WIDTH, HEIGHT = 320, 240
CELL = 16  # pixels per painted bit, square
COUNTER_BITS = 20
CLOCK_BITS = 40  # milliseconds of time.time(), low 40 bits
VIDEO_CLOCK = 90000


def _cells() -> list[tuple[int, int]]:
    per_row = WIDTH // CELL
    total = COUNTER_BITS + CLOCK_BITS
    return [((i // per_row) * CELL, (i % per_row) * CELL) for i in range(total)]


CELLS = _cells()


def paint(counter: int, wall_ms: int, width: int = WIDTH, height: int = HEIGHT,
          noise: np.ndarray | None = None) -> np.ndarray:
    """A yuv420p frame with ``counter`` and ``wall_ms`` painted in its top rows.

    ``noise`` (a uint8 luma plane) fills the rest of the picture so the encoder has to spend
    real bits, as with a camera.
    """
    y = noise.copy() if noise is not None else np.full((height, width), 128, dtype=np.uint8)
    value = (counter & ((1 << COUNTER_BITS) - 1)) | (
        (wall_ms & ((1 << CLOCK_BITS) - 1)) << COUNTER_BITS
    )
    for bit, (row, col) in enumerate(CELLS):
        y[row:row + CELL, col:col + CELL] = 235 if (value >> bit) & 1 else 16
    uv = np.full((height // 2, width), 128, dtype=np.uint8)
    return np.concatenate([y, uv])


def read(frame: av.VideoFrame) -> tuple[int, int]:
    """(counter, wall_ms) painted by `paint`, from a decoded frame of any size."""
    gray = frame.to_ndarray(format="gray")
    value = 0
    margin = CELL // 4
    for bit, (row, col) in enumerate(CELLS):
        cell = gray[row + margin:row + CELL - margin, col + margin:col + CELL - margin]
        if cell.mean() > 128:
            value |= 1 << bit
    return value & ((1 << COUNTER_BITS) - 1), value >> COUNTER_BITS


def decode_delay_ms(wall_ms: int) -> float:
    """Glass-to-glass: now minus the capture time painted into a frame (same machine clock)."""
    now = int(time.time() * 1000) & ((1 << CLOCK_BITS) - 1)
    return float((now - wall_ms) % (1 << CLOCK_BITS))


class CounterVideoTrack(MediaStreamTrack):
    """Video frames numbered 0, 1, 2, … with their capture time, at ``fps``."""

    kind = "video"

    def __init__(self, fps: int = 30, width: int = WIDTH, height: int = HEIGHT,
                 noisy: bool = False, first: int = 0) -> None:
        super().__init__()
        self.fps = fps
        self.width = width
        self.height = height
        rng = np.random.default_rng(7)
        # a few pre-made noise planes, cycled: encoders see motion without per-frame RNG cost
        # blocky texture that pans a few pixels per frame: camera-like motion the encoder can
        # predict, so its rate control (not the content) decides the bitrate
        texture = rng.integers(16, 236, (height // 8 + 1, width // 8 + 1), dtype=np.uint8)
        self._texture = np.kron(texture, np.ones((8, 8), dtype=np.uint8)) if noisy else None
        self.first = first
        self.counter = first
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + (self.counter - self.first) / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        noise = None
        if self._texture is not None:
            shift = (self.counter * 3) % 8
            noise = self._texture[shift:shift + self.height, shift:shift + self.width]
        picture = paint(self.counter, int(time.time() * 1000), self.width, self.height, noise)
        frame = av.VideoFrame.from_ndarray(picture, format="yuv420p")
        frame.pts = int((self.counter - self.first) * VIDEO_CLOCK / self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.counter += 1
        return frame
