"""Escaping what users and clients send before it reaches a log line.

A name, tag, URL or request argument may hold a newline, a NUL or invalid
UTF-8: written raw, one entry could forge several log lines or break the log
file's encoding. ``esc`` renders such a string on one line, repr-like
(``\\n``, ``\\x00``, ``\\udcff``, a backslash doubled) and bounded in length; the
``EscapingFormatter`` escapes control characters left in a whole message as a
last line of defence (tracebacks, which it leaves alone, are ours).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

#: Characters escaped in user-supplied text: C0 controls, DEL, C1 controls, lone
#: surrogates (how undecodable bytes survive os.fsdecode), and the invisible ones
#: that make a line read other than it is: zero-width characters and marks
#: (U+200B-U+200F), line/paragraph separators (U+2028/2029, line breaks to some
#: viewers), bidi embeddings, overrides and isolates (U+202A-U+202E,
#: U+2066-U+2069) and the BOM (U+FEFF).
_INVISIBLE = "\u200b-\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff"
_UNSAFE = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff{_INVISIBLE}]")
_UNSAFE_OR_BACKSLASH = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff{_INVISIBLE}\\\\]")

#: Longest rendering of one value in a log line, in characters.
LIMIT = 300


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    if ch == "\\":
        return "\\\\"
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch)
    if named:
        return named
    cp = ord(ch)
    return f"\\x{cp:02x}" if cp <= 0xff else f"\\u{cp:04x}"


def esc(value: str | bytes, limit: int | None = LIMIT) -> str:
    """``value`` on one line: control characters, backslashes and undecodable
    bytes escaped, cut to ``limit`` characters (marked with ``...``; None: whole)."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "surrogateescape")
    else:
        text = value
    out = _UNSAFE_OR_BACKSLASH.sub(_escape_char, text)
    if limit is not None and len(out) > limit:
        out = out[:limit] + "..."
    return out


def escape_controls(text: str) -> str:
    """Only the control characters and surrogates of ``text`` escaped (text that
    ``esc`` already rendered keeps its backslashes as they are)."""
    return _UNSAFE.sub(_escape_char, text)


class EscapingFormatter(logging.Formatter):
    """Every message on one line, whatever its arguments held."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


class LossCountingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A log line that cannot be written (the disk holding the log full, say) is
    dropped and counted, and the next line that can be written is preceded by
    one saying how many were lost and why. Python's own handling printed "---
    Logging error ---" and a traceback to stderr, which for the daemon is that
    same log: fragments that read like a bug, on a disk already in trouble. Lines
    go to the stream's descriptor with one write(2) each, not through its buffer:
    a failed buffered write stayed buffered and came out later, so lines counted
    as lost were not, and each note about them came out too. Any other failure
    (a bad format string: a bug) is still reported as Python does."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.lost = 0
        self.why = ""
        try:
            stream.flush()
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # no descriptor: buffered, as Python
            self.fd = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.fd is None:
            super().emit(record)
            return
        try:
            text = self.format(record) + self.terminator
            if self.lost:
                note = logging.LogRecord("snapfs", logging.WARNING, __file__, 0,
                                         "%d log line(s) lost: %s", (self.lost, self.why),
                                         None)
                text = self.format(note) + self.terminator + text
            data = text.encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as exc:
            self.lost += 1
            self.why = escape_controls(exc.strerror or str(exc))
            return
        self.lost = 0
