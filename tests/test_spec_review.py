"""SPEC review: each test here shows one place where the daemon departs from SPEC.md (or
from the README where SPEC is silent). They failed on the code they were written against (2b2e4b3)
and pass since the commit that follows it."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, Receiver, StartDaemon, tenant, wait_for, write_config
from webhookd import config as config_mod

EVENT = "CHECK_COMPLETED"
TOKEN = "tok-5d1c7e0b42"


def assert_error(body: Any, code: str) -> None:
    assert isinstance(body, dict), body
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"], body


async def raw_request(daemon: Daemon, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send exact bytes (headers no HTTP client would build) and read the whole answer."""
    port = int(daemon.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


# -- tenant names ------------------------------------------------------------------------------


async def test_put_refuses_a_tenant_name_with_a_trailing_line_break(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """SPEC §5: "Tenant names: `[A-Za-z0-9_-]{1,64}`." SPEC §6: "Unknown or invalid tenant
    name: 404."

    `PUT /v1/tenants/newt%0A` is taken (201): the name check is `^...$` with `re.match`,
    and `$` also matches before a final newline. The tenant "newt\\n" is created live and
    `tenants.d/newt\\n.toml` is written; its header comment then breaks across two lines,
    so the next start or reload refuses the whole configuration ("not valid TOML").
    """
    daemon = await start_daemon(tenants={"main": tenant(receiver.url("/main"))})
    body = {"endpoint": receiver.url("/newt"), "secret": "s3cr3t", "events": [EVENT]}
    status, answer = await daemon.request("PUT", "/v1/tenants/newt%0A", json=body)
    directory = daemon.service.config.daemon.tenants_dir
    assert directory is not None
    written = sorted(os.listdir(directory)) if directory.exists() else []
    assert status == 404, (status, answer, written)
    assert_error(answer, "not_found")
    assert written == []
    assert "newt\n" not in daemon.service.config.tenants
    # The daemon can still start from its own configuration.
    config_mod.load(daemon.service.config.path)


def test_config_refuses_a_tenant_name_with_a_trailing_line_break(tmp_path: Path) -> None:
    """SPEC §5: "Tenant names: `[A-Za-z0-9_-]{1,64}`." and "Unknown keys, wrong types and
    bad values are errors that name the file (as given) and the key path ... and stop
    startup".

    `[tenants."acme\\n"]` loads without an error (and `webhookd check` prints OK), because
    `^[A-Za-z0-9_-]{1,64}$` matched with `re.match` lets a final newline through.
    """
    path = tmp_path / "config.toml"
    path.write_text(
        '[tenants."acme\\n"]\nendpoint = "https://hooks.acme.example/h"\n'
        'secret = "s3cr3t"\nevents = ["*"]\n'
    )
    with pytest.raises(config_mod.ConfigError) as caught:
        loaded = config_mod.load(path)
        pytest.fail(f"loaded tenants {list(loaded.tenants)!r}")
    assert any("tenants" in error for error in caught.value.errors), caught.value.errors


# -- the API token -----------------------------------------------------------------------------


async def test_a_non_utf8_authorization_header_is_401_not_500(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """SPEC §6: "With `api_token` set, every path but `/healthz` needs `Authorization: Bearer
    <api_token>` (401 otherwise). Errors are JSON `{"error": "<code>", "detail": "<human
    sentence>"}`." README (Delivery guarantees): "any body, header or config gets a 4xx JSON
    error ..., never a 500".

    An Authorization header holding a byte that is not UTF-8 answers 500 "internal": the
    token check calls `.encode()` on aiohttp's surrogate-escaped header string, which raises
    UnicodeEncodeError.
    """
    path = write_config(
        tmp_path, {"acme": tenant(receiver.url("/acme"))}, daemon={"api_token": TOKEN}
    )
    daemon = await start_daemon(path)
    for route in (b"/v1/status", b"/v1/tenants/acme/status"):
        request = (
            b"GET " + route + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff" + TOKEN.encode() + b"\r\n\r\n"
        )
        status, headers, body = await raw_request(daemon, request)
        assert status == 401, (route, status, body)
        assert headers.get("content-type", "").startswith("application/json"), headers
        assert_error(json.loads(body), "unauthorized")


# -- the tenant API ----------------------------------------------------------------------------


async def test_a_tenant_get_can_be_edited_and_put_back(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """README (Configuration): "Responses show secrets as `"***"`; sending `"***"` back keeps
    the stored secret, so a GET can be edited and PUT back."

    The GET answer carries `tenant`, `source` and `delivery`, and PUT refuses each of them
    as an unknown key (400 invalid_tenant), so a GET edited and PUT back never goes through;
    a script has to know to strip those three keys first.
    """
    daemon = await start_daemon(tenants={})
    body = {"endpoint": receiver.url("/one"), "secret": "first-secret", "events": [EVENT]}
    status, _ = await daemon.request("PUT", "/v1/tenants/acme", json=body)
    assert status == 201

    status, shown = await daemon.request("GET", "/v1/tenants/acme")
    assert status == 200, shown
    edited = {**shown, "endpoint": receiver.url("/two")}
    status, answer = await daemon.request("PUT", "/v1/tenants/acme", json=edited)
    assert status == 200, answer
    assert answer["endpoint"] == receiver.url("/two")
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: receiver.sequences("/two") == [1], timeout=5)
    assert receiver.at("/two")[0].headers["Authorization"] == "Bearer first-secret"
