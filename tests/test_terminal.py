"""Outside text made harmless for a terminal (webhookd.terminal): every C0 and C1 control and
every bidirectional control becomes an escape a person can read; nothing else changes."""

from __future__ import annotations

import json

from webhookd.terminal import json_text, visible, visible_lines

C0 = [chr(code) for code in range(0x20)] + ["\x7f"]
C1 = [chr(code) for code in range(0x80, 0xA0)]
# ALM, LRM, RLM, LRE, RLE, PDF, LRO, RLO, LRI, RLI, FSI, PDI.
BIDI = list("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
UNSAFE = C0 + C1 + BIDI


def escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: str) -> str:
    """What a person should see of `text`: each unsafe character as its escape."""
    return "".join(escaped(char) if char in UNSAFE else char for char in text)


def test_every_control_and_bidi_control_becomes_a_visible_escape() -> None:
    for char in UNSAFE:
        assert visible(f"a{char}b") == f"a{escaped(char)}b"
    every = "".join(UNSAFE)
    assert visible(every) == "".join(escaped(char) for char in UNSAFE)
    assert all(32 <= ord(char) < 127 for char in visible(every))


def test_printable_text_is_left_as_it_is() -> None:
    printable = [chr(code) for code in range(0xA0 + 1) if chr(code) not in UNSAFE]
    assert len(printable) == 95 + 1  # ASCII from space to ~, and the no-break space
    text = "".join(printable) + "straße 日本 \\x1b already escaped é"
    assert visible(text) is text
    assert visible_lines(text) is text
    # Neighbours of the bidirectional controls are ordinary text.
    for char in "\u061b\u061d\u200d\u2010\u2029\u202f\u2065\u206a":
        assert visible(char) == char


def test_the_attack_from_the_report_is_shown_not_run() -> None:
    location = "https://evil.example/\x1b[2J\x1b[31mFAKE\x07\u202egnp.exe"
    assert visible(location) == "https://evil.example/\\x1b[2J\\x1b[31mFAKE\\x07\\u202egnp.exe"


def test_a_cut_ends_in_an_ellipsis_and_bounds_the_escaped_length() -> None:
    assert visible("abcdef", 10) == "abcdef"
    assert visible("abcdef", 6) == "abcdef"
    assert visible("abcdefg", 6) == "abcde…"
    # The limit bounds what reaches the screen: it applies after escaping.
    assert visible("\x1b" * 100, 10) == "\\x1b\\x1b\\…"
    assert len(visible("\u202e" * 1000, 300)) == 300


def test_visible_lines_keeps_line_feeds_and_escapes_the_rest() -> None:
    assert visible_lines("one\ntwo\r\n\x1b[2J") == "one\ntwo\\x0d\n\\x1b[2J"
    for char in UNSAFE:
        expected = "\n" if char == "\n" else escaped(char)
        assert visible_lines(char) == expected


def test_json_text_is_safe_to_print_and_parses_back_to_the_exact_value() -> None:
    value = {"note": "".join(UNSAFE), "name": "café 日本", "nested": [{"k\u202e": "\x9b31m"}]}
    text = json_text(value)
    assert json.loads(text) == value
    assert not set(text) & (set(UNSAFE) - {"\n"})
    assert "café 日本" in text  # other non-ASCII text stays readable
    assert "\\u202e" in text and "\\u009b" in text and "\\u001b" in text and "\\u007f" in text
