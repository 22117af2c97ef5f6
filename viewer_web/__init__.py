"""Static host and viewer pages (plain HTML/JS, no build step)."""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
