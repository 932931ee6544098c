"""The HTTP API: ingest, status, control, metrics. Handlers are thin; the service decides."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
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
from webhookd.config import CONTROL_CHARACTERS, TENANT_NAME
from webhookd.responses import error_response, http_error_response, json_response
from webhookd.service import IngestItem, Service, ServiceError

log = logs.get_logger("webhookd.api")

SERVICE = web.AppKey("service", Service)
MAX_ITEMS = 1000
MAX_ID_LENGTH = 255
ITEM_KEYS = frozenset({"event", "data", "id"})
# Digits to "0", everything else to "x": a run of 19 digits becomes 19 zeros, found by
# `in` (20 µs for a 14 KB body, where a regex takes 300 µs).
# Digits and the decimal point as "0": a run of 16 means a number a double may not hold
# exactly (an integer past 2^53 is kept by orjson only up to 64 bits; a decimal with 16+
# significant digits not at all).
DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 or b == 0x2E else 0x78 for b in range(256))
LONG_NUMBER = b"0" * 16
# orjson writes at most 254 levels of nesting; the exact path holds to the same.
MAX_DEPTH = 254
# A slow client may take this long to send its body (a slow-loris guard).
BODY_TIMEOUT_S = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


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
        return http_error_response(request, exc)
    except Exception:
        log.exception("request_failed", method=request.method, path=request.path)
        return error_response(500, "internal", "an internal error occurred; see the daemon log")


def authorized(request: web.BaseRequest, expected: bytes) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # The scheme is case-insensitive (RFC 9110 §11.1). A header byte that is not UTF-8
    # arrives surrogate-escaped; it cannot match, but must not raise.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), expected
    )


UNAUTHORIZED = "send Authorization: Bearer <api_token>"
RESTART_NEEDED = (
    "this is the api_token the configuration file holds now, but the daemon keeps the token "
    "it started with until it is restarted (a reload does not change it)"
)


def refusal(service: Service, request: web.BaseRequest) -> web.Response:
    """The 401. A client holding the token the file was changed to since start-up (read by
    a reload, applied only by a restart) is told so: otherwise a changed token looks wrong
    with nothing to say why. Compared in constant time, like the running token."""
    changed = service.token_at_restart
    if changed is not None:
        token = changed.reveal()
        if authorized(request, token.encode()) if token else "Authorization" not in request.headers:
            return error_response(401, "restart_needed", RESTART_NEEDED)
    return error_response(401, "unauthorized", UNAUTHORIZED)


def auth_middleware(service: Service, token: str) -> Any:
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz" and not authorized(request, expected):
            return refusal(service, request)
        return await handler(request)

    return check


def create_app(service: Service) -> web.Application:
    middlewares: list[Any] = [errors_middleware]
    token = service.config.daemon.api_token.reveal()
    if token:
        middlewares.append(auth_middleware(service, token))
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


def preflight(app: web.Application) -> Any:
    """The refusals a request's head decides, for a client that sent `Expect: 100-continue`:
    it waits for "100 Continue" before sending its body, and gets it only when that body
    would be read (RFC 9110 §10.1.1). Runs before the app sees the request."""
    token = app[SERVICE].config.daemon.api_token.reveal().encode()

    async def check(request: web.BaseRequest) -> web.StreamResponse | None:
        expect = request.headers["Expect"].strip().lower()
        if expect != "100-continue":
            return error_response(
                417, "expectation_failed", "the only Expect this API takes is 100-continue"
            )
        match = await app.router.resolve(request)  # type: ignore[arg-type]
        if token and request.path != "/healthz" and not authorized(request, token):
            return refusal(app[SERVICE], request)
        if match.http_exception is not None:
            return http_error_response(request, match.http_exception)
        if match.route.handler is ingest:
            try:
                check_ingest_head(app[SERVICE], valid_tenant(match["tenant"]), request)
            except ServiceError as exc:
                return error_response(exc.status, exc.code, exc.detail)
        return None

    return check


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
    return valid_tenant(request.match_info["tenant"])


def valid_tenant(name: str) -> str:
    """A tenant name from a path: 400 when it cannot be a name at all; whether a tenant
    of that name exists (404 if not) is the service's answer."""
    if not TENANT_NAME.fullmatch(name):
        raise BadRequest(f"{name[:80]!r} is not a valid tenant name (1 to 64 of A-Z a-z 0-9 _ -)")
    return name


# -- ingest ------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class RawNumber:
    """A non-integer JSON number kept as the producer wrote it (a double would round it)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        if not math.isfinite(float(text)):
            raise ValueError(f"{text[:40]} does not fit a double")
        self.text = text


def _load_json(body: bytes) -> tuple[Any, bool]:
    """Parse a body; (document, exact). orjson is the fast path.

    orjson reads numbers as 64-bit integers or doubles, which would change a longer one.
    A body that may hold one (a run of 16+ digits and points, found by one C-level pass)
    goes through the standard library instead, which keeps integers exact and decimals as
    their text. That parser is laxer than orjson, so it is held to the same rules: no NaN
    or Infinity, no 1e400, no lone surrogates.
    """
    if LONG_NUMBER not in body.translate(DIGITS_AS_ZEROS):
        return orjson.loads(body), False
    document = json.loads(body, parse_constant=_reject_constant, parse_float=RawNumber)
    # UnicodeEncodeError on a lone surrogate, anywhere in the document.
    json.dumps(document, ensure_ascii=False, default=lambda number: number.text).encode()
    return document, True


def _encode_data(data: dict[str, Any], exact: bool) -> str:
    return _dumps_exact(data, MAX_DEPTH) if exact else orjson.dumps(data).decode()


def _dumps_exact(value: Any, levels: int) -> str:
    """Compact JSON with RawNumbers written as they came; ValueError past `levels`."""
    if isinstance(value, dict):
        if not levels:
            raise ValueError("nested too deeply")
        return (
            "{"
            + ",".join(
                f"{json.dumps(key, ensure_ascii=False)}:{_dumps_exact(item, levels - 1)}"
                for key, item in value.items()
            )
            + "}"
        )
    if isinstance(value, list):
        if not levels:
            raise ValueError("nested too deeply")
        return "[" + ",".join(_dumps_exact(item, levels - 1) for item in value) + "]"
    if isinstance(value, RawNumber):
        return value.text
    return json.dumps(value, ensure_ascii=False)  # str, int, bool, None


def parse_ingest(body: bytes) -> list[IngestItem]:
    """Validate an ingest body: one webhook object or a non-empty array of up to 1000."""
    try:
        document, exact = _load_json(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeError included
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if isinstance(document, dict):
        documents = [document]
    elif isinstance(document, list):
        if not document:
            raise BadRequest("the array is empty; send 1 to 1000 webhooks")
        if len(document) > MAX_ITEMS:
            raise BadRequest(f"{len(document)} webhooks in one request; the limit is {MAX_ITEMS}")
        documents = document
    else:
        raise BadRequest('expected a webhook object {"event", "data", "id"?} or an array of them')
    many = isinstance(document, list)
    return [_item(index, doc, many=many, exact=exact) for index, doc in enumerate(documents)]


def _item(index: int, doc: Any, *, many: bool, exact: bool) -> IngestItem:
    where = f"item {index}: " if many else ""
    if not isinstance(doc, dict):
        raise BadRequest(f"{where}expected an object")
    unknown = set(doc) - ITEM_KEYS
    if unknown:
        raise BadRequest(
            f"{where}unknown field(s) {', '.join(sorted(unknown))}; expected event, data, id"
        )
    event = doc.get("event")
    if not isinstance(event, str) or not event:
        raise BadRequest(f"{where}event must be a non-empty string")
    data = doc.get("data", {})
    if not isinstance(data, dict):
        raise BadRequest(f"{where}data must be a JSON object")
    webhook_id = doc.get("id")
    if webhook_id is not None and (
        not isinstance(webhook_id, str) or not 0 < len(webhook_id) <= MAX_ID_LENGTH
    ):
        raise BadRequest(f"{where}id must be a string of 1 to {MAX_ID_LENGTH} characters")
    if webhook_id is not None and CONTROL_CHARACTERS.search(webhook_id):
        # It is sent as the webhook-id header of signed deliveries.
        raise BadRequest(f"{where}id must not hold control characters (line breaks, ...)")
    try:
        encoded = _encode_data(data, exact)
    except (TypeError, ValueError, RecursionError):
        # orjson writes at most 254 levels (it reads 1024): refuse what we could not send.
        raise BadRequest(f"{where}data is nested too deeply (at most {MAX_DEPTH} levels)") from None
    return IngestItem(webhook_id, event, encoded)


def check_ingest_head(service: Service, name: str, request: web.BaseRequest) -> None:
    """What the head alone decides: the tenant, the media type (before any body is read)."""
    service.tenant_config(name)
    content_type = request.headers.get("Content-Type")
    # No Content-Type at all is taken as JSON; a declared other type is refused.
    if content_type is not None and not (
        request.content_type == "application/json" or request.content_type.endswith("+json")
    ):
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not JSON; send application/json"
        )


async def ingest(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    name = tenant_name(request)
    check_ingest_head(service, name, request)
    items = parse_ingest(await read_body(request))
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
