"""Controls sent on to the instance that delivers a tenant (several instances, one database).

A tenant's controls (retry, refresh, pause, resume, skip, requeue) act on its worker, and
its worker runs on the instance holding its lease. An instance asked about a tenant held by
another sends the request there, as it came (method, path, query, body, `Accept`), with this
API's own token and a header naming itself, and answers with the owner's answer as it is:
its status and body. A forwarded request is never forwarded again (the header is the loop
guard): if the lease moved meanwhile, the instance it reached says so (503 owner_changed)
rather than passing it on. An owner that does not answer within FORWARD_TIMEOUT_S is
`503 {"error": "owner_unreachable"}`; nothing was done then, or the caller cannot know.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from webhookd.records import Owner
from webhookd.responses import error_response

# Names the instance a request was forwarded by: a request bearing it is not forwarded again.
FORWARDED = "X-Webhookd-Forwarded-By"
# The instance that answered a forwarded request (for the operator reading the headers).
ANSWERED_BY = "X-Webhookd-Owner"
# A control call takes milliseconds where it runs; an owner this slow is as good as gone.
FORWARD_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0


def forwarded(request: web.BaseRequest) -> bool:
    return FORWARDED in request.headers


class Forwarder:
    """This instance's client for the others' APIs: one connection pool, closed with the app."""

    def __init__(self, instance: str, token: str) -> None:
        self.instance = instance
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=FORWARD_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S
                ),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, request: web.BaseRequest) -> dict[str, str]:
        headers = {FORWARDED: self.instance}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for name in ("Accept", "Content-Type"):
            if name in request.headers:
                headers[name] = request.headers[name]
        return headers

    async def call(
        self, request: web.BaseRequest, owner: Owner, body: bytes, *, path: str | None = None
    ) -> web.Response:
        """`request` sent to `owner`, its answer relayed as is (status, body, type). `path`:
        the API path to call there instead of the request's own (the pages at /ui/ call
        the owner's API for the control a form asked for)."""
        if not owner.api_url:
            return unreachable(owner, "it has published no API address (advertise_url)")
        url = owner.api_url + (path or request.raw_path)
        try:
            async with self._client().request(
                request.method,
                url,
                data=body or None,
                headers=self._headers(request),
                allow_redirects=False,
            ) as answer:
                payload = await answer.read()
                relayed = {ANSWERED_BY: owner.instance}
                if "Content-Type" in answer.headers:
                    relayed["Content-Type"] = answer.headers["Content-Type"]
                return web.Response(status=answer.status, body=payload, headers=relayed)
        except TimeoutError:
            return unreachable(owner, f"no answer within {FORWARD_TIMEOUT_S:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            return unreachable(owner, _reason(exc))

    async def ask(self, request: web.BaseRequest, owner: Owner) -> tuple[int, Any]:
        """`request` (without a body) sent to `owner`: its status and JSON answer, or
        (503, the reason) when it did not answer."""
        try:
            async with self._client().request(
                request.method,
                owner.api_url + request.raw_path,
                headers=self._headers(request),
                allow_redirects=False,
            ) as answer:
                return answer.status, await answer.json(content_type=None)
        except TimeoutError:
            return 503, f"no answer within {FORWARD_TIMEOUT_S:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return 503, _reason(exc)


def unreachable(owner: Owner, why: str) -> web.Response:
    return error_response(
        "owner_unreachable",
        f"instance {owner.instance} holds this tenant's lease, but its API "
        f"({owner.api_url or 'no address'}) did not answer: {why}; send again shortly "
        "(its lease moves to another instance if it is gone)",
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return str(exc) or type(exc).__name__
