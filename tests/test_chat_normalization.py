"""Blocked-word normalization (pure) and the `lotcast token moderator` command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lotcast.auth import Role, TokenAuthority
from lotcast.interactive import chatnorm

SECRET = "x" * 40


@pytest.mark.parametrize(("text", "line"), [
    ("SPÁM here!", " spam here "),
    ("\uff53\uff50\uff41\uff4d", " spam "),  # fullwidth
    ("\u017fpam", " spam "),  # long s
    ("Straße", " strasse "),
    ("Buy   NÓW, ok?", " buy now ok "),
    ("İstanbul", " istanbul "),
    ("!!!", "  "),
])
def test_token_line(text: str, line: str) -> None:
    assert chatnorm.token_line(text) == line


def test_blocked_entries_match_whole_words_in_order() -> None:
    entry = chatnorm.blocked_entry("Buy NOW")
    assert entry == "buy now"
    assert f" {entry} " in chatnorm.token_line("please buy now!")
    assert f" {entry} " not in chatnorm.token_line("buynow")
    assert f" {entry} " not in chatnorm.token_line("now buy")
    assert chatnorm.blocked_entry("?!") == ""


def test_token_command_mints_a_moderator() -> None:
    out = subprocess.run([sys.executable, "-m", "lotcast", "token", "moderator", "--user-id", "mo",
                          "--name", "Mo", "--jwt-secret", SECRET],
                         capture_output=True, text=True, timeout=30, check=True)
    identity = TokenAuthority(SECRET).verify(out.stdout.strip())
    assert (identity.role, identity.user_id, identity.display_name) == (Role.MODERATOR, "mo", "Mo")
