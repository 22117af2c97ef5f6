"""lotcast: low-latency live broadcast and auction platform."""

__version__ = "0.1.0"
