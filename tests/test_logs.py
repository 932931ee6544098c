"""Log lines (webhookd.logs): JSON or console, and nothing in them can drive a terminal.

Log values quote the outside world (an endpoint's Location, a webhook id, a request path).
Whichever renderer writes them, controls and bidirectional controls arrive escaped. The
daemon's own JSON log lines, written while delivering to a hostile endpoint, are checked
end to end in tests/test_operator.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.test_terminal import BIDI, C0, C1, UNSAFE, escaped
from webhookd import logs

pytestmark = pytest.mark.usefixtures("restore_structlog")

EVERY = "".join(UNSAFE)
EVERY_ESCAPED = "".join(escaped(char) for char in UNSAFE)


def raw_controls(text: str) -> set[str]:
    """The unsafe characters in `text`, but the line feeds that end log lines."""
    return set(text) & (set(UNSAFE) - {"\n"})


def test_json_lines_escape_every_control_in_every_value() -> None:
    out = io.StringIO()
    logs.configure("json", "info", out)
    log = logs.get_logger("webhookd.test")
    log.warning(
        "delivery_failed",
        tenant="acme",
        status=302,
        error=f"redirect to http://x/{EVERY} not followed (HTTP 302)",
        ids=["ok", f"id{''.join(C1)}", ("t", "\u202e")],
        where=Path(f"/tmp/{''.join(BIDI)}"),  # rendered through str()
    )
    text = out.getvalue()
    assert raw_controls(text) == set()
    assert text.count("\n") == 1
    entry = json.loads(text)
    assert entry["error"] == f"redirect to http://x/{EVERY_ESCAPED} not followed (HTTP 302)"
    assert entry["ids"] == ["ok", "id" + "".join(map(escaped, C1)), ["t", "\\u202e"]]
    assert entry["where"] == "/tmp/" + "".join(map(escaped, BIDI))
    assert (entry["tenant"], entry["status"], entry["level"]) == ("acme", 302, "warning")


def test_console_lines_escape_every_control() -> None:
    out = io.StringIO()
    logs.configure("console", "info", out)
    logs.get_logger("webhookd.test").warning("skipped", tenant="acme", id=EVERY)
    text = out.getvalue()
    assert raw_controls(text) == set()
    assert text.count("\n") == 1
    assert EVERY_ESCAPED in text


def test_a_traceback_keeps_its_lines_and_escapes_the_rest() -> None:
    out = io.StringIO()
    logs.configure("json", "info", out)
    try:
        raise ValueError(f"bad answer: {''.join(C0)}")
    except ValueError:
        logs.get_logger("webhookd.test").exception("send_crashed", tenant="acme")
    entry = json.loads(out.getvalue())
    trace = entry["exception"]
    assert trace.startswith("Traceback (most recent call last):\n")
    assert raw_controls(trace) == set()
    shown = "".join("\n" if char == "\n" else escaped(char) for char in C0)
    assert f"ValueError: bad answer: {shown}" in trace


def test_clean_values_pass_unchanged() -> None:
    out = io.StringIO()
    logs.configure("json", "info", out)
    logs.get_logger("webhookd.test").info(
        "delivered", tenant="acme", count=2, duration_ms=1.5, ok=True, none=None, note="café"
    )
    entry = json.loads(out.getvalue())
    assert {k: entry[k] for k in ("tenant", "count", "duration_ms", "ok", "none", "note")} == {
        "tenant": "acme",
        "count": 2,
        "duration_ms": 1.5,
        "ok": True,
        "none": None,
        "note": "café",
    }
