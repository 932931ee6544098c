"""structlog setup: JSON lines for journald and pipes, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from webhookd.terminal import UNSAFE, visible, visible_lines

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Belt and braces: secrets are never passed to a logger, but should one ever be, by these
# names, it is masked rather than written to the journal.
REDACTED_KEYS = frozenset({"secret", "signing_secret", "api_token", "token", "authorization"})


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in REDACTED_KEYS.intersection(event):
        event[key] = "***"
    return event


# Keys whose values are lines of text (a traceback): their line feeds stay.
MULTILINE_KEYS = frozenset({"exception", "stack"})
_PLAIN = frozenset({int, float, bool, type(None)})


def _visible(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Escape controls and bidirectional controls in every value, for both renderers.

    Values quote the outside world (an endpoint's Location, a webhook id, a request path),
    and log lines end up on terminals (`journalctl`, `jq -r`, the console renderer). JSON
    escapes C0 controls but not C1 or bidirectional ones, and a decoded value has them all
    back. One regex search per string value: this runs for every delivery attempt."""
    for key, value in event.items():
        kind = type(value)
        if kind is str:
            if UNSAFE.search(value) is not None:
                event[key] = visible_lines(value) if key in MULTILINE_KEYS else visible(value)
        elif kind not in _PLAIN:
            event[key] = _visible_value(value)
    return event


def _visible_value(value: Any) -> Any:
    """A nested value made visible: lists, tuples and dicts walked, anything else as str()
    (what both renderers would show of it) when that holds a control."""
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, list | tuple):
        return [_visible_value(item) for item in value]
    if isinstance(value, dict):
        return {_visible_value(k): _visible_value(v) for k, v in value.items()}
    if type(value) in _PLAIN:
        return value
    text = str(value)
    return visible(text) if UNSAFE.search(text) is not None else value


def _dumps(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


class Logger:
    """A module's logger: a bound structlog logger, rebuilt only when configure() runs.

    structlog's lazy proxy would build a logger on every call unless loggers are cached, and
    cached ones would ignore a reload's new level or format. This keeps the cheap path
    (a filtered-out call is one attribute lookup and a no-op) and still follows reloads.
    """

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._generation = -1
        self._bound: Any = None

    def __getattr__(self, method: str) -> Any:
        if self._generation != _generation[0]:
            self._bound = structlog.get_logger(self._name).bind()
            self._generation = _generation[0]
        return getattr(self._bound, method)


# Bumped by every configure(): a one-element list, so no `global` statement is needed.
_generation = [0]


def get_logger(name: str) -> Any:
    return Logger(name)


class StdlibBridge(logging.Handler):
    """What libraries log through the standard library (aiohttp, asyncio) as our events.

    One line each, like ours: the message's first line, the logger's name, and an
    exception named in one line (`error`), never a traceback: aiohttp's exceptions quote a
    client's bytes, and a stack is no reading for an operator scanning the journal.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                fields["error"] = one_line(record.exc_info[1])
            message = record.getMessage().partition("\n")[0][:300]
            get_logger("stdlib").log(record.levelno, message, **fields)
        except Exception:
            self.handleError(record)


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {exc}".partition("\n")[0][:300]


def _route_stdlib(level: int) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StdlibBridge)]:
        root.removeHandler(handler)
    root.addHandler(StdlibBridge())
    root.setLevel(level)


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """(Re)configure logging; safe to call again on reload."""
    out = stream or sys.stderr
    as_json = log_format == "json" or (log_format == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            _visible,  # last before rendering: it sees the formatted traceback too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,  # our Logger caches, per configuration
    )
    _route_stdlib(LEVELS.get(level, logging.INFO))
    _generation[0] += 1
