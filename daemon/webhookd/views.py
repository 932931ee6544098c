"""Plain-text renderings of status for people at a terminal (curl, `webhookd status`).

Every cell and value goes through terminal.visible: an error sentence quotes what an
endpoint answered, and ids and names may come from producers. The JSON views keep it exact.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from webhookd.terminal import visible

# A cell longer than this (after escaping) is cut with "…": one endpoint's answer does not
# fill an operator's screen. The whole text is in the JSON view.
CELL_LIMIT = 300


def ago(seconds: float | None) -> str:
    """A short human duration: 42s, 3m05s, 2h10m, 3d4h."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def _parse(when: str | None) -> float | None:
    if when is None:
        return None
    return datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _since(when: str | None, now: float) -> str:
    stamp = _parse(when)
    return "-" if stamp is None else ago(now - stamp) + " ago"


def _until(when: str | None, now: float) -> str:
    stamp = _parse(when)
    if stamp is None:
        return "-"
    return "now" if stamp <= now else "in " + ago(stamp - now)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; the last column is left ragged. Cells are made
    visible (controls escaped) and cut to CELL_LIMIT."""
    cells = [
        [visible(str(h), CELL_LIMIT) for h in headers],
        *[[visible(str(c), CELL_LIMIT) for c in row] for row in rows],
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def status_table(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = []
    for t in status["tenants"]:
        failures = t["recent_failures"]
        rows.append(
            [
                t["tenant"],
                t["queue"],
                t["waiting"],
                _since(t["oldest_waiting_at"], now) if t["waiting"] else "-",
                _since(t["last_processed_at"], now),
                t["attempts"],
                _until(t["next_attempt_at"], now),
                failures[0]["error"] if failures else "-",
            ]
        )
    headers = ["TENANT", "QUEUE", "WAITING", "OLDEST", "LAST OK", "ATTEMPTS", "NEXT", "LAST ERROR"]
    totals = status["totals"]
    summary = ", ".join(
        f"{totals[key]} {key}"
        for key in ("tenants", "waiting", "stalled", "paused", "disabled", "orphaned", "parked")
        if key in totals and (totals[key] or key in ("tenants", "waiting", "stalled"))
    )
    return table(headers, rows) + "\n\n" + summary + "\n"


def tenant_text(t: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    pairs = [
        ("tenant", t["tenant"]),
        ("queue", f"{t['queue']} ({t['waiting']} waiting)"),
        ("enabled", "yes" if t["enabled"] else "no"),
        ("paused", "yes" if t["paused"] else "no"),
        ("batching", "yes" if t["batching"] else "no"),
        ("oldest waiting", _since(t["oldest_waiting_at"], now) if t["waiting"] else "-"),
        ("last processed", _since(t["last_processed_at"], now)),
        ("attempts", t["attempts"]),
        ("next attempt", _until(t["next_attempt_at"], now)),
        ("parked", t.get("parked", 0)),
    ]
    width = max(len(k) for k, _ in pairs)
    lines = [f"{k.ljust(width)}  {visible(str(v), CELL_LIMIT)}" for k, v in pairs]
    failures = t["recent_failures"]
    lines.append("")
    if failures:
        lines.append(f"recent failures (newest first, {len(failures)}):")
        rows = [
            [
                f["at"],
                f["attempt"],
                f"{f['first_sequence']}-{f['last_sequence']}",
                f["count"],
                "-" if f["status"] is None else f["status"],
                f"{f['duration_ms']:g}ms",
                f["error"],
            ]
            for f in failures
        ]
        lines.append(
            table(["AT", "ATTEMPT", "SEQUENCES", "COUNT", "STATUS", "TOOK", "ERROR"], rows)
        )
    else:
        lines.append("recent failures: none")
    return "\n".join(lines) + "\n"
