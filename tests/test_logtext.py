"""What clients send reaches the log on one line, reading as what it is: every
control, invisible and direction-changing character escaped, once."""

from __future__ import annotations

import logging

import pytest

from snapfs.errors import NotFound
from snapfs.logtext import EscapingFormatter, esc, escape_controls

INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u2028", "\u2029",
             "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067",
             "\u2068", "\u2069", "\ufeff"]


@pytest.mark.parametrize("ch", INVISIBLE)
def test_invisible_and_bidi_characters_are_escaped(ch: str) -> None:
    shown = f"\\u{ord(ch):04x}"
    assert esc(f"a{ch}b") == f"a{shown}b"
    assert escape_controls(f"a{ch}b") == f"a{shown}b"
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "x %s", (f"a{ch}b",), None)
    assert EscapingFormatter("%(message)s").format(record) == f"x a{shown}b"


def test_visible_text_is_left_alone() -> None:
    assert esc("snapshot é 名前 ✓") == "snapshot é 名前 ✓"


def test_a_not_found_is_escaped_once() -> None:
    exc = NotFound("snapshot", "a\nb\\c")
    assert esc(str(exc)) == "snapshot 'a\\nb\\\\c' not found"
    assert exc.ident == "a\nb\\c"
