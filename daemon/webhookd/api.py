"""The HTTP API: ingest, status, control, metrics. Handlers are thin; the service decides."""

from __future__ import annotations

import asyncio
import hmac
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST

from webhookd import listener, logs, views
from webhookd.config import TENANT_NAME
from webhookd.forward import Forwarder, forwarded
from webhookd.ingest import INLINE_BYTES, parse_body
from webhookd.responses import error_response, http_error_response, json_response
from webhookd.service import Service, ServiceError

log = logs.get_logger("webhookd.api")

SERVICE = web.AppKey("service", Service)
FORWARDER = web.AppKey("forwarder", Forwarder)
# A slow client may take this long to send its body (a slow-loris guard).
BODY_TIMEOUT_S = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answers JSON `{"error", "detail"}`; a bug answers 500, never a traceback.
    Ingest's answers are counted by status (the metrics)."""
    try:
        response = await handler(request)
    except ServiceError as exc:
        response = error_response(exc.status, exc.code, exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = http_error_response(request, exc)
    except Exception:
        log.exception("request_failed", method=request.method, path=request.path)
        response = error_response(500, "internal", "an internal error occurred; see the daemon log")
    if request.match_info.route.handler is ingest:
        request.app[SERVICE].metrics.answered_ingest(response.status)
    return response


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
    if service.cluster is not None:
        forwarder = Forwarder(service.cluster.instance, token)
        app[FORWARDER] = forwarder

        async def close_forwarder(app: web.Application) -> None:
            await forwarder.close()

        app.on_cleanup.append(close_forwarder)
    app.add_routes(
        [
            web.post("/v1/tenants/{tenant}/webhooks", ingest),
            web.get("/v1/tenants/{tenant}/webhooks", peek),
            web.get("/v1/status", status_all),
            web.get("/v1/tenants/{tenant}/status", status_one),
            web.post("/v1/retry", retry_all),
            web.post("/v1/tenants/{tenant}/retry", at_owner(retry)),
            web.post("/v1/tenants/{tenant}/refresh", at_owner(refresh)),
            web.post("/v1/tenants/{tenant}/pause", at_owner(pause)),
            web.post("/v1/tenants/{tenant}/resume", at_owner(resume)),
            web.post("/v1/tenants/{tenant}/skip", at_owner(skip)),
            web.get("/v1/tenants/{tenant}/parked", parked),
            web.post("/v1/tenants/{tenant}/parked/{id}/requeue", at_owner(requeue)),
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
        match = await app.router.resolve(request)  # type: ignore[arg-type]
        answer = refuse(request, match)
        if answer is not None and match.route.handler is ingest:
            app[SERVICE].metrics.answered_ingest(answer.status)  # as the app's answers are
        return answer

    def refuse(request: web.BaseRequest, match: web.UrlMappingMatchInfo) -> web.Response | None:
        expect = request.headers["Expect"].strip().lower()
        if expect != "100-continue":
            return error_response(
                417, "expectation_failed", "the only Expect this API takes is 100-continue"
            )
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
    body = await read_body(request)
    if len(body) <= INLINE_BYTES:  # parsed at once, on the loop: nothing to give up
        items = await parse_body(body)
    else:
        with listener.abandoned_if_client_leaves(request):
            items = await parse_body(body)
    results = await service.ingest(name, items)
    return json_response({"webhooks": results}, 202)


# -- status and control ------------------------------------------------------------------------


def at_owner(handler: Handler) -> Handler:
    """A tenant's control runs on the instance delivering the tenant: with several
    instances on one database, a call for a tenant another instance holds is forwarded
    there and its answer relayed as is (forward.py). On SQLite, `handler` as it is."""

    async def run(request: web.Request) -> web.StreamResponse:
        service = request.app[SERVICE]
        if service.cluster is not None:
            name = tenant_name(request)
            owner = await service.placement(name, forwarded=forwarded(request))
            if owner is not None:
                body = await read_body(request) if request.body_exists else b""
                return await request.app[FORWARDER].call(request, owner, body)
        return await handler(request)

    return run


def wants_text(request: web.Request) -> bool:
    if request.query.get("format") == "text":
        return True
    accept = request.headers.get("Accept", "")
    return "text/plain" in accept and "application/json" not in accept


async def status_all(request: web.Request) -> web.Response:
    status = await request.app[SERVICE].status_view()
    if wants_text(request):
        return web.Response(text=views.status_table(status))
    return json_response(status, pretty=True)


async def status_one(request: web.Request) -> web.Response:
    status = await request.app[SERVICE].tenant_status_view(tenant_name(request))
    if wants_text(request):
        return web.Response(text=views.tenant_text(status))
    return json_response(status, pretty=True)


async def retry(request: web.Request) -> web.Response:
    return json_response(request.app[SERVICE].retry(tenant_name(request)))


async def retry_all(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    answer = service.retry_all()
    if service.cluster is None or forwarded(request):
        return json_response(answer)
    # Several instances: each retries the tenants it holds; their answers add up.
    others = await service.other_instances()
    asked = await asyncio.gather(*(request.app[FORWARDER].ask(request, o) for o in others))
    unreachable = []
    for owner, (status, body) in zip(others, asked, strict=True):
        if status == 200 and isinstance(body, dict) and isinstance(body.get("retrying"), list):
            answer["retrying"] += body["retrying"]
        else:
            unreachable.append({"instance": owner.instance, "status": status, "detail": body})
    answer["retrying"].sort()
    answer["count"] = len(answer["retrying"])
    answer["unreachable"] = unreachable
    return json_response(answer)


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
    problem = await request.app[SERVICE].health()
    if problem is None:
        return json_response({"status": "ok"})
    return error_response(503, "unhealthy", problem)


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    await service.health()  # webhookd_healthy: the check /healthz runs, made for each scrape
    body = service.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
