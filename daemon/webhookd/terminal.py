"""Text that came from outside, made harmless before it reaches a person's terminal.

An endpoint's Location header, a producer's webhook id or data, a path a client asked for:
any of it may hold ESC (which starts terminal commands: clear the screen, recolour, retitle
the window), BEL, backspace or carriage return (which redraw a line), C1 controls (U+0080 to
U+009F; U+009B is a one-character ESC [ on some terminals), or the bidirectional controls
that reorder what a line appears to say. Text views, the command line and the logs pass such
text through `visible`, which writes each of these characters as an escape a person can read
(`\\x1b`, `\\x9b`, `\\u202e`). JSON answers of the API keep the exact text.

A backslash is left as it is: escaping it too would make text that was already made visible
(the daemon's text view, shown again by the command line) change on every pass.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Arabic letter mark, LRM and RLM, the embeddings and overrides (LRE RLE PDF LRO RLO), and the
# isolates (LRI RLI FSI PDI): the characters of Unicode's bidirectional algorithm that
# "Trojan Source" (CVE-2021-42574) uses to make a line read differently from what it holds.
_BIDI = r"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
UNSAFE = re.compile(rf"[\x00-\x1f\x7f-\x9f{_BIDI}]")
# The same but the line feed: for a text whose lines are its structure.
_UNSAFE_IN_LINES = re.compile(rf"[\x00-\x09\x0b-\x1f\x7f-\x9f{_BIDI}]")
ELLIPSIS = "…"


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str, limit: int | None = None) -> str:
    """`text` with every control and bidirectional control written as an escape, cut to at
    most `limit` characters (ending in "…") if given. The cut comes after the escaping, so
    it bounds what reaches the screen."""
    if UNSAFE.search(text) is not None:
        text = UNSAFE.sub(_escape, text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + ELLIPSIS
    return text


def visible_lines(text: str) -> str:
    """As `visible`, but line feeds stay: for a text made of lines (a view, a traceback)."""
    if _UNSAFE_IN_LINES.search(text) is None:
        return text
    return _UNSAFE_IN_LINES.sub(_escape, text)


def json_text(value: Any) -> str:
    """`value` as indented JSON that is safe to print and still exact when parsed.

    json.dumps escapes C0 controls in strings; DEL, C1 and bidirectional controls it writes
    as they are (with ensure_ascii=False, which keeps other non-ASCII text readable). Those
    are written as JSON's own \\u escapes: they can only occur inside strings, where the
    escape means the same character. (The line feeds left are the indentation's.)
    """
    document = json.dumps(value, indent=2, ensure_ascii=False)
    return _UNSAFE_IN_LINES.sub(lambda match: f"\\u{ord(match.group()):04x}", document)
