"""Text normalization for blocked words (pure): case and accents do not evade the list.

casefold, then NFKD, then strip combining marks, so "Ⓢpam", "SPÄM" and "spam" compare equal;
then split into words (runs of letters, digits and underscores). A blocked entry matches a
message when its words appear in the message's words consecutively ("buy now" matches
"BUY   nów!" but not "buynow")."""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def words(text: str) -> list[str]:
    return _WORD.findall(normalize(text))


def token_line(text: str) -> str:
    """The message's normalized words, each between single spaces (what the Function searches)."""
    return " " + " ".join(words(text)) + " "


def blocked_entry(text: str) -> str:
    """A blocked-list entry as it is matched: its normalized words joined by one space ("" when
    it has no letter or digit)."""
    return " ".join(words(text))
