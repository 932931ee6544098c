"""The routes of /ui/ (operator: sign-in, overview, tenant page) and /portal/ (one tenant,
through a signed link), and `POST /v1/tenants/{tenant}/portal` that makes such links."""

from __future__ import annotations

import calendar
import hmac
import json
import math
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp_jinja2
import jinja2
import orjson
from aiohttp import web

from webhookd import config as config_mod
from webhookd import logs, views
from webhookd.api import FORWARDER, SERVICE, BadRequest, read_body, valid_tenant
from webhookd.config import TENANT_NAME, TenantConfig
from webhookd.records import HistoryQuery
from webhookd.responses import json_response
from webhookd.service import InvalidTenant, Service, ServiceError
from webhookd.status import QUEUE_STATES
from webhookd.ui import portal
from webhookd.ui.sessions import Session, Sessions, clear_cookie, csrf_ok, set_cookie
from webhookd.ui.throttle import SignInThrottle, client_key

log = logs.get_logger("webhookd.ui")

SESSIONS = web.AppKey("ui_sessions", Sessions)
SIGN_IN_THROTTLE = web.AppKey("ui_sign_in_throttle", SignInThrottle)
PAGE_SIZE = 50
# How often the live parts of a page reload themselves (seconds; the script reads it).
REFRESH_S = 5
HISTORY_SHOWN = 20
STATE_WORDS = {
    "empty": "Empty",
    "waiting": "Waiting",
    "stalled": "Stalled",
    "paused": "Paused",
    "disabled": "Disabled",
    "orphaned": "Orphaned",
}
# What each control did, in a sentence for the page that follows it.
CONTROLS = ("retry", "refresh", "pause", "resume", "skip", "requeue")
PORTAL_CONTROLS = ("retry", "refresh")
PORTAL_NOTICES = {
    "retrying": "Retrying now.",
    "idle": "Nothing to retry: no webhook is waiting.",
    "refreshed": "Recent failures cleared.",
    "saved": "Saved.",
}
NONE = "'none'"
PORTAL_READ_ONLY = "This configuration is managed by your provider; ask them to change it."
STATIC = {"ui.js": "text/javascript", "ui.css": "text/css"}


class PortalNotConfigured(ServiceError):
    code = "portal_not_configured"


class Forbidden(ServiceError):
    code = "forbidden"


class ReadOnly(ServiceError):
    code = "conflict"


class TooManySignIns(ServiceError):
    """Too many wrong tokens from one address: answered as a page, with Retry-After."""

    code = "too_many_sign_ins"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SessionHandler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application) -> None:
    service = app[SERVICE]
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("webhookd.ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        default_helpers=False,
        filters={"ago": since, "until": until, "data": data_text, "word": state_word},
    )
    app[SESSIONS] = Sessions(service.config.daemon.ui_session_ttl)
    app[SIGN_IN_THROTTLE] = SignInThrottle()
    app.on_response_prepare.append(security_headers)
    static = {
        name: (resources.files("webhookd.ui").joinpath("static", name).read_bytes(), kind)
        for name, kind in STATIC.items()
    }

    async def serve_static(request: web.Request) -> web.Response:
        found = static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        return web.Response(
            body=found[0], content_type=found[1], headers={"Cache-Control": "max-age=300"}
        )

    app.add_routes(
        [
            web.get("/ui", to_overview),
            web.get("/ui/", operator(overview)),
            web.get("/ui/signin", signin_page),
            web.post("/ui/signin", signin),
            web.post("/ui/signout", operator(signout)),
            web.get("/ui/static/{name}", serve_static),
            web.get("/ui/tenants/{tenant}", operator(tenant_page)),
            web.post("/ui/tenants/{tenant}/config", operator(save_config)),
            web.post("/ui/tenants/{tenant}/{action}", operator(control_form)),
            web.get("/portal/{tenant}", portal_page),
            web.post("/portal/{tenant}/config", portal_save),
            web.post("/portal/{tenant}/{action}", portal_control),
            web.post("/v1/tenants/{tenant}/portal", make_portal_link),
        ]
    )


# -- headers, pages, errors ------------------------------------------------------------------


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every page (and error) under /ui/ and /portal/: a strict CSP (our own script and
    style only), no sniffing, no referrer (a portal link's signature stays in its page),
    no caching, and who may frame it: nobody for /ui/, the configured origins for a portal."""
    path = request.path
    if not (path == "/ui" or path.startswith(("/ui/", "/portal/"))):
        return
    if path.startswith("/portal/"):
        ancestors = " ".join(request.app[SERVICE].config.daemon.portal_frame_ancestors)
    else:
        ancestors = ""
        response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; "
        f"frame-ancestors {ancestors or NONE}"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    if not path.startswith("/ui/static/"):
        response.headers["Cache-Control"] = "no-store"


def render(
    request: web.Request, template: str, context: dict[str, Any], status: int = 200
) -> web.Response:
    context.setdefault("portal", False)
    context.setdefault("session", None)
    context.setdefault("refresh", 0)
    context.setdefault("signed_in", False)
    context.setdefault("notice", "")
    return aiohttp_jinja2.render_template(template, request, context, status=status)


def error_page(
    request: web.Request, status: int, title: str, detail: str, *, portal: bool = False
) -> web.Response:
    """An error as a page; a portal's (`portal`) links nowhere, not even to /ui/."""
    context = {"title": title, "detail": detail, "portal": portal}
    return render(request, "error.html", context, status)


def forbidden(request: web.Request, detail: str) -> web.Response:
    return error_page(request, 403, "Forbidden", detail)


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def tenant_of(request: web.Request) -> str:
    name = request.match_info["tenant"]
    if not TENANT_NAME.fullmatch(name):
        raise Forbidden("no such tenant")
    return name


async def to_overview(request: web.Request) -> web.Response:
    return redirect("/ui/")


# -- the operator's sign-in ------------------------------------------------------------------


def operator(handler: SessionHandler) -> Handler:
    """An operator page: signed in (with api_token set), or on a session of its own (none
    set: as open as the API, but its forms still carry a CSRF token). A POST without the
    session's CSRF token gets the 403 page, as does any POST without a session."""

    async def run(request: web.Request) -> web.StreamResponse:
        service = request.app[SERVICE]
        sessions = request.app[SESSIONS]
        now = time.time()
        session = sessions.get(request, now)
        token_set = bool(service.config.daemon.api_token)
        fresh = None
        if session is None or (token_set and not session.signed_in):
            if request.method == "POST":
                return forbidden(request, "Your session has ended: sign in again.")
            if token_set:
                return redirect("/ui/signin")
            session = fresh = sessions.new(now, signed_in=False)
        if request.method == "POST":
            form = await request.post()
            if not csrf_ok(session, form.get("csrf")):
                return forbidden(
                    request, "The form was not sent from this page (its CSRF token is wrong)."
                )
        try:
            response = await handler(request, session)
        except ServiceError as exc:
            response = error_page(request, exc.status, "Not done", exc.detail)
        if fresh is not None:
            set_cookie(response, request, fresh, sessions.ttl)
        return response

    return run


async def signin_page(request: web.Request, *, wrong: bool = False) -> web.Response:
    """Asks for the API token once. A pre-session carries the form's CSRF token, so a
    foreign page cannot sign a browser in either."""
    service = request.app[SERVICE]
    if not service.config.daemon.api_token:
        return redirect("/ui/")
    sessions = request.app[SESSIONS]
    session = sessions.get(request, time.time())
    if session is not None and session.signed_in:
        return redirect("/ui/")
    fresh = session is None
    if session is None:
        session = sessions.new(time.time(), signed_in=False)
    response = render(
        request,
        "signin.html",
        {"title": "Sign in", "session": session, "wrong": wrong},
        401 if wrong else 200,
    )
    if fresh:
        set_cookie(response, request, session, sessions.ttl)
    return response


async def signin(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    sessions = request.app[SESSIONS]
    throttle = request.app[SIGN_IN_THROTTLE]
    expected = service.config.daemon.api_token.reveal()
    if not expected:
        return redirect("/ui/")
    # A locked address learns nothing, not even whether the token it sent is the right one;
    # its body is not even read.
    locked = throttle.locked_for(request.remote)
    if locked:
        return locked_page(request, locked)
    session = sessions.get(request, time.time())
    form = await request.post()
    # Again once the body is in: requests sent together all passed the check above while
    # their bodies arrived, and each would get its guess. From here to the count below
    # nothing awaits, so the 10th wrong token locks out every request behind it.
    locked = throttle.locked_for(request.remote)
    if locked:
        return locked_page(request, locked)
    if not csrf_ok(session, form.get("csrf")):
        return forbidden(request, "The sign-in form was not sent from this page; load it again.")
    assert session is not None
    given = form.get("token")
    if not isinstance(given, str) or not hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), expected.encode()
    ):
        # Not logged one by one (a guesser would flood the log): only the lock is.
        lock = throttle.wrong(request.remote)
        if lock:
            log.warning("ui_signin_locked", remote=client_key(request.remote), lock_s=lock)
        return await signin_page(request, wrong=True)
    throttle.right(request.remote)
    sessions.end(session)  # a new id once signed in: a planted cookie does not carry over
    signed = sessions.new(time.time(), signed_in=True)
    log.info("ui_signed_in", remote=request.remote)
    response = redirect("/ui/")
    set_cookie(response, request, signed, sessions.ttl)
    return response


def locked_page(request: web.Request, seconds: int) -> web.Response:
    """The 429 for an address locked out: when to try again, in seconds (Retry-After) and
    as a time of day on the page."""
    throttle = request.app[SIGN_IN_THROTTLE]
    at = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + seconds))
    context = {
        "title": "Too many wrong tokens",
        "limit": throttle.limit,
        "window": views.counted(round(throttle.window), "second"),
        "wait": views.counted(seconds, "second"),
        "at": at,
    }
    response = render(request, "signin_locked.html", context, TooManySignIns("").status)
    response.headers["Retry-After"] = str(seconds)
    return response


async def signout(request: web.Request, session: Session) -> web.StreamResponse:
    request.app[SESSIONS].end(session)
    signed_out = request.app[SERVICE].config.daemon.api_token
    response = redirect("/ui/signin" if signed_out else "/ui/")
    clear_cookie(response)
    return response


# -- the overview ------------------------------------------------------------------------------


async def overview(request: web.Request, session: Session) -> web.Response:
    """One line per tenant: stalled first, then by name; searched, filtered, paged."""
    status = await request.app[SERVICE].status_view()
    search = request.query.get("q", "").strip()[:64]
    state = request.query.get("state", "")
    if state not in QUEUE_STATES:
        state = ""
    needle = search.lower()
    shown = [
        t
        for t in status["tenants"]
        if (not needle or needle in t["tenant"].lower()) and (not state or t["queue"] == state)
    ]
    shown.sort(key=lambda t: t["queue"] != "stalled")  # stable: by name within each
    pages = max(1, math.ceil(len(shown) / PAGE_SIZE))
    text = request.query.get("page", "1")
    page = min(int(text), pages) if text.isdigit() and int(text) >= 1 else 1
    rows = shown[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    now = time.time()
    for row in rows:
        row["last_error"] = views.last_error(row, now)

    def link(to: int) -> str:
        query = {k: v for k, v in (("q", search), ("state", state)) if v}
        return "/ui/?" + urlencode({**query, "page": str(to)})

    return render(
        request,
        "overview.html",
        {
            "title": "Webhook status",
            "session": session,
            "signed_in": session.signed_in,
            "notice": session.take_notice(),
            "totals": status["totals"],
            "rows": rows,
            "matched": len(shown),
            "search": search,
            "state": state,
            "states": QUEUE_STATES,
            "page": page,
            "pages": pages,
            "previous": link(page - 1) if page > 1 else "",
            "next": link(page + 1) if page < pages else "",
            "refresh": REFRESH_S,
        },
    )


# -- a tenant's page ---------------------------------------------------------------------------


async def tenant_page(request: web.Request, session: Session) -> web.Response:
    name = tenant_of(request)
    return await tenant_view(request, name, session=session)


async def tenant_view(
    request: web.Request,
    name: str,
    *,
    session: Session | None = None,
    link: portal.Link | None = None,
    form: dict[str, Any] | None = None,
    errors: dict[str, list[str]] | None = None,
    notice: str = "",
) -> web.Response:
    """The tenant's status queue, its controls and its Webhook config form: for the
    operator (`session`) everything, for a portal `link` the status queue with Retry and
    Refresh, and the config form when the link may edit."""
    service = request.app[SERVICE]
    status = await service.tenant_status_view(name)
    tenant = service.config.tenants.get(name)
    operator_view = link is None
    context: dict[str, Any] = {
        "title": name,
        "t": status,
        "session": session,
        "signed_in": session is not None and session.signed_in,
        "portal": not operator_view,
        "link": link,
        "notice": notice or (session.take_notice() if session is not None else ""),
        "base": f"/ui/tenants/{name}" if operator_view else f"/portal/{name}",
        "refresh": REFRESH_S,
        "config": config_view(service, tenant, form),
        "errors": errors or {},
        "editable": tenant is not None
        and tenant.from_api
        and (operator_view or (link is not None and link.can_edit)),
        "show_config": operator_view or (link is not None and link.can_edit),
        # A customer is not told where the operator's files are.
        "read_only_reason": read_only_reason(service, tenant)
        if operator_view
        else ("" if tenant is None or tenant.from_api else PORTAL_READ_ONLY),
        "status": 400 if errors else 200,
    }
    if operator_view:
        context["parked"] = await service.parked(name)
        context["history"], context["history_error"] = await recent_history(service, name)
        lookup_id = request.query.get("id", "").strip()
        context["lookup_id"] = lookup_id
        context["lookup"], context["lookup_error"] = await lookup(request, name, lookup_id)
    return render(request, "tenant.html", context, context["status"])


async def recent_history(service: Service, name: str) -> tuple[list[dict[str, Any]], str]:
    try:
        page = await service.history(name, HistoryQuery(limit=HISTORY_SHOWN))
    except ServiceError as exc:
        return [], exc.detail
    records: list[dict[str, Any]] = page["records"]
    return records, ""


async def lookup(request: web.Request, name: str, webhook_id: str) -> tuple[Any, str]:
    """Where webhook `webhook_id` is, as `GET .../webhooks/{id}` answers (a queued one asked
    of the instance delivering it, as the API does)."""
    if not webhook_id:
        return None, ""
    service = request.app[SERVICE]
    try:
        answer = await service.lookup(name, webhook_id[:256])
        cluster = service.cluster
        if answer["state"] == "queued" and cluster is not None and not cluster.holds(name):
            path = f"/v1/tenants/{name}/webhooks/{quote(webhook_id, safe='')}"
            status, relayed = await owner_call(request, name, "GET", path)
            if status == 200 and isinstance(relayed, dict):
                answer = relayed
    except ServiceError as exc:
        return None, exc.detail
    return answer, ""


def read_only_reason(service: Service, tenant: TenantConfig | None) -> str:
    if tenant is None:
        return "This tenant is no longer configured; its queue is shown until it is empty."
    if not tenant.from_api:
        return (
            f"This tenant is defined in the main configuration file ({service.config.path}); "
            "change it there and reload the daemon."
        )
    return ""


def config_view(
    service: Service, tenant: TenantConfig | None, form: dict[str, Any] | None
) -> dict[str, Any]:
    """The Webhook config form's values: the tenant's, or what was just sent (a secret is
    never shown: only whether one is kept)."""
    catalogue = sorted(service.config.catalogue.current)
    if tenant is None:
        return {
            "events": catalogue,
            "enabled": False,
            "batching": False,
            "endpoint": "",
            "subscribed": [],
            "secret_kept": "",
            "all_events": False,
        }
    if tenant.secret_ref.kind == "secret":
        kept = "a secret is set; leave the field empty to keep it"
    else:
        kept = f"the secret comes from {tenant.secret_ref.kind} ({tenant.secret_ref.where})"
    values = form or {
        "enabled": tenant.enabled,
        "batching": tenant.batching,
        "endpoint": tenant.endpoint,
        "subscribed": list(tenant.events),
    }
    events = list(catalogue) + [e for e in values["subscribed"] if e not in catalogue and e != "*"]
    return {
        **values,
        "events": events,
        "all_events": "*" in values["subscribed"],
        "secret_kept": kept,
    }


# -- controls ------------------------------------------------------------------------------------


async def owner_call(request: web.Request, name: str, method: str, path: str) -> tuple[int, Any]:
    """`method path` of the API, run by the instance that holds tenant `name` (with
    several instances): (status, JSON answer). (0, None) when this instance holds it."""
    service = request.app[SERVICE]
    if service.cluster is None:
        return 0, None
    owner = await service.placement(name)
    if owner is None:
        return 0, None
    relayed = await request.app[FORWARDER].call(request, owner, b"", path=path)
    assert relayed.body is not None
    try:
        body = json.loads(bytes(relayed.body))  # type: ignore[arg-type]
    except ValueError:
        body = None
    return relayed.status, body


class Relayed(ServiceError):
    """An owner's refusal, as it answered."""

    def __init__(self, status: int, body: Any) -> None:
        detail = body.get("detail") if isinstance(body, dict) else None
        super().__init__(str(detail or f"the instance holding this tenant answered {status}"))
        self.relayed = status

    @property
    def status(self) -> int:
        """The owner's status, shown on the page (this error is never answered as JSON)."""
        return self.relayed


async def control(request: web.Request, name: str, action: str, webhook_id: str = "") -> Any:
    """What `POST /v1/tenants/{name}/{action}` does, done here or by the tenant's owner."""
    service = request.app[SERVICE]
    path = f"/v1/tenants/{name}/{action}"
    if action == "requeue":
        path = f"/v1/tenants/{name}/parked/{quote(webhook_id, safe='')}/requeue"
    status, body = await owner_call(request, name, "POST", path)
    if status:
        if status >= 400:
            raise Relayed(status, body)
        return body
    if action == "retry":
        return service.retry(name)
    if action == "refresh":
        return await service.refresh(name)
    if action in ("pause", "resume"):
        return await service.set_paused(name, action == "pause")
    if action == "skip":
        return await service.skip(name)
    return await service.requeue(name, webhook_id)


def done(action: str, answer: dict[str, Any]) -> str:
    """A control's answer as a sentence."""
    if action == "retry":
        if answer["retrying"]:
            return f"Retrying now ({answer['waiting']} waiting)."
        return f"Nothing to retry (the queue is {answer['queue']})."
    if action == "refresh":
        return f"Cleared {views.counted(answer['cleared'], 'recent failure')}."
    if action == "pause":
        return "Paused: nothing is delivered until you resume; new webhooks still queue."
    if action == "resume":
        return "Resumed."
    if action == "skip":
        parked = answer["parked"]
        return f"Parked the head webhook (id {parked['id']}, sequence {parked['sequence']})."
    return f"Requeued id {answer['id']} as sequence {answer['sequence']}."


async def control_form(request: web.Request, session: Session) -> web.StreamResponse:
    name = tenant_of(request)
    action = request.match_info["action"]
    if action not in CONTROLS:
        raise web.HTTPNotFound()
    form = await request.post()
    request.app[SERVICE].worker(name)  # 404 for an unknown tenant
    if action == "skip" and form.get("confirm") != "yes":
        return render(
            request,
            "confirm.html",
            {
                "title": f"Skip {name}'s head webhook?",
                "name": name,
                "session": session,
                "signed_in": session.signed_in,
            },
        )
    webhook_id = str(form.get("id", ""))
    try:
        session.notice = done(action, await control(request, name, action, webhook_id))
    except ServiceError as exc:
        session.notice = f"Not done: {exc.detail}"
    return redirect(f"/ui/tenants/{name}")


# -- the Webhook config form -----------------------------------------------------------------


def submitted(form: Any) -> dict[str, Any]:
    events = [e for e in form.getall("events", []) if isinstance(e, str)]
    if form.get("all_events") == "on":
        events = ["*"]
    return {
        "enabled": form.get("enabled") == "on",
        "batching": form.get("batching") == "on",
        "endpoint": str(form.get("endpoint", "")).strip(),
        "subscribed": events,
    }


def field_errors(name: str, errors: list[str]) -> dict[str, list[str]]:
    """The tenant API's error sentences ("tenant acme: endpoint: ...") by form field;
    those of no field of the form under "form"."""
    fields = {"enabled", "batching", "endpoint", "secret", "events"}
    found: dict[str, list[str]] = {}
    for error in errors:
        text = error.removeprefix(f"tenant {name}: ")
        key, _, message = text.partition(": ")
        field = key.split(".")[0].split("[")[0]
        if message and field in fields:
            found.setdefault(field, []).append(message)
        else:
            found.setdefault("form", []).append(text)
    return found


async def save(request: web.Request, name: str, form: Any) -> dict[str, list[str]] | None:
    """Validate and save the form through the tenant API's own operation; the errors by
    field when it is refused (then nothing was changed)."""
    service = request.app[SERVICE]
    tenant = service.tenant_config(name)
    if not tenant.from_api:
        raise ReadOnly(read_only_reason(service, tenant))
    values = submitted(form)
    raw = config_mod.tenant_table(tenant, redact=True)
    raw.update(
        enabled=values["enabled"],
        batching=values["batching"],
        endpoint=values["endpoint"],
        events=values["subscribed"],
    )
    secret = form.get("secret", "")
    if isinstance(secret, str) and secret:
        for key in ("secret_file", "secret_env"):
            raw.pop(key, None)
        raw["secret"] = secret
    try:
        await service.put_tenant(name, raw)
    except InvalidTenant as exc:
        return field_errors(name, exc.errors)
    return None


async def save_config(request: web.Request, session: Session) -> web.Response:
    name = tenant_of(request)
    form = await request.post()
    errors = await save(request, name, form)
    if errors:
        return await tenant_view(
            request, name, session=session, form=submitted(form), errors=errors
        )
    session.notice = "Saved."
    return redirect(f"/ui/tenants/{name}")


# -- the portal ----------------------------------------------------------------------------------


def portal_link(request: web.Request, fields: Any) -> portal.Link | None:
    name = request.match_info["tenant"]
    daemon = request.app[SERVICE].config.daemon
    if not TENANT_NAME.fullmatch(name):
        return None
    link = portal.verify(daemon, name, fields)
    if link is None or name not in request.app[SERVICE].config.tenants:
        return None
    return link


def invalid_link(request: web.Request) -> web.Response:
    return error_page(
        request,
        403,
        "This link is not valid",
        "The link has expired or was changed. Ask for a new one.",
        portal=True,
    )


async def portal_page(request: web.Request) -> web.Response:
    link = portal_link(request, request.query)
    if link is None:
        return invalid_link(request)
    notice = PORTAL_NOTICES.get(request.query.get("notice", ""), "")
    try:
        return await tenant_view(request, link.tenant, link=link, notice=notice)
    except ServiceError as exc:
        return error_page(request, exc.status, "Not available", exc.detail, portal=True)


async def portal_control(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    link = portal_link(request, form)
    if link is None:
        return invalid_link(request)
    action = request.match_info["action"]
    if action not in PORTAL_CONTROLS:
        return invalid_link(request)
    try:
        answer = await control(request, link.tenant, action)
    except ServiceError as exc:
        return error_page(request, exc.status, "Not done", exc.detail, portal=True)
    notice = "refreshed"
    if action == "retry":
        notice = "retrying" if answer["retrying"] else "idle"
    return redirect(f"{link.path()}&notice={notice}")


async def portal_save(request: web.Request) -> web.Response:
    form = await request.post()
    link = portal_link(request, form)
    if link is None or not link.can_edit:
        return invalid_link(request)
    try:
        errors = await save(request, link.tenant, form)
        if errors:
            return await tenant_view(
                request, link.tenant, link=link, form=submitted(form), errors=errors
            )
    except ServiceError as exc:
        return error_page(request, exc.status, "Not saved", exc.detail, portal=True)
    return redirect(f"{link.path()}&notice=saved")


async def make_portal_link(request: web.Request) -> web.Response:
    """`POST /v1/tenants/{tenant}/portal` (API token): a signed link to the tenant's portal
    page. Body (optional): `{"ttl": "30m"}` (a duration, 60 s to 30 days; default
    `portal_link_ttl`)."""
    service = request.app[SERVICE]
    name = valid_tenant(request.match_info["tenant"])
    service.tenant_config(name)  # 404
    daemon = service.config.daemon
    if not daemon.portal_key:
        raise PortalNotConfigured(
            f"portal links need a key: set portal_key_file in [daemon] of {service.config.path} "
            "to a file holding at least 32 random characters (head -c 32 /dev/urandom | "
            "base64 > portal.key), then restart webhookd"
        )
    body = await read_body(request)
    ttl = daemon.portal_link_ttl
    if body.strip():
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or set(raw) - {"ttl"}:
            raise BadRequest('send {} or {"ttl": "30m"} (a duration, 60 s to 30 days)')
        if "ttl" in raw:
            try:
                ttl = config_mod._duration(60, 30 * 86400)(raw["ttl"])
            except ValueError as exc:
                raise BadRequest(f"ttl: {exc}") from None
    link = portal.make(daemon, name, ttl)
    log.info("portal_link_made", tenant=name, expires=link.expires, can_edit=link.can_edit)
    return json_response(portal.answer(link, portal.base_url(daemon, request)))


# -- filters -------------------------------------------------------------------------------------


def _stamp(when: str | None) -> float | None:
    if not when:
        return None
    return float(calendar.timegm(time.strptime(when, "%Y-%m-%dT%H:%M:%SZ")))


def since(when: str | None) -> str:
    stamp = _stamp(when)
    return "never" if stamp is None else views.ago(time.time() - stamp) + " ago"


def until(when: str | None) -> str:
    stamp = _stamp(when)
    if stamp is None:
        return "-"
    left = stamp - time.time()
    return "now" if left <= 0 else "in " + views.ago(left)


def data_text(value: Any) -> str:
    if value is None:
        return ""
    text = orjson.dumps(value).decode()
    return text if len(text) <= 2000 else text[:2000] + "…"


def state_word(queue: str) -> str:
    return STATE_WORDS.get(queue, queue)
