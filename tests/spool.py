"""Reading a spool file in the tests."""

from __future__ import annotations

from pathlib import Path


def spooled_lines(spool: Path) -> list[bytes]:
    """The records a spool file holds, one a line (each line is written after a
    newline of its own, so the file has blank lines between them)."""
    return [line for line in spool.read_bytes().splitlines() if line.strip()]
