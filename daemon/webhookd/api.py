"""The HTTP API: ingest, status, control, metrics. Handlers are thin; the service decides."""

from __future__ import annotations

import asyncio
import hmac
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST

from webhookd import logs, views
from webhookd.config import TENANT_NAME
from webhookd.ingest import parse_body
from webhookd.service import NotFound, Service, ServiceError

log = logs.get_logger("webhookd.api")

SERVICE = web.AppKey("service", Service)
# A slow client may take this long to send its body (a slow-loris guard).
BODY_TIMEOUT_S = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


def json_response(body: Any, status: int = 200, *, pretty: bool = False) -> web.Response:
    option = orjson.OPT_INDENT_2 if pretty else 0
    return web.Response(
        body=orjson.dumps(body, option=option), status=status, content_type="application/json"
    )


def error_response(status: int, code: str, detail: str) -> web.Response:
    # Details may quote what a client sent: keep them short and always encodable.
    if len(detail) > 1000:
        detail = detail[:1000] + "…"
    detail = detail.encode("utf-8", "backslashreplace").decode()
    return json_response({"error": code, "detail": detail}, status)


ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answers JSON `{"error", "detail"}`; a bug answers 500, never a traceback."""
    try:
        return await handler(request)
    except ServiceError as exc:
        return error_response(exc.status, exc.code, exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text if exc.text and exc.status != 404 else exc.reason
        if exc.status == 404:
            detail = f"no such path: {request.method} {request.path}"
        elif exc.status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            detail = f"{request.method} is not allowed on {request.path}; use {allowed}"
        elif exc.status == 413:
            detail = "the request body is larger than max_body_bytes"
        response = error_response(exc.status, ERROR_CODES.get(exc.status, "http_error"), detail)
        if "Allow" in exc.headers:  # a 405 must say what is allowed (RFC 9110 §15.5.6)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("request_failed", method=request.method, path=request.path)
        return error_response(500, "internal", "an internal error occurred; see the daemon log")


def auth_middleware(token: str) -> Any:
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz":
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # The scheme is case-insensitive (RFC 9110 §11.1). A header byte that is not
            # UTF-8 arrives surrogate-escaped; it cannot match, but must not raise.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), expected
            ):
                return error_response(401, "unauthorized", "send Authorization: Bearer <api_token>")
        return await handler(request)

    return check


def create_app(service: Service) -> web.Application:
    middlewares: list[Any] = [errors_middleware]
    token = service.config.daemon.api_token.reveal()
    if token:
        middlewares.append(auth_middleware(token))
    app = web.Application(
        middlewares=middlewares, client_max_size=service.config.daemon.max_body_bytes
    )
    app[SERVICE] = service
    app.add_routes(
        [
            web.post("/v1/tenants/{tenant}/webhooks", ingest),
            web.get("/v1/tenants/{tenant}/webhooks", peek),
            web.get("/v1/status", status_all),
            web.get("/v1/tenants/{tenant}/status", status_one),
            web.post("/v1/retry", retry_all),
            web.post("/v1/tenants/{tenant}/retry", retry),
            web.post("/v1/tenants/{tenant}/refresh", refresh),
            web.post("/v1/tenants/{tenant}/pause", pause),
            web.post("/v1/tenants/{tenant}/resume", resume),
            web.post("/v1/tenants/{tenant}/skip", skip),
            web.get("/v1/tenants/{tenant}/parked", parked),
            web.post("/v1/tenants/{tenant}/parked/{id}/requeue", requeue),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
        ]
    )
    from webhookd import tenants_api  # its handlers use this module's helpers

    tenants_api.add_routes(app)
    return app


class RequestTimeout(ServiceError):
    status, code = 408, "request_timeout"


async def read_body(request: web.Request) -> bytes:
    """The whole request body, or a 4xx: compressed, too slow, undecodable, or cut short."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", ""):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:40]!r} is not accepted; send the body uncompressed"
        )
    try:
        if request.content.is_eof():  # all of it is here already: no timer needed
            return await request.read()
        async with asyncio.timeout(BODY_TIMEOUT_S):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"
        ) from None
    except web.HTTPException:
        raise  # 413 from client_max_size
    except (HttpProcessingError, RequestPayloadError, zlib.error) as exc:
        raise BadRequest(f"the body could not be read: {exc}") from None
    except (ConnectionError, aiohttp.ClientError, OSError):
        # The client hung up mid-body: nobody will read the answer, and nothing was queued.
        log.debug("client_gone", path=request.path)
        raise BadRequest("the connection closed before the whole body arrived") from None


def tenant_name(request: web.Request) -> str:
    name = request.match_info["tenant"]
    if not TENANT_NAME.fullmatch(name):
        raise NotFound(f"{name!r} is not a valid tenant name")
    return name


# -- ingest ------------------------------------------------------------------------------------


async def ingest(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    name = tenant_name(request)
    service.tenant_config(name)  # 404 before reading a body we would refuse anyway
    content_type = request.headers.get("Content-Type")
    # No Content-Type at all is taken as JSON; a declared other type is refused.
    if content_type is not None and not (
        request.content_type == "application/json" or request.content_type.endswith("+json")
    ):
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not JSON; send application/json"
        )
    items = await parse_body(await read_body(request))
    results = await service.ingest(name, items)
    return json_response({"webhooks": results}, 202)


# -- status and control ------------------------------------------------------------------------


def wants_text(request: web.Request) -> bool:
    if request.query.get("format") == "text":
        return True
    accept = request.headers.get("Accept", "")
    return "text/plain" in accept and "application/json" not in accept


async def status_all(request: web.Request) -> web.Response:
    status = request.app[SERVICE].status()
    if wants_text(request):
        return web.Response(text=views.status_table(status))
    return json_response(status, pretty=True)


async def status_one(request: web.Request) -> web.Response:
    status = request.app[SERVICE].tenant_status(tenant_name(request))
    if wants_text(request):
        return web.Response(text=views.tenant_text(status))
    return json_response(status, pretty=True)


async def retry(request: web.Request) -> web.Response:
    return json_response(request.app[SERVICE].retry(tenant_name(request)))


async def retry_all(request: web.Request) -> web.Response:
    return json_response(request.app[SERVICE].retry_all())


async def refresh(request: web.Request) -> web.Response:
    return json_response(await request.app[SERVICE].refresh(tenant_name(request)))


async def pause(request: web.Request) -> web.Response:
    return json_response(await request.app[SERVICE].set_paused(tenant_name(request), True))


async def resume(request: web.Request) -> web.Response:
    return json_response(await request.app[SERVICE].set_paused(tenant_name(request), False))


async def skip(request: web.Request) -> web.Response:
    return json_response(await request.app[SERVICE].skip(tenant_name(request)))


async def parked(request: web.Request) -> web.Response:
    name = tenant_name(request)
    return json_response(
        {"tenant": name, "parked": await request.app[SERVICE].parked(name)}, pretty=True
    )


async def requeue(request: web.Request) -> web.Response:
    name = tenant_name(request)
    return json_response(await request.app[SERVICE].requeue(name, request.match_info["id"]))


async def peek(request: web.Request) -> web.Response:
    name = tenant_name(request)
    text = request.query.get("limit", "10")
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise BadRequest("limit must be an integer from 1 to 1000")
    webhooks = await request.app[SERVICE].peek(name, int(text))
    return json_response({"tenant": name, "webhooks": webhooks}, pretty=True)


async def healthz(request: web.Request) -> web.Response:
    if await request.app[SERVICE].healthy():
        return json_response({"status": "ok"})
    return error_response(503, "unhealthy", "the database does not answer")


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
