"""The tenant API: the product's "Webhook config" page, over HTTP. Secrets are masked."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from webhookd import config as config_mod
from webhookd.api import SERVICE, BadRequest, read_body, tenant_name
from webhookd.config import TenantConfig
from webhookd.responses import json_response


def tenant_view(tenant: TenantConfig) -> dict[str, Any]:
    return {
        "tenant": tenant.name,
        "source": "api" if tenant.from_api else "config",
        **config_mod.tenant_table(tenant, redact=True),
        "delivery": {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in vars(tenant.delivery).items()
        },
    }


async def list_tenants(request: web.Request) -> web.Response:
    tenants = request.app[SERVICE].config.tenants.values()
    return json_response({"tenants": [tenant_view(t) for t in tenants]}, pretty=True)


async def get_tenant(request: web.Request) -> web.Response:
    tenant = request.app[SERVICE].tenant_config(tenant_name(request))
    return json_response(tenant_view(tenant), pretty=True)


async def put_tenant(request: web.Request) -> web.Response:
    name = tenant_name(request)
    try:
        raw = orjson.loads(await read_body(request))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BadRequest("expected a JSON object of tenant keys (as in a [tenants.NAME] table)")
    created, tenant = await request.app[SERVICE].put_tenant(name, raw)
    return json_response(tenant_view(tenant), 201 if created else 200, pretty=True)


async def delete_tenant(request: web.Request) -> web.Response:
    discard = request.query.get("discard", "false").lower() in ("1", "true", "yes")
    answer = await request.app[SERVICE].delete_tenant(tenant_name(request), discard=discard)
    return json_response(answer)


def add_routes(app: web.Application) -> None:
    app.add_routes(
        [
            web.get("/v1/tenants", list_tenants),
            web.get("/v1/tenants/{tenant}", get_tenant),
            web.put("/v1/tenants/{tenant}", put_tenant),
            web.delete("/v1/tenants/{tenant}", delete_tenant),
        ]
    )
