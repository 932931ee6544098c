"""The API's answers: JSON bodies, and the one shape every error takes."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from webhookd.errors import CODES, for_status


def json_response(body: Any, status: int = 200, *, pretty: bool = False) -> web.Response:
    option = orjson.OPT_INDENT_2 if pretty else 0
    return web.Response(
        body=orjson.dumps(body, option=option), status=status, content_type="application/json"
    )


def error_response(code: str, detail: str) -> web.Response:
    """`{"error": code, "detail": detail}` with the status errors.CODES gives the code, and a
    Retry-After header where it says how soon to send again."""
    # Details may quote what a client sent: keep them short and always encodable.
    if len(detail) > 1000:
        detail = detail[:1000] + "…"
    detail = detail.encode("utf-8", "backslashreplace").decode()
    registered = CODES[code]  # a KeyError here is an unregistered code: a bug
    response = json_response({"error": code, "detail": detail}, registered.status)
    if registered.retry_after is not None:
        response.headers["Retry-After"] = str(registered.retry_after)
    return response


def http_error_response(request: web.BaseRequest, exc: web.HTTPException) -> web.Response:
    """An aiohttp HTTPException (404, 405, 413, ...) as our JSON error."""
    status = exc.status
    detail = exc.text if exc.text and status != 404 else exc.reason
    if status == 404:
        detail = f"no such path: {request.method} {request.path}"
    elif status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        detail = f"{request.method} is not allowed on {request.path}; use {allowed}"
    elif status == 413:
        detail = "the request body is larger than max_body_bytes"
    response = error_response(for_status(status), detail)
    if "Allow" in exc.headers:  # a 405 must say what is allowed (RFC 9110 §15.5.6)
        response.headers["Allow"] = exc.headers["Allow"]
    return response
