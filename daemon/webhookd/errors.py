"""Every error code the HTTP API answers, with the status that carries it: the one registry.

An error answer is built only from a code named here (`responses.error_response` looks its
status up), so a new code cannot reach a client without being added, and tests/test_errors.py
checks that each one is in docs/errors.md and in docs/openapi.yaml with this status.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorCode:
    status: int
    # Seconds a client should wait before sending again (a Retry-After header), for the
    # refusals that pass by themselves; None where sending again would not help.
    retry_after: int | None = None


CODES: dict[str, ErrorCode] = {
    "bad_request": ErrorCode(400),
    "invalid_tenant": ErrorCode(400),
    "replay_too_large": ErrorCode(400),
    "unauthorized": ErrorCode(401),
    "restart_needed": ErrorCode(401),
    # The pages (webhookd/ui/): a portal link or a tenant name a page may not show.
    "forbidden": ErrorCode(403),
    "not_found": ErrorCode(404),
    "unknown_webhook": ErrorCode(404),
    "forgotten": ErrorCode(404),
    "method_not_allowed": ErrorCode(405),
    "request_timeout": ErrorCode(408),
    "conflict": ErrorCode(409),
    "queue_not_empty": ErrorCode(409),
    "payloads_not_kept": ErrorCode(409),
    "portal_not_configured": ErrorCode(409),
    "too_large": ErrorCode(413),
    "uri_too_long": ErrorCode(414),
    "unsupported_media_type": ErrorCode(415),
    "expectation_failed": ErrorCode(417),
    "unknown_event": ErrorCode(422),
    # The pages: too many wrong tokens at /ui/signin from one address. The page sets its own
    # Retry-After (what is left of the address's lock), so none is registered here.
    "too_many_sign_ins": ErrorCode(429),
    "headers_too_large": ErrorCode(431),
    "internal": ErrorCode(500),
    "unavailable": ErrorCode(503, retry_after=1),
    "owner_changed": ErrorCode(503, retry_after=1),
    "owner_unreachable": ErrorCode(503, retry_after=1),
    "too_many_connections": ErrorCode(503, retry_after=1),
    # /healthz: the daemon is not fit to serve; an orchestrator acts, not a client retrying.
    "unhealthy": ErrorCode(503),
}

# The code an HTTP error raised by aiohttp (routing, body size, its own parser) answers with.
BY_STATUS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal",
    503: "unavailable",
}


def for_status(status: int) -> str:
    """The code for an HTTP error status from aiohttp. A status no handler path raises today
    falls back to the generic code of its class (and that code's status): the answer stays
    within the documented contract rather than inventing a code."""
    if status in BY_STATUS:
        return BY_STATUS[status]
    return "internal" if status >= 500 else "bad_request"
