"""webhookd: a durable, ordered, per-tenant outgoing webhook delivery daemon."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """`__version__`, looked up on first use: importlib.metadata takes tens of milliseconds,
    and every `webhookd` process imports this package before its first line of its own (the
    daemon holds SIGHUP from that line on: webhookd.__main__)."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("webhookd")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0"
    globals()["__version__"] = found
    return found
