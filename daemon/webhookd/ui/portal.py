"""Portal links: a signed URL that opens one tenant's page, for a limited time.

`/portal/TENANT?expires=UNIX&can_edit=0|1&sig=HEX`, where `sig` is HMAC-SHA256 under the
daemon's portal key (`[daemon] portal_key_file`) over the tenant, the expiry and whether the
link may edit. Changing any of them, or using the link after `expires`, fails the check: the
link holds no session, so it works inside another site's frame (no third-party cookie), and
its forms carry the same three fields. The daemon writes no access log, and its error log
names a request's path without the query, so the signature stays out of the logs.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from webhookd.config import DaemonConfig
from webhookd.status import iso

# Told apart from any other use of the key.
CONTEXT = b"webhookd-portal-v1"


@dataclass(frozen=True)
class Link:
    tenant: str
    expires: int
    signed_edit: bool  # what the link says (and its signature covers)
    sig: str
    allowed: bool = True  # whether the daemon still lets links edit (`portal_can_edit`)

    @property
    def can_edit(self) -> bool:
        return self.signed_edit and self.allowed

    @property
    def query(self) -> dict[str, str]:
        edit = "1" if self.signed_edit else "0"
        return {"expires": str(self.expires), "can_edit": edit, "sig": self.sig}

    def path(self) -> str:
        return f"/portal/{self.tenant}?{urlencode(self.query)}"


def signature(key: str, tenant: str, expires: int, can_edit: bool) -> str:
    edit = b"1" if can_edit else b"0"
    message = b"\n".join((CONTEXT, tenant.encode(), str(expires).encode(), edit))
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def make(daemon: DaemonConfig, tenant: str, ttl: float, now: float | None = None) -> Link:
    key = daemon.portal_key.reveal()
    assert key, "the caller checks that a portal key is configured"
    expires = int((time.time() if now is None else now) + ttl)
    can_edit = daemon.portal_can_edit
    return Link(tenant, expires, can_edit, signature(key, tenant, expires, can_edit))


def verify(daemon: DaemonConfig, tenant: str, fields: Any, now: float | None = None) -> Link | None:
    """The link in `fields` (a query or a form) if it is valid for `tenant` now, else None.
    `can_edit` holds only while the daemon still allows editing (`portal_can_edit`)."""
    key = daemon.portal_key.reveal()
    expires, can_edit, given = fields.get("expires"), fields.get("can_edit"), fields.get("sig")
    if not key or not isinstance(expires, str) or not isinstance(given, str):
        return None
    if not expires.isdigit() or len(expires) > 12 or can_edit not in ("0", "1"):
        return None
    wanted = signature(key, tenant, int(expires), can_edit == "1")
    if not hmac.compare_digest(given.encode(), wanted.encode()):
        return None
    if int(expires) <= (time.time() if now is None else now):
        return None
    return Link(tenant, int(expires), can_edit == "1", given, daemon.portal_can_edit)


def answer(link: Link, base: str) -> dict[str, Any]:
    """`POST /v1/tenants/{tenant}/portal`'s answer."""
    return {
        "tenant": link.tenant,
        "url": base + link.path(),
        "expires_at": iso(link.expires),
        "can_edit": link.can_edit,
    }


def base_url(daemon: DaemonConfig, request: web.BaseRequest) -> str:
    """Where links point: `portal_base_url`, else the address this request came to."""
    if daemon.portal_base_url:
        return daemon.portal_base_url
    return f"{request.scheme}://{request.host}"
