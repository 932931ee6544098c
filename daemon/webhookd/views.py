"""Plain-text renderings of status for people at a terminal (curl, `webhookd status`).

Every cell and value goes through terminal.visible: an error sentence quotes what an
endpoint answered, and ids and names may come from producers. The JSON views keep it exact.

Every line fits a terminal of WIDTH columns: a table's long cells (a tenant name of 64
characters, a DNS error, an endpoint URL) are cut with "…" in the columns each view names,
and the whole text is in the JSON view.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from webhookd.terminal import ELLIPSIS, visible

# A cell longer than this (after escaping) is cut with "…" before any layout: one
# endpoint's answer does not cost the table's width computation its whole length.
CELL_LIMIT = 300
# The classic terminal: every line of a text view fits in it.
WIDTH = 80
GAP = "  "


def counted(count: int, noun: str, plural: str = "") -> str:
    """`1 tenant`, `2 tenants`, `0 webhooks`: a count with its noun agreeing."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


@dataclass(frozen=True)
class Cell:
    """A table cell whose `tail` stays whole when the cell is cut: the cut falls in `text`
    ("DNS: cannot res…, 3m ago" keeps the age)."""

    text: str
    tail: str = ""


def fit(text: str, width: int, *, tail: str = "", middle: bool = False) -> str:
    """`text + tail` in at most `width` characters, cut with "…" where it is too long: before
    `tail` when there is one, else at the end, or (`middle`) in the middle, which keeps a
    name's distinguishing ending (acme-prod…eu-west-1)."""
    whole = text + tail
    if len(whole) <= width:
        return whole
    if width <= 1:
        return ELLIPSIS[:width]
    if tail and width > len(tail) + 1:
        return text[: width - len(tail) - 1] + ELLIPSIS + tail
    if middle and width >= 5:
        head = width // 2
        return whole[:head] + ELLIPSIS + whole[len(whole) - (width - 1 - head) :]
    return whole[: width - 1] + ELLIPSIS


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


def roughly(seconds: float) -> str:
    """A duration in its largest unit, for a cell with little room: 42s, 3m, 2h, 3d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def span(seconds: float) -> str:
    """A configured duration as it is written: 7d, 24h (hours up to two days), 90m, 45s."""
    if seconds > 2 * 86400 and seconds % 86400 == 0:
        return f"{int(seconds // 86400)}d"
    for unit, factor in (("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


def size(count: int) -> str:
    """A configured size as it is written: 1GiB, 500MB, 1048577 bytes."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if count >= factor and count % factor == 0:
            return f"{count // factor}{unit}"
    for unit, factor in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2)):
        if count >= factor and count % factor == 0:
            return f"{count // factor}{unit}"
    return counted(count, "byte")


def _parse(when: str | None) -> float | None:
    if when is None:
        return None
    return datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _since(when: str | None, now: float, suffix: str = " ago") -> str:
    stamp = _parse(when)
    return "-" if stamp is None else ago(now - stamp) + suffix


def _until(when: str | None, now: float, prefix: str = "in ") -> str:
    stamp = _parse(when)
    if stamp is None:
        return "-"
    return "now" if stamp <= now else prefix + ago(stamp - now)


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    width: int = WIDTH,
    shrink: Sequence[tuple[int, int]] = (),
    middle: Sequence[int] = (),
) -> str:
    """Columns padded to their widest cell; the last column is left ragged. Cells are made
    visible (controls escaped) and cut to CELL_LIMIT.

    While a line would be wider than `width`, the columns in `shrink` give up room in turn,
    each `(column, floor)` down to `floor` characters, and their cells are cut with "…" (in
    the middle for the columns in `middle`). Any line still too wide is cut at `width`.
    """

    def shown(value: Any) -> tuple[str, str]:
        if isinstance(value, Cell):
            return visible(value.text, CELL_LIMIT), visible(value.tail, CELL_LIMIT)
        return visible(str(value), CELL_LIMIT), ""

    cells = [[shown(h) for h in headers], *[[shown(c) for c in row] for row in rows]]
    columns = zip(*cells, strict=True)
    widths = [max(len(text) + len(tail) for text, tail in column) for column in columns]
    for column, floor in shrink:
        excess = sum(widths) + len(GAP) * (len(widths) - 1) - width
        if excess <= 0:
            break
        widths[column] = max(min(floor, widths[column]), widths[column] - excess)
    lines = []
    for row in cells:
        texts = [
            fit(text, widths[i], tail=tail, middle=i in middle)
            for i, (text, tail) in enumerate(row)
        ]
        padded = [text.ljust(widths[i]) for i, text in enumerate(texts[:-1])] + texts[-1:]
        lines.append(fit(GAP.join(padded).rstrip(), width))
    return "\n".join(lines)


def last_error(t: dict[str, Any], now: float) -> str | Cell:
    """The newest failure with its age, or "-" once a success came after it.

    The failures list stays until Refresh (as the reference product's does), but a row that
    shows an old error beside an empty queue reads as failing. The stamps have whole
    seconds: on a tie, `attempts` (reset by a success) says which came last.
    """
    failures = t["recent_failures"]
    if not failures:
        return "-"
    newest = failures[0]
    succeeded = t["last_processed_at"]
    if t["attempts"] == 0 and succeeded is not None and succeeded >= newest["at"]:
        return "-"
    at = _parse(newest["at"])
    age = "" if at is None else f", {roughly(now - at)} ago"
    return Cell(newest["error"], age)


def status_table(status: dict[str, Any], now: float | None = None) -> str:
    """One line per tenant. Ages and waits are short (the headers say what they measure);
    how long the oldest webhook has waited and the attempt count are in the tenant view."""
    now = time.time() if now is None else now
    rows = [
        [
            t["tenant"],
            t["queue"],
            t["waiting"],
            _since(t["last_processed_at"], now, suffix=""),
            _until(t["next_attempt_at"], now, prefix=""),
            last_error(t, now),
        ]
        for t in status["tenants"]
    ]
    headers = ["TENANT", "QUEUE", "WAITING", "LAST OK", "NEXT", "LAST ERROR"]
    # The error gives up room first, then the name (cut in the middle: names of one
    # customer's tenants tend to differ at the end), then both down to their headers.
    shrink = [(5, 20), (0, 20), (5, 10), (0, 6)]
    totals = status["totals"]
    clustered = "instances" in totals
    if clustered:
        # Several instances on one database: who delivers each tenant, before the error
        # (instance names end in what tells them apart: the process and a random tag).
        headers.insert(5, "OWNER")
        for row, t in zip(rows, status["tenants"], strict=True):
            row.insert(5, t["owner"] or "-")
        shrink = [(6, 20), (5, 12), (0, 20), (6, 10), (5, 6), (0, 6)]
    text = table(headers, rows, shrink=shrink, middle=[0, 5] if clustered else [0])
    summary = ", ".join(
        counted(totals[key], "tenant") if key == "tenants" else f"{totals[key]} {key}"
        for key in ("tenants", "waiting", "stalled", "paused", "disabled", "orphaned", "parked")
        if key in totals and (totals[key] or key in ("tenants", "waiting", "stalled"))
    )
    mismatch = totals.get("config_mismatch")
    if mismatch:
        # Several instances on one database whose main files' tenants differ.
        summary += f"\nconfig_mismatch: the main file's tenants differ on {', '.join(mismatch)}"
    text += "\n\n" + summary + "\n"
    if clustered:
        text += "\n" + instances_table(totals["instances"]) + "\n"
    return text


def instances_table(instances: Sequence[dict[str, Any]]) -> str:
    """The live instances sharing the database: what each holds and where its API is."""
    rows = [
        [i["id"], i["tenants"], ago(i["heartbeat_age_s"]) + " ago", i["api_url"] or "-"]
        for i in instances
    ]
    headers = ["INSTANCE", "TENANTS", "HEARTBEAT", "API"]
    return table(headers, rows, shrink=[(3, 20), (0, 20)], middle=[0])


def _took(duration_ms: float) -> str:
    return f"{duration_ms:g}ms" if duration_ms < 1000 else f"{duration_ms / 1000:.1f}s"


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
    if "owner" in t:  # several instances on one database: the one delivering it
        pairs.append(("owner", t["owner"] or "none (claimed at the next tick)"))
    label = max(len(k) for k, _ in pairs)
    room = WIDTH - label - len(GAP)
    lines = [f"{k.ljust(label)}{GAP}{fit(visible(str(v), CELL_LIMIT), room)}" for k, v in pairs]
    failures = t["recent_failures"]
    lines.append("")
    if failures:
        lines.append(f"recent failures (newest first, {len(failures)}):")
        rows = [
            [
                _since(f["at"], now, suffix=""),
                f["attempt"],
                f"{f['first_sequence']}-{f['last_sequence']}",
                f["count"],
                _took(f["duration_ms"]),
                f["error"],
            ]
            for f in failures
        ]
        # The error names the HTTP status when there was one; the JSON has `status` and `at`.
        headers = ["AGE", "ATTEMPT", "SEQUENCES", "COUNT", "TOOK", "ERROR"]
        lines.append(table(headers, rows, shrink=[(5, 5)]))
    else:
        lines.append("recent failures: none")
    return "\n".join(lines) + "\n"


def _pairs_text(pairs: Sequence[tuple[str, Any]]) -> list[str]:
    label = max(len(k) for k, _ in pairs)
    room = WIDTH - label - len(GAP)
    return [f"{k.ljust(label)}{GAP}{fit(visible(str(v), CELL_LIMIT), room)}" for k, v in pairs]


def lookup_text(w: dict[str, Any], now: float | None = None) -> str:
    """A webhook looked up by id (`webhookd show`): where it is, then its failed attempts."""
    now = time.time() if now is None else now
    state = w["state"]
    pairs: list[tuple[str, Any]] = [
        ("tenant", w["tenant"]),
        ("id", w["id"]),
        ("state", state),
        ("sequence", w.get("sequence", "-")),
    ]
    if "event" in w:
        pairs.append(("event", w["event"]))
    if "accepted_at" in w:
        pairs.append(("accepted", f"{w['accepted_at']} ({_since(w['accepted_at'], now)})"))
    if state == "queued":
        pairs.append(("position", f"{w['position']} (1 is the head)"))
        pairs.append(("attempts", w["attempts"]))
        pairs.append(("next attempt", _until(w["next_attempt_at"], now)))
    elif state == "in_flight":
        pairs.append(("attempt", f"{w['attempt']}, sending now"))
    elif state in ("delivered", "discarded", "parked", "requeued"):
        at = w.get(f"{state}_at")
        pairs.append((state, "-" if at is None else f"{at} ({_since(at, now)})"))
        if state == "delivered":
            pairs.append(("attempts", w.get("attempts", "-")))
            took = w.get("duration_ms")
            answer = w.get("status")
            pairs.append(("answer", f"HTTP {answer}" if answer else "-"))
            pairs.append(("took", "-" if took is None else _took(took)))
        if w.get("next_sequence") is not None:
            pairs.append(("replayed as", w["next_sequence"]))
    elif state == "expired":
        pairs.append(("note", w.get("detail", "")))
    lines = _pairs_text(pairs)
    failures = w.get("failures", [])
    lines.append("")
    if failures:
        lines.append(f"failed attempts (newest first, {len(failures)}):")
        rows = [
            [
                _since(f["at"], now, suffix=""),
                f["attempt"],
                f"{f['first_sequence']}-{f['last_sequence']}",
                _took(f["duration_ms"]),
                f["error"],
            ]
            for f in failures
        ]
        headers = ["AGE", "ATTEMPT", "SEQUENCES", "TOOK", "ERROR"]
        lines.append(table(headers, rows, shrink=[(4, 5)]))
    else:
        lines.append("failed attempts: none")
    return "\n".join(lines) + "\n"


def history_text(page: dict[str, Any], now: float | None = None) -> str:
    """A page of a tenant's history, one line per webhook, and how to ask for the next."""
    now = time.time() if now is None else now
    records = page["records"]
    rows = [
        [
            r["sequence"],
            r["outcome"] + ("" if r["next_sequence"] is None else f"→{r['next_sequence']}"),
            _since(r["finished_at"], now, suffix=""),
            r["attempts"],
            r["status"] if r["status"] is not None else "-",
            "-" if r["duration_ms"] is None else _took(r["duration_ms"]),
            r["event"],
            r["id"],
        ]
        for r in records
    ]
    headers = ["SEQUENCE", "OUTCOME", "AGE", "ATTEMPTS", "STATUS", "TOOK", "EVENT", "ID"]
    # The id gives up room first (cut in the middle), then the event.
    text = table(headers, rows, shrink=[(7, 12), (6, 12)], middle=[7]) if records else ""
    order = "newest first" if page["order"] == "newest" else "oldest first"
    summary = f"{page['tenant']}: {counted(len(records), 'record')}, {order}"
    if page["next_cursor"] is not None:
        summary += f"; next page: cursor={page['next_cursor']}"
    else:
        summary += "; no more"
    return (text + "\n\n" if text else "") + summary + "\n"
