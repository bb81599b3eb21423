"""One report.md for every probe: each command owns a section and rewrites only its own.

``memento probe restart``, ``kv`` and ``toy`` write into the same output directory; running one of
them again replaces its section (between HTML comment markers) and leaves the others as they were,
so the report always shows the latest run of each study.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

TITLE = "# The dual information stream: memento probe report"
ORDER = ("restart", "kv", "toy")
"""Sections in the order the report lists them (the paper's order in its section 7)."""


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- probe:{key} -->", f"<!-- /probe:{key} -->"


def read_sections(text: str) -> dict[str, str]:
    """The sections a report holds, by key."""
    found = {}
    for match in re.finditer(r"<!-- probe:(\w+) -->\n(.*?)<!-- /probe:\1 -->", text, flags=re.S):
        found[match.group(1)] = match.group(2)
    return found


def update_report(path: Path, key: str, lines: Sequence[str]) -> Path:
    """Write (or replace) section ``key`` of the report at ``path``; keep every other section."""
    if key not in ORDER:
        raise ValueError(f"unknown report section {key!r}; known: {', '.join(ORDER)}")
    sections = read_sections(path.read_text()) if path.exists() else {}
    sections[key] = "\n".join(lines).rstrip() + "\n"
    parts = [TITLE, ""]
    for name in ORDER:
        if name in sections:
            start, end = _markers(name)
            parts += [start, sections[name].rstrip("\n"), end, ""]
    path.write_text("\n".join(parts))
    return path
