"""Sign-in sessions for the pages at /ui/: kept in memory, one table per process.

A session is a random id in a cookie (HttpOnly, SameSite=Strict, Secure over TLS) that
names a server-side entry with its expiry and its CSRF token. Nothing about the API token
is kept: signing in proves it once. A restart forgets every session (everyone signs in
again); with several instances each keeps its own (sign in on the one you browse).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from aiohttp import web

COOKIE = "webhookd_ui"
# Sessions kept at most: past it the oldest go first (a flood of sign-ins cannot grow
# memory without bound; without a token, every new browser gets one).
MAX_SESSIONS = 10_000


@dataclass
class Session:
    id: str
    csrf: str
    expires: float
    signed_in: bool  # False: an anonymous session (no api_token), for the CSRF token only
    notice: str = ""  # one message for the next page (what the last form did)

    def take_notice(self) -> str:
        notice, self.notice = self.notice, ""
        return notice


class Sessions:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._by_id: dict[str, Session] = {}

    def new(self, now: float, *, signed_in: bool) -> Session:
        self._expire(now)
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]  # dicts keep insertion order
        session = Session(
            secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self.ttl, signed_in
        )
        self._by_id[session.id] = session
        return session

    def get(self, request: web.BaseRequest, now: float) -> Session | None:
        session = self._by_id.get(request.cookies.get(COOKIE, ""))
        if session is None:
            return None
        if session.expires <= now:
            del self._by_id[session.id]
            return None
        return session

    def end(self, session: Session) -> None:
        self._by_id.pop(session.id, None)

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._by_id.items() if s.expires <= now]:
            del self._by_id[key]

    def __len__(self) -> int:
        return len(self._by_id)


def csrf_ok(session: Session | None, given: object) -> bool:
    """The form's CSRF token is the session's (compared in constant time)."""
    if session is None or not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode(), session.csrf.encode())


def set_cookie(
    response: web.StreamResponse, request: web.BaseRequest, session: Session, ttl: float
) -> None:
    response.set_cookie(
        COOKIE,
        session.id,
        max_age=max(1, int(ttl)),
        path="/ui/",
        httponly=True,
        samesite="Strict",
        secure=over_tls(request),
    )


def over_tls(request: web.BaseRequest) -> bool:
    """The browser reached us over TLS: directly, or through a proxy that ended TLS and says
    so (X-Forwarded-Proto: https). Trusting the header costs nothing: it can only make the
    cookie stricter (a Secure cookie is never sent over plain HTTP)."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def clear_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/ui/")
