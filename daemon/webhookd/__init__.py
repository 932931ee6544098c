"""webhookd: a durable, ordered, per-tenant outgoing webhook delivery daemon."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("webhookd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
