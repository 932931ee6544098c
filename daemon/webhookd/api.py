"""The HTTP API: ingest, status, control, metrics. Handlers are thin; the service decides."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import zlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST

from webhookd import listener, logs, views
from webhookd.config import TENANT_NAME
from webhookd.forward import Forwarder, forwarded
from webhookd.ingest import INLINE_BYTES, MAX_ID_LENGTH, parse_body
from webhookd.records import (
    HISTORY_OUTCOMES,
    HistoryOutcome,
    HistoryQuery,
    ReplaySelection,
    StoreError,
)
from webhookd.responses import error_response, http_error_response, json_response
from webhookd.service import Service, ServiceError

log = logs.get_logger("webhookd.api")

SERVICE = web.AppKey("service", Service)
OPENAPI = web.AppKey("openapi", bytes)
FORWARDER = web.AppKey("forwarder", Forwarder)
# A slow client may take this long to send its body (a slow-loris guard).
BODY_TIMEOUT_S = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(ServiceError):
    code = "bad_request"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answers JSON `{"error", "detail"}`; a bug answers 500, never a traceback.
    Ingest's answers are counted by status (the metrics)."""
    try:
        response = await handler(request)
    except ServiceError as exc:
        response = error_response(exc.code, exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = http_error_response(request, exc)
    except Exception:
        log.exception("request_failed", method=request.method, path=request.path)
        response = error_response("internal", "an internal error occurred; see the daemon log")
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


# Answered without a token: liveness for probes, and the API's description for clients.
PUBLIC_PATHS = frozenset({"/healthz", "/v1/openapi.json"})

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
            return error_response("restart_needed", RESTART_NEEDED)
    return error_response("unauthorized", UNAUTHORIZED)


def own_sign_in(path: str) -> bool:
    """The pages at /ui/ and /portal/ check their own sign-in (a session cookie, a signed
    link: webhookd/ui/), so the bearer token is not asked of them; the rest of the API
    asks it as before."""
    return path == "/ui" or path.startswith(("/ui/", "/portal/"))


def auth_middleware(service: Service, token: str) -> Any:
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path not in PUBLIC_PATHS and not own_sign_in(path) and not authorized(request, expected):
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
    app[OPENAPI] = openapi_document()
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
            web.get("/v1/tenants/{tenant}/webhooks/{id:.+}", lookup),
            web.get("/v1/tenants/{tenant}/history", history),
            web.post("/v1/tenants/{tenant}/replay", replay),
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
            web.get("/v1/openapi.json", openapi),
        ]
    )
    from webhookd import tenants_api, ui  # their handlers use this module's helpers

    tenants_api.add_routes(app)
    ui.add_routes(app)
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
                "expectation_failed", "the only Expect this API takes is 100-continue"
            )
        path = request.path
        asked = token and path not in PUBLIC_PATHS and not own_sign_in(path)
        if asked and not authorized(request, token):
            return refusal(app[SERVICE], request)
        if match.http_exception is not None:
            return http_error_response(request, match.http_exception)
        if match.route.handler is ingest:
            try:
                check_ingest_head(app[SERVICE], valid_tenant(match["tenant"]), request)
            except ServiceError as exc:
                return error_response(exc.code, exc.detail)
        return None

    return check


class RequestTimeout(ServiceError):
    code = "request_timeout"


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
    return error_response("unhealthy", problem)


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    await service.history_size()  # the history gauges, as of now
    await service.health()  # webhookd_healthy: the check /healthz runs, made for each scrape
    body = service.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def openapi_document() -> bytes:
    """The OpenAPI document as JSON: docs/openapi.yaml, converted when it changes (make
    openapi) and shipped inside the package, so that an installed daemon serves it too
    without a YAML parser at run time; tests/test_openapi.py checks the two agree."""
    return resources.files("webhookd").joinpath("openapi.json").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


# -- history: lookup, listing, replay ------------------------------------------------------------


async def lookup(request: web.Request) -> web.StreamResponse:
    """Where a webhook is now. With several instances, a queued webhook is `in_flight` only
    where its tenant's attempts run: the owner is asked then (as the controls are)."""
    service = request.app[SERVICE]
    name = tenant_name(request)
    webhook_id = request.match_info["id"]
    if not 0 < len(webhook_id) <= MAX_ID_LENGTH:
        raise BadRequest(f"an id is 1 to {MAX_ID_LENGTH} characters")
    answer = await service.lookup(name, webhook_id)
    cluster = service.cluster
    if (
        answer["state"] == "queued"
        and cluster is not None
        and not cluster.holds(name)
        and not forwarded(request)
    ):
        try:
            owner = await cluster.owner(name)
        except StoreError:  # the database's answer stands: queued, as stored
            owner = None
        if owner is not None and owner.instance != cluster.instance:
            relayed = await request.app[FORWARDER].call(request, owner, b"")
            if relayed.status == 200:
                return relayed
    if wants_text(request):
        return web.Response(text=views.lookup_text(answer))
    return json_response(answer, pretty=True)


HISTORY_QUERY_KEYS = (
    "limit",
    "order",
    "cursor",
    "event",
    "from_sequence",
    "to_sequence",
    "since",
    "until",
    "outcome",
    "format",
)


async def history(request: web.Request) -> web.Response:
    name = tenant_name(request)
    query = history_query(request.query)
    page = await request.app[SERVICE].history(name, query)
    if wants_text(request):
        return web.Response(text=views.history_text(page))
    return json_response(page, pretty=True)


def history_query(params: Any) -> HistoryQuery:
    """`GET .../history`'s query string as a HistoryQuery; 400 for anything wrong."""
    unknown = sorted(set(params) - set(HISTORY_QUERY_KEYS))
    if unknown:
        raise BadRequest(
            f"unknown query parameter {unknown[0][:40]!r}; "
            f"the history takes {', '.join(HISTORY_QUERY_KEYS)}"
        )
    limit = params.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= 1000:
        raise BadRequest("limit must be an integer from 1 to 1000")
    order = params.get("order", "newest")
    if order not in ("newest", "oldest"):
        raise BadRequest('order must be "newest" (the default) or "oldest"')
    outcomes: frozenset[HistoryOutcome] | None = None
    if "outcome" in params:
        wanted = [o.strip() for o in params["outcome"].split(",")]
        wrong = [o for o in wanted if o not in HISTORY_OUTCOMES]
        if wrong or not wanted:
            raise BadRequest(
                f"outcome {wrong[0][:40] if wrong else ''!r} is not one of "
                f"{', '.join(HISTORY_OUTCOMES)} (several: comma-separated)"
            )
        outcomes = frozenset(o for o in HISTORY_OUTCOMES if o in wanted)
    event = params.get("event")
    if event is not None and not event:
        raise BadRequest("event must not be empty")
    query = HistoryQuery(
        limit=int(limit),
        oldest_first=order == "oldest",
        after=_sequence_param(params, "cursor"),
        event=event,
        from_sequence=_sequence_param(params, "from_sequence"),
        to_sequence=_sequence_param(params, "to_sequence"),
        since=_time_param(params.get("since"), "since"),
        until=_time_param(params.get("until"), "until"),
        outcomes=outcomes,
    )
    _check_ranges(query.from_sequence, query.to_sequence, query.since, query.until)
    return query


def _sequence_param(params: Any, key: str) -> int | None:
    text = params.get(key)
    if text is None:
        return None
    if not text.isdigit() or len(text) > 18:
        raise BadRequest(f"{key} must be a sequence number (a whole number, 0 or more)")
    return int(text)


def _check_ranges(
    first: int | None, last: int | None, since: float | None, until: float | None
) -> None:
    if first is not None and last is not None and first > last:
        raise BadRequest(f"from_sequence ({first}) is after to_sequence ({last})")
    if since is not None and until is not None and since >= until:
        raise BadRequest("since must be before until (since is inclusive, until exclusive)")


def _time_param(value: Any, key: str) -> float | None:
    """A time as RFC 3339 (2026-12-01T00:00:00Z, with its offset) or unix seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest(f"{key} must be an RFC 3339 time or unix seconds, not {value}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        number = _unix_or_rfc3339(text, key)
    else:
        raise BadRequest(f"{key} must be an RFC 3339 time or unix seconds")
    if not math.isfinite(number) or not 0 <= number < 1e11:
        raise BadRequest(f"{key} is out of range")
    return number


def _unix_or_rfc3339(text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{key} must be an RFC 3339 time (2026-12-01T09:00:00Z) or unix seconds, "
            f"got {text[:60]!r}"
        ) from None
    if when.tzinfo is None:
        raise BadRequest(
            f"{key} {text[:60]!r} has no time zone; end it with Z or an offset (+02:00)"
        )
    return when.timestamp()


REPLAY_KEYS = ("from_sequence", "to_sequence", "since", "until", "event", "dry_run", "replay_id")


async def replay(request: web.Request) -> web.Response:
    name = tenant_name(request)
    service = request.app[SERVICE]
    service.worker(name)  # 404 for an unknown tenant, before reading a body
    body = await read_body(request)
    try:
        raw = json.loads(body) if body.strip() else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    selection, dry_run, replay_id = replay_request(raw)
    answer = await service.replay(name, selection, dry_run=dry_run, replay_id=replay_id)
    return json_response(answer)


def replay_request(raw: Any) -> tuple[ReplaySelection, bool, str | None]:
    """A replay's JSON body: the selection, dry_run and replay_id; 400 for anything wrong."""
    example = '{"from_sequence": 1, "to_sequence": 500} or {"since": "2026-12-01T00:00:00Z"}'
    if not isinstance(raw, dict):
        raise BadRequest(f"send a JSON object naming what to replay, e.g. {example}")
    unknown = sorted(set(raw) - set(REPLAY_KEYS))
    if unknown:
        raise BadRequest(
            f"unknown key {unknown[0][:40]!r}; a replay takes {', '.join(REPLAY_KEYS)}"
        )
    sequences = []
    for key in ("from_sequence", "to_sequence"):
        value = raw.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62
        ):
            raise BadRequest(f"{key} must be a sequence number (a whole number, 0 or more)")
        sequences.append(value)
    since = _time_param(raw.get("since"), "since")
    until = _time_param(raw.get("until"), "until")
    if all(v is None for v in (*sequences, since, until)):
        raise BadRequest(
            f"name what to replay: from_sequence/to_sequence, or since (and until), e.g. {example}"
        )
    _check_ranges(sequences[0], sequences[1], since, until)
    event = raw.get("event")
    if event is not None and (not isinstance(event, str) or not 0 < len(event) <= 200):
        raise BadRequest("event must be an event type (a string of 1 to 200 characters)")
    dry_run = raw.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise BadRequest("dry_run must be true or false")
    replay_id = raw.get("replay_id")
    if replay_id is not None and (
        not isinstance(replay_id, str) or not 0 < len(replay_id) <= MAX_ID_LENGTH
    ):
        raise BadRequest(f"replay_id must be a string of 1 to {MAX_ID_LENGTH} characters")
    selection = ReplaySelection(
        from_sequence=sequences[0],
        to_sequence=sequences[1],
        since=since,
        until=until,
        event=event,
    )
    return selection, dry_run, replay_id
