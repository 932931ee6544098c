"""Every error code the API can answer is registered (daemon/webhookd/errors.py), documented
in docs/errors.md and in docs/openapi.yaml with the status that carries it, and the error
paths answer their codes to real requests.

The codes are collected from the code itself: every ServiceError subclass, every literal
code handed to error_response, every code written as raw bytes, the status → code table.
error_response looks the status up in the registry, so a code missing there cannot reach a
client (it would be a KeyError: this test, or the 500 it turns into, says so).
"""

from __future__ import annotations

import ast
import asyncio
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Daemon, Receiver, StartDaemon, tenant, wait_for
from webhookd import api, errors, forward, ingest, listener, service, tenants_api
from webhookd.errors import CODES
from webhookd.ids import generated_id, id_tag
from webhookd.ui.pages import SIGN_IN_THROTTLE

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "daemon" / "webhookd"
ERRORS_MD = ROOT / "docs" / "errors.md"
OPENAPI = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text(encoding="utf-8"))
TOKEN = "errors-token"

# Imported for their ServiceError subclasses (the collection below walks the subclasses).
MODULES = (api, forward, ingest, listener, service, tenants_api)


# -- collected from the code ------------------------------------------------------------------


def subclasses(cls: type[service.ServiceError]) -> Iterator[type[service.ServiceError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


def literal_codes() -> set[str]:
    """Codes written in the daemon's source: error_response("code", ...) calls, and JSON
    error bodies written out as text or bytes ({"error":"code", ...})."""
    found: set[str] = set()
    for path in SOURCES.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "error_response"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.add(node.args[0].value)
        found.update(re.findall(r'"error":\s*"(\w+)"', text))
    return found


def test_every_code_the_daemon_names_is_registered_with_one_status() -> None:
    classes = {cls.__name__: cls.code for cls in subclasses(service.ServiceError)}
    assert len(classes) >= 14, classes  # the walk found them all (a sanity floor)
    unregistered = {name: code for name, code in classes.items() if code not in CODES}
    assert unregistered == {}
    assert literal_codes() - set(CODES) == set()
    for status, code in errors.BY_STATUS.items():
        assert CODES[code].status == status, code
    for code, registered in CODES.items():
        if registered.retry_after is not None:
            assert registered.status in (429, 503), code


def test_an_unregistered_code_cannot_be_answered() -> None:
    from webhookd.responses import error_response

    with pytest.raises(KeyError):
        error_response("made_up_code", "no such code is registered")


# -- documented ----------------------------------------------------------------------------------


def errors_md_table() -> dict[str, int]:
    rows = re.findall(r"^\| `(\w+)` \| (\d{3}) \|", ERRORS_MD.read_text(encoding="utf-8"), re.M)
    table = dict((code, int(status)) for code, status in rows)
    assert len(table) == len(rows), "a code is listed twice in docs/errors.md"
    return table


def test_every_code_is_in_errors_md_with_its_status() -> None:
    assert errors_md_table() == {code: e.status for code, e in CODES.items()}


def resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        target: Any = OPENAPI
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def error_enum(response: Any) -> list[str]:
    """The `error` codes a documented error response names (allOf of Error and an enum)."""
    schema = resolve(response).get("content", {}).get("application/json", {}).get("schema", {})
    for part in schema.get("allOf", []):
        enum = resolve(part).get("properties", {}).get("error", {}).get("enum")
        if enum is not None:
            return list(enum)
    return []


def documented_codes() -> set[tuple[int, str]]:
    """(status, code) for every error response of every operation, and of the responses
    documented apart from any operation (405 and 500, by their `x-status`)."""
    pairs: set[tuple[int, str]] = set()
    for item in OPENAPI["paths"].values():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for status, response in operation["responses"].items():
                pairs.update((int(status), code) for code in error_enum(response))
    for response in OPENAPI["components"]["responses"].values():
        if "x-status" in response:
            pairs.update((response["x-status"], code) for code in error_enum(response))
    return pairs


def test_every_code_is_in_the_openapi_document_with_its_status() -> None:
    documented = documented_codes()
    registered = {(e.status, code) for code, e in CODES.items()}
    assert registered - documented == set(), "codes missing from docs/openapi.yaml"
    assert documented - registered == set(), "codes in docs/openapi.yaml under a wrong status"


def test_retry_after_is_documented_where_it_is_sent() -> None:
    """A documented 503 that names only codes sent with Retry-After requires the header."""
    for path, item in OPENAPI["paths"].items():
        for method, operation in item.items():
            if method == "parameters" or "503" not in operation["responses"]:
                continue
            response = resolve(operation["responses"]["503"])
            codes = error_enum(response)
            header = resolve(response.get("headers", {}).get("Retry-After", {}))
            if all(CODES[code].retry_after is not None for code in codes):
                assert header.get("required") is True, (method, path)
            else:
                assert header.get("required") is not True, (method, path)


# -- the error paths, walked with real requests ---------------------------------------------------

# Codes not walked here, each with the test file that makes the daemon answer it for real
# (checked to name the code): they need several instances, a broken database, a bug, or a
# full connection table.
WALKED_ELSEWHERE = {
    # A tenant that has forgotten producer ids: the idempotency window passed.
    "forgotten": "test_history.py",
    "owner_changed": "test_cluster.py",
    "owner_unreachable": "test_cluster.py",
    "unhealthy": "test_postgres_daemon.py",
    "too_many_connections": "test_listener.py",
    "internal": "test_listener.py",
}


# Codes of the HTML pages (webhookd/ui/), answered as a page with the code's status: walked
# in test_a_page_refusal_is_a_page_with_the_registered_status below.
PAGES_ONLY = {"forbidden", "too_many_sign_ins"}


def raw_request(daemon: Daemon, head: bytes) -> tuple[int, bytes]:
    """A request written by hand (what an HTTP client would refuse to send): the answer's
    status and body, read as far as its Content-Length."""
    host, port = daemon.base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
            re.search(rb"Content-Length: (\d+)", answer, re.I)[1]  # type: ignore[index]
        ):
            chunk = sock.recv(65536)
            assert chunk, f"closed before a whole answer: {answer!r}"
            answer += chunk
    head_text, _, body = answer.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), body


@pytest.fixture
async def daemon(start_daemon: StartDaemon, receiver: Receiver, tmp_path: Path) -> Daemon:
    (tmp_path / "tenants.d").mkdir()
    return await start_daemon(
        tenants={
            "acme": tenant(receiver.url("/acme")),
            "nodata": tenant(receiver.url("/nodata"), history_payloads=False),
        },
        daemon={
            "api_token": TOKEN,
            "tenants_dir": "tenants.d",
            "replay_max": 1,
            "max_body_bytes": 65536,
        },
    )


async def delivered(daemon: Daemon, name: str, count: int) -> None:
    async def done() -> bool:
        status, page = await daemon.request("GET", f"/v1/tenants/{name}/history")
        return status == 200 and len(page["records"]) >= count

    await wait_for(done, timeout=15)


async def test_the_error_paths_answer_their_codes(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, int] = {}

    async def expect(code: str, method: str, path: str, **kwargs: Any) -> None:
        status, body = await daemon.request(method, path, **kwargs)
        assert (status, body["error"]) == (CODES[code].status, code), (method, path, body)
        assert isinstance(body["detail"], str) and body["detail"]
        seen[code] = status

    ingest = "/v1/tenants/acme/webhooks"
    one = {"event": "CHECK_COMPLETED", "data": {}}
    as_json = {"Content-Type": "application/json"}
    await expect("bad_request", "POST", ingest, data=b"{not json", headers=as_json)
    await expect("bad_request", "GET", "/v1/tenants/acme/history?limit=0")
    await expect("bad_request", "GET", "/v1/tenants/bad.name/status")
    await expect("invalid_tenant", "PUT", "/v1/tenants/new", json={"endpoint": 5})
    await expect("unauthorized", "GET", "/v1/status", headers={"Authorization": "Bearer nope"})
    await expect("not_found", "GET", "/v1/tenants/nosuch/status")
    await expect("not_found", "GET", "/v1/no/such/path")
    await expect("not_found", "POST", "/v1/tenants/acme/parked/nothing/requeue")
    beyond = generated_id(id_tag("acme"), 999)
    await expect("unknown_webhook", "GET", f"/v1/tenants/acme/webhooks/{beyond}")
    await expect("unknown_webhook", "GET", "/v1/tenants/acme/webhooks/never-seen")
    await expect("method_not_allowed", "DELETE", "/v1/status")
    await expect("conflict", "PUT", "/v1/tenants/acme", json={"enabled": False})
    await expect("conflict", "POST", "/v1/tenants/acme/skip")  # nothing waiting
    await expect("too_large", "POST", ingest, data=b" " * 70000, headers=as_json)
    await expect(
        "unsupported_media_type", "POST", ingest, data=b"{}", headers={"Content-Type": "text/plain"}
    )
    await expect(
        "unsupported_media_type", "POST", ingest, json=one, headers={"Content-Encoding": "gzip"}
    )
    await expect("unknown_event", "POST", ingest, json={"event": "NO_SUCH_EVENT"})
    await expect("portal_not_configured", "POST", "/v1/tenants/acme/portal")  # no portal key

    # Two delivered webhooks: more than replay_max (1) to replay.
    await daemon.ingest("acme", [one, one])
    await delivered(daemon, "acme", 2)
    replay = {"from_sequence": 1, "to_sequence": 2}
    await expect("replay_too_large", "POST", "/v1/tenants/acme/replay", json=replay)
    # Delivered without their data kept: nothing to replay them from.
    await daemon.ingest("nodata", one)
    await delivered(daemon, "nodata", 1)
    await expect(
        "payloads_not_kept", "POST", "/v1/tenants/nodata/replay", json={"from_sequence": 1}
    )

    # An API tenant with a webhook waiting (paused): not removed without discard.
    made = {"endpoint": "http://127.0.0.1:9/down", "secret": "s", "events": ["*"]}
    status, _ = await daemon.request("PUT", "/v1/tenants/made", json=made)
    assert status == 201
    await daemon.request("POST", "/v1/tenants/made/pause")
    await daemon.ingest("made", one)
    await expect("queue_not_empty", "DELETE", "/v1/tenants/made")

    # What an HTTP client would not send: the HTTP parser's refusals, and Expect.
    auth = f"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n".encode()
    for code, head in (
        ("uri_too_long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "headers_too_large",
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        ),
        (
            "expectation_failed",
            b"POST /v1/tenants/acme/webhooks HTTP/1.1\r\nHost: x\r\n"
            + auth
            + b"Expect: 200-ok\r\nContent-Length: 2\r\n\r\n{}",
        ),
        ("bad_request", b"\x16\x03\x01 not http\r\n\r\n"),
    ):
        status, body = await asyncio.to_thread(raw_request, daemon, head)
        assert (status, yaml.safe_load(body)["error"]) == (CODES[code].status, code), body
        seen[code] = status

    # A body that stops arriving (the timeout made short for the test).
    monkeypatch.setattr(api, "BODY_TIMEOUT_S", 0.3)
    head = (
        b"POST /v1/tenants/acme/webhooks HTTP/1.1\r\nHost: x\r\n"
        + auth
        + b"Content-Length: 100\r\n\r\n{"
    )
    status, body = await asyncio.to_thread(raw_request, daemon, head)
    assert (status, yaml.safe_load(body)["error"]) == (408, "request_timeout"), body
    seen["request_timeout"] = status

    # The token in the file changed since start-up: a reload reads it, only a restart applies it.
    config_path = daemon.service.config.path
    config_path.write_text(config_path.read_text().replace(TOKEN, "the-new-token"))
    await daemon.service.reload()
    await expect(
        "restart_needed", "GET", "/v1/status", headers={"Authorization": "Bearer the-new-token"}
    )

    # Stopping: ingest is refused, to be sent again (Retry-After).
    await daemon.service.drain()
    async with daemon.session.post(
        daemon.base + ingest, json=one, headers=daemon.headers
    ) as response:
        body = await response.json()
        assert (response.status, body["error"]) == (503, "unavailable"), body
        assert response.headers["Retry-After"] == str(CODES["unavailable"].retry_after)
    seen["unavailable"] = 503

    walked_elsewhere = set(WALKED_ELSEWHERE) | set(PAGES_ONLY)
    assert set(seen) | walked_elsewhere == set(CODES), set(CODES) - set(seen) - walked_elsewhere
    assert set(seen).isdisjoint(walked_elsewhere)
    for code, test_file in WALKED_ELSEWHERE.items():
        assert f'"{code}"' in (ROOT / "tests" / test_file).read_text(), (code, test_file)


def test_a_busy_listener_refuses_with_the_registered_status_and_retry_after() -> None:
    """The refusal written as bytes before aiohttp sees the connection (test_listener.py
    makes the daemon send it) takes its status and Retry-After from the registry too."""
    registered = CODES["too_many_connections"]
    status_line = listener.REFUSED.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 %d Service Unavailable" % registered.status
    assert b"Retry-After: %d\r\n" % (registered.retry_after or 0) in listener.REFUSED


async def test_a_page_refusal_is_a_page_with_the_registered_status(
    start_daemon: StartDaemon,
) -> None:
    """`forbidden` belongs to the pages: a tenant name a page cannot show answers the code's
    status as a page (no token set: the operator pages are open)."""
    daemon = await start_daemon(tenants={"acme": tenant("http://127.0.0.1:9/down")})
    async with daemon.session.get(daemon.base + "/ui/tenants/bad.name") as response:
        assert response.status == CODES["forbidden"].status
        assert response.content_type == "text/html"


async def test_too_many_sign_ins_is_a_page_with_the_registered_status(
    start_daemon: StartDaemon,
) -> None:
    """`too_many_sign_ins` belongs to the sign-in page: after 10 wrong tokens from one
    address, the next sign-in answers the code's status as a page, with Retry-After."""
    daemon = await start_daemon(
        tenants={"acme": tenant("http://127.0.0.1:9/down")}, daemon={"api_token": TOKEN}
    )
    runner = daemon.server._runner
    assert runner is not None
    throttle = runner.app[SIGN_IN_THROTTLE]
    for _ in range(throttle.limit):
        throttle.wrong("127.0.0.1")
    async with daemon.session.post(daemon.base + "/ui/signin", data={"token": TOKEN}) as response:
        assert response.status == CODES["too_many_sign_ins"].status
        assert response.content_type == "text/html"
        assert 0 < int(response.headers["Retry-After"]) <= 60
