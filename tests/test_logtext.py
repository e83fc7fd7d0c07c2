"""What clients send reaches the log on one line, reading as what it is: every
control, invisible and direction-changing character escaped, once."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

import pytest

from snapfs.errors import NotFound
from snapfs.logtext import EscapingFormatter, LossCountingHandler, esc, escape_controls

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


def test_log_lines_a_full_disk_drops_are_counted_not_tracebacks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A log on a full filesystem (a 64 KiB tmpfs here): Python's handler printed
    "--- Logging error ---" and a traceback per line (into that same log, for the
    daemon). The lines that cannot be written are counted, and the first line
    written once there is room again says how many were lost and why."""
    fs = tmp_path / "small"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(fs)], check=True)
    try:
        stream = open(fs / "mount.log", "a", buffering=1)
        handler = LossCountingHandler(stream)
        handler.setFormatter(EscapingFormatter("%(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("test.full")
        logger.propagate = False
        logger.addHandler(handler)
        try:
            filler = fs / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
            for i in range(50):
                logger.warning("line %d %s", i, "x" * 200)
            assert handler.lost > 0
            filler.unlink()
            logger.warning("back")
        finally:
            logger.removeHandler(handler)
            stream.close()
        text = (fs / "mount.log").read_text()
        lines = text.splitlines()
        assert lines[-1] == "WARNING test.full: back", lines[-3:]
        # One note, and it counts exactly the lines missing: none was written late
        # (from a buffer), none twice.
        notes = [m for line in lines if (m := re.fullmatch(
            r"WARNING snapfs: (\d+) log line\(s\) lost: No space left on device", line))]
        assert len(notes) == 1 and notes[0].string == lines[-2], lines[-3:]
        written = [line for line in lines if line.startswith("WARNING test.full: line ")]
        assert written == [f"WARNING test.full: line {i} {'x' * 200}"
                           for i in range(len(written))]
        assert len(written) + int(notes[0].group(1)) == 50
        assert "Traceback" not in text and "Logging error" not in capsys.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)
