"""The tenant API (GET/PUT/DELETE /v1/tenants), the `tenant`, `check`, `init` and `receiver`
commands, and Standard Webhooks signing end to end (docs/configuration.md,
docs/http-api.md#tenants, docs/cli.md, docs/wire-format.md#signing)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    ROOT,
    Daemon,
    Process,
    Receiver,
    StartDaemon,
    free_port,
    tenant,
    wait_for,
    write_config,
)
from webhookd import config as config_mod

EVENT = "CHECK_COMPLETED"
SIGNING = "whsec_" + base64.b64encode(b"a-signing-key-of-24-byte").decode()
OTHER_SIGNING = "whsec_" + base64.b64encode(b"another-key-of-24-bytes!").decode()


async def raw(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, str]:
    """The status and the exact response text (for checks that a secret never shows)."""
    async with daemon.session.request(
        method, daemon.base + path, headers=daemon.headers, json=body
    ) as response:
        return response.status, await response.text()


def tenants_dir(daemon: Daemon) -> Path:
    directory = daemon.service.config.daemon.tenants_dir
    assert directory is not None
    return directory


def files_in(directory: Path) -> list[str]:
    """Every file, hidden ones (a leftover temp file) included."""
    return sorted(os.listdir(directory)) if directory.exists() else []


def read_toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_error(body: Any, code: str) -> str:
    assert isinstance(body, dict), body
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    detail: str = body["detail"]
    return detail


def editable(view: dict[str, Any]) -> dict[str, Any]:
    """A GET answer as a PUT body: without the keys GET adds."""
    return {k: v for k, v in view.items() if k not in ("tenant", "source", "delivery")}


async def delivered_once(daemon: Daemon, name: str) -> bool:
    status = await daemon.status(name)
    return status["waiting"] == 0 and status["last_processed_at"] is not None


# -- PUT creates, GET shows, PUT replaces ---------------------------------------------------------


async def test_put_creates_a_private_tenant_file_atomically_and_applies_it_live(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"main": tenant(receiver.url("/main"))})
    body = {
        "enabled": True,
        "batching": True,
        "endpoint": receiver.url("/newt"),
        "secret": "sekrit-one",
        "events": [EVENT, "TASK_CREATED"],
        "authorization_header": True,
        "signing_secret": SIGNING,
        "batch_window": 0.2,
        "batch_size": 5,
    }
    status, view = await daemon.request("PUT", "/v1/tenants/newt", json=body)
    assert status == 201, view
    assert (view["tenant"], view["source"]) == ("newt", "api")

    directory = tenants_dir(daemon)
    assert files_in(directory) == ["newt.toml"]  # no temp file left behind
    path = directory / "newt.toml"
    assert mode_of(path) == 0o600
    assert read_toml(path) == body

    # Live, without a reload: ingest is accepted and delivered at once.
    answer = await daemon.ingest("newt", [{"event": EVENT}, {"event": "RISK_LEVEL_CHANGED"}])
    assert [(w["status"], w["sequence"]) for w in answer["webhooks"]] == [
        ("queued", 1),
        ("not_subscribed", None),
    ]
    await wait_for(lambda: receiver.sequences("/newt") == [1])
    request = receiver.at("/newt")[0]
    assert request.headers["Authorization"] == "Bearer sekrit-one"
    assert request.webhooks[0]["secret"] == "sekrit-one"
    assert "webhook-signature" in request.headers
    assert isinstance(request.json, list)  # batching on


async def test_get_shows_every_tenant_and_never_a_secret(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    main = tenant(receiver.url("/main"), secret="main-secret-xyz", signing_secret=OTHER_SIGNING)
    daemon = await start_daemon(tenants={"main": main})
    body = {
        "enabled": True,
        "batching": False,
        "endpoint": receiver.url("/api"),
        "secret": "api-secret-xyz",
        "events": [EVENT],
        "authorization_header": False,
        "signing_secret": SIGNING,
        "source_address": "127.0.0.1",
        "timeout": 3.0,
    }
    texts: list[str] = []

    async def get(path: str, method: str = "GET", json_body: Any = None) -> Any:
        status, text = await raw(daemon, method, path, json_body)
        texts.append(text)
        assert status in (200, 201, 202), (status, text)
        return json.loads(text) if text.startswith(("{", "[")) else text

    await get("/v1/tenants/api", "PUT", body)
    one = await get("/v1/tenants/api")
    assert (one["tenant"], one["source"]) == ("api", "api")
    assert editable(one) == {**body, "secret": "***", "signing_secret": "***"}
    assert one["delivery"]["timeout"] == 3.0
    assert one["delivery"]["retry_base"] == 0.05  # [delivery] defaults from the main file

    listing = await get("/v1/tenants")
    by_name = {t["tenant"]: t for t in listing["tenants"]}
    assert sorted(by_name) == ["api", "main"]
    assert by_name["main"]["source"] == "config"
    assert by_name["api"]["source"] == "api"
    assert (by_name["main"]["secret"], by_name["main"]["signing_secret"]) == ("***", "***")
    assert by_name["api"] == one

    # Nor anywhere else a tenant is shown: status, queue peek, metrics, PUT and ingest answers.
    await get("/v1/tenants/api/pause", "POST")
    await get("/v1/tenants/api/webhooks", "POST", {"event": EVENT, "data": {"k": "v"}})
    await get("/v1/tenants/api/webhooks?limit=5")
    await get("/v1/tenants/api/status")
    await get("/v1/status")
    await get("/v1/status?format=text")
    await get("/metrics")
    await get("/v1/tenants/api", "PUT", {**body, "secret": "***"})
    for text in texts:
        for secret in ("main-secret-xyz", "api-secret-xyz", SIGNING, OTHER_SIGNING):
            assert secret not in text, (secret, text)


async def test_put_again_replaces_and_a_masked_secret_keeps_the_stored_one(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={})
    first = {"endpoint": receiver.url("/one"), "secret": "first-secret", "events": [EVENT]}
    status, _ = await daemon.request("PUT", "/v1/tenants/acme", json=first)
    assert status == 201
    path = tenants_dir(daemon) / "acme.toml"

    second = {
        "enabled": True,
        "batching": False,
        "endpoint": receiver.url("/two"),
        "secret": "second-secret",
        "events": ["*"],
        "authorization_header": True,
        "signing_secret": SIGNING,
    }
    status, view = await daemon.request("PUT", "/v1/tenants/acme", json=second)
    assert status == 200, view
    assert read_toml(path) == second
    assert mode_of(path) == 0o600
    assert files_in(path.parent) == ["acme.toml"]
    await daemon.ingest("acme", {"event": "TASK_CREATED"})
    await wait_for(lambda: receiver.sequences("/two") == [1])
    assert receiver.at("/two")[0].headers["Authorization"] == "Bearer second-secret"

    # Edit what GET shows ("***" secrets) and PUT it back: the stored secrets stay.
    status, shown = await daemon.request("GET", "/v1/tenants/acme")
    assert (shown["secret"], shown["signing_secret"]) == ("***", "***")
    status, _ = await daemon.request(
        "PUT", "/v1/tenants/acme", json={**editable(shown), "endpoint": receiver.url("/three")}
    )
    assert status == 200
    stored = read_toml(path)
    assert (stored["secret"], stored["signing_secret"]) == ("second-secret", SIGNING)
    assert stored["endpoint"] == receiver.url("/three")
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: receiver.sequences("/three") == [2])
    request = receiver.at("/three")[0]
    assert request.headers["Authorization"] == "Bearer second-secret"
    assert request.json["secret"] == "second-secret"
    assert receiver.sequences("/one") == []


async def test_api_tenant_survives_a_restart(receiver: Receiver, start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(tenants={})
    body = {"endpoint": receiver.url("/acme"), "secret": "kept-secret", "events": [EVENT]}
    status, before = await daemon.request("PUT", "/v1/tenants/acme", json=body)
    assert status == 201
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: receiver.sequences("/acme") == [1])
    await wait_for(lambda: delivered_once(daemon, "acme"))
    await daemon.server.stop()

    again = await start_daemon(daemon.service.config.path)
    status, after = await again.request("GET", "/v1/tenants/acme")
    assert (status, after) == (200, before)
    answer = await again.ingest("acme", {"event": EVENT})
    assert answer["webhooks"][0]["sequence"] == 2
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2])
    assert receiver.at("/acme")[-1].headers["Authorization"] == "Bearer kept-secret"


async def test_api_tenants_survive_a_reload_and_tenants_dir_is_reread(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"main": tenant(receiver.url("/main"))})
    body = {"endpoint": receiver.url("/api"), "secret": "api-secret", "events": [EVENT]}
    status, _ = await daemon.request("PUT", "/v1/tenants/api", json=body)
    assert status == 201
    status, _ = await daemon.request("PUT", "/v1/tenants/doomed", json=body)
    assert status == 201
    status, _ = await daemon.request("DELETE", "/v1/tenants/doomed")
    assert status == 200
    # An operator drops a file into tenants_dir by hand; SIGHUP picks it up.
    (tenants_dir(daemon) / "hand.toml").write_text(
        f'endpoint = "{receiver.url("/hand")}"\nsecret = "hand-secret"\nevents = ["*"]\n'
    )
    assert await daemon.service.reload()

    _, listing = await daemon.request("GET", "/v1/tenants")
    assert {t["tenant"]: t["source"] for t in listing["tenants"]} == {
        "api": "api",
        "hand": "api",
        "main": "config",
    }
    for name in ("api", "hand", "main"):
        await daemon.ingest(name, {"event": EVENT})
    await wait_for(
        lambda: [receiver.sequences(p) for p in ("/api", "/hand", "/main")] == [[1], [1], [1]]
    )
    assert receiver.at("/hand")[0].headers["Authorization"] == "Bearer hand-secret"
    status, _ = await daemon.request("POST", "/v1/tenants/doomed/webhooks", json={"event": EVENT})
    assert status == 404


async def test_put_with_secret_env_stores_the_variable_name_not_its_value(
    receiver: Receiver, start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_TEST_WEBHOOK_SECRET", "from-the-environment")
    daemon = await start_daemon(tenants={})
    body = {
        "endpoint": receiver.url("/acme"),
        "secret_env": "ACME_TEST_WEBHOOK_SECRET",
        "events": [EVENT],
    }
    status, view = await daemon.request("PUT", "/v1/tenants/acme", json=body)
    assert status == 201, view
    assert view["secret_env"] == "ACME_TEST_WEBHOOK_SECRET"
    assert "secret" not in view
    text = (tenants_dir(daemon) / "acme.toml").read_text()
    assert "from-the-environment" not in text
    assert read_toml(tenants_dir(daemon) / "acme.toml")["secret_env"] == "ACME_TEST_WEBHOOK_SECRET"
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: receiver.sequences("/acme") == [1])
    assert receiver.at("/acme")[0].headers["Authorization"] == "Bearer from-the-environment"

    status, answer = await daemon.request(
        "PUT", "/v1/tenants/unset", json={**body, "secret_env": "NO_SUCH_WEBHOOKD_VARIABLE"}
    )
    assert status == 400
    assert "secret_env: environment variable NO_SUCH_WEBHOOKD_VARIABLE is not set" in (
        assert_error(answer, "invalid_tenant")
    )


# -- PUT validation ------------------------------------------------------------------------------

VALID = {"endpoint": "http://127.0.0.1:9/x", "secret": "s", "events": [EVENT]}
PREFIX = "tenant newt: "


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"endpoint": "not a url"}, "endpoint: not an http(s) URL"),
        ({"endpoint": None}, "endpoint: required"),
        ({"events": None}, "events: required"),
        ({"colour": "blue"}, "colour: unknown key"),
        ({"secret_env": "SOME_VAR"}, "secret: set exactly one of secret, secret_file, secret_env"),
        (
            {"events": ["PROFILE_STATUS_CHANGED", EVENT]},
            "events: deprecated event types cannot be chosen: PROFILE_STATUS_CHANGED",
        ),
        ({"batch_window": 11}, "batch_window: expected a number from 0 to 10"),
        ({"signing_secret": "not-whsec"}, "signing_secret: expected whsec_"),
    ],
    ids=[
        "bad-endpoint",
        "no-endpoint",
        "no-events",
        "unknown-key",
        "two-secrets",
        "deprecated",
        "bad-override",
        "bad-signing",
    ],
)
async def test_invalid_put_is_400_naming_the_key_and_writes_nothing(
    receiver: Receiver, start_daemon: StartDaemon, change: dict[str, Any], expected: str
) -> None:
    daemon = await start_daemon(tenants={})
    directory = tenants_dir(daemon)
    body = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    status, answer = await daemon.request("PUT", "/v1/tenants/newt", json=body)
    assert status == 400, answer
    detail = assert_error(answer, "invalid_tenant")
    assert PREFIX + expected in detail, detail
    assert files_in(directory) == []
    status, _ = await daemon.request("GET", "/v1/tenants/newt")
    assert status == 404

    # Replacing an existing tenant with the same mistake leaves it exactly as it was.
    status, _ = await daemon.request("PUT", "/v1/tenants/newt", json=VALID)
    assert status == 201
    file_before = (directory / "newt.toml").read_bytes()
    _, view_before = await daemon.request("GET", "/v1/tenants/newt")
    status, answer = await daemon.request("PUT", "/v1/tenants/newt", json=body)
    assert status == 400, answer
    assert PREFIX + expected in assert_error(answer, "invalid_tenant")
    assert (directory / "newt.toml").read_bytes() == file_before
    assert files_in(directory) == ["newt.toml"]
    assert await daemon.request("GET", "/v1/tenants/newt") == (200, view_before)


async def test_put_body_must_be_a_json_object(start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(tenants={})
    for data in (b"[]", b"not json", b'"a string"'):
        status, answer = await daemon.request(
            "PUT", "/v1/tenants/newt", data=data, headers={"Content-Type": "application/json"}
        )
        assert status == 400, answer
        assert_error(answer, "bad_request")
    assert files_in(tenants_dir(daemon)) == []


async def test_collected_data_updated_becomes_collected_data_changed(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={})
    body = {**VALID, "events": ["COLLECTED_DATA_UPDATED", EVENT, "COLLECTED_DATA_CHANGED"]}
    status, view = await daemon.request("PUT", "/v1/tenants/newt", json=body)
    assert status == 201, view
    modern = ["COLLECTED_DATA_CHANGED", EVENT]
    assert view["events"] == modern
    assert read_toml(tenants_dir(daemon) / "newt.toml")["events"] == modern
    _, shown = await daemon.request("GET", "/v1/tenants/newt")
    assert shown["events"] == modern
    status, _ = await daemon.request("POST", "/v1/tenants/newt/pause")
    answer = await daemon.ingest(
        "newt", [{"event": "COLLECTED_DATA_CHANGED"}, {"event": "COLLECTED_DATA_UPDATED"}]
    )
    assert [w["status"] for w in answer["webhooks"]] == ["queued", "not_subscribed"]


async def test_an_invalid_name_is_400_an_unknown_one_404_and_a_main_file_tenant_409(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """A name that cannot be a tenant's is the client's mistake (400, saying what a name
    may hold); a valid name nobody configured is 404."""
    daemon = await start_daemon(tenants={"main": tenant(receiver.url("/main"))})
    directory = tenants_dir(daemon)
    for name in ("bad.name", "x" * 65, "sp%20ace", "BAD%20NAME"):
        for method in ("GET", "PUT", "DELETE"):
            status, answer = await daemon.request(method, f"/v1/tenants/{name}", json=VALID)
            assert status == 400, (method, name, answer)
            assert "is not a valid tenant name (1 to 64 of A-Z a-z 0-9 _ -)" in assert_error(
                answer, "bad_request"
            )
    for method in ("GET", "DELETE"):
        status, answer = await daemon.request(method, "/v1/tenants/nobody")
        assert (status, answer["error"]) == (404, "not_found"), method

    status, answer = await daemon.request("PUT", "/v1/tenants/main", json=VALID)
    assert status == 409, answer
    assert "main" in assert_error(answer, "conflict")
    status, answer = await daemon.request("DELETE", "/v1/tenants/main?discard=true")
    assert status == 409, answer
    assert_error(answer, "conflict")
    assert files_in(directory) == []
    status, view = await daemon.request("GET", "/v1/tenants/main")
    assert (status, view["source"], view["endpoint"]) == (200, "config", receiver.url("/main"))
    await daemon.ingest("main", {"event": EVENT})
    await wait_for(lambda: receiver.sequences("/main") == [1])


async def test_put_refuses_a_tenant_name_with_a_trailing_line_break(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """docs/configuration.md#tenantsname: "Tenant names: `[A-Za-z0-9_-]{1,64}`." A name that cannot
    be one is 400 (the founding contract said 404 for it, as for an unknown name; a bad request is
    the client's).

    The name check is a full match: `^...$` with `re.match` would let `PUT
    /v1/tenants/newt%0A` through (`$` also matches before a final newline), create the
    tenant "newt\\n" live and write `tenants.d/newt\\n.toml`, whose header comment then
    breaks across two lines, so that the next start or reload would refuse the whole
    configuration ("not valid TOML").
    """
    daemon = await start_daemon(tenants={"main": tenant(receiver.url("/main"))})
    body = {"endpoint": receiver.url("/newt"), "secret": "s3cr3t", "events": [EVENT]}
    status, answer = await daemon.request("PUT", "/v1/tenants/newt%0A", json=body)
    written = files_in(tenants_dir(daemon))
    assert status == 400, (status, answer, written)
    assert_error(answer, "bad_request")
    assert written == []
    assert "newt\n" not in daemon.service.config.tenants
    # The daemon can still start from its own configuration.
    config_mod.load(daemon.service.config.path)


# -- DELETE --------------------------------------------------------------------------------------


async def test_delete_is_refused_while_webhooks_wait_unless_discard(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={})
    body = {"endpoint": receiver.url("/gone"), "secret": "s", "events": [EVENT]}
    status, _ = await daemon.request("PUT", "/v1/tenants/gone", json=body)
    assert status == 201
    path = tenants_dir(daemon) / "gone.toml"
    await daemon.ingest("gone", [{"event": EVENT} for _ in range(3)])
    await wait_for(lambda: receiver.sequences("/gone") == [1, 2, 3])
    await wait_for(lambda: delivered_once(daemon, "gone"))  # the last 200 is recorded
    status, _ = await daemon.request("POST", "/v1/tenants/gone/pause")
    assert status == 200
    await daemon.ingest("gone", [{"event": EVENT} for _ in range(2)])

    status, answer = await daemon.request("DELETE", "/v1/tenants/gone")
    assert status == 409, answer
    assert "2 webhooks are waiting" in assert_error(answer, "queue_not_empty")
    assert path.exists()
    assert (await daemon.status("gone"))["waiting"] == 2

    status, answer = await daemon.request("DELETE", "/v1/tenants/gone?discard=true")
    assert (status, answer) == (200, {"tenant": "gone", "deleted": True, "discarded": 2})
    assert not path.exists()
    assert files_in(path.parent) == []
    status, _ = await daemon.request("GET", "/v1/tenants/gone")
    assert status == 404
    _, listing = await daemon.request("GET", "/v1/tenants")
    assert listing == {"tenants": []}
    for method, route in (("GET", "/status"), ("POST", "/webhooks")):
        status, _ = await daemon.request(method, f"/v1/tenants/gone{route}", json={"event": EVENT})
        assert status == 404, route
    status, _ = await daemon.request("DELETE", "/v1/tenants/gone")
    assert status == 404

    # Created again: sequences go on after the old ones (4 and 5 are never reused).
    status, _ = await daemon.request("PUT", "/v1/tenants/gone", json=body)
    assert status == 201
    answer = await daemon.ingest("gone", {"event": EVENT})
    assert answer["webhooks"][0]["sequence"] == 6
    await wait_for(lambda: receiver.sequences("/gone") == [1, 2, 3, 6])

    status, answer = await daemon.request("DELETE", "/v1/tenants/gone")  # empty: no discard needed
    assert (status, answer["discarded"]) == (200, 0)


async def test_a_tenant_file_that_cannot_be_removed_is_503_and_the_tenant_stays(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={})
    body = {"endpoint": receiver.url("/stuck"), "secret": "s", "events": [EVENT]}
    status, _ = await daemon.request("PUT", "/v1/tenants/stuck", json=body)
    assert status == 201
    # Where its file was, something unlink cannot remove (as root, permissions cannot stop
    # it): a directory that is not empty.
    path = tenants_dir(daemon) / "stuck.toml"
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")

    async with daemon.session.delete(
        daemon.base + "/v1/tenants/stuck", headers=daemon.headers
    ) as answer:
        refused = await answer.json()
        assert (answer.status, refused["error"]) == (503, "unavailable"), refused
        assert answer.headers["Retry-After"] == "1"
    assert refused["detail"].startswith(f"cannot remove {path.parent}/stuck.toml: ")
    await daemon.ingest("stuck", {"event": EVENT})  # still there, still delivering
    await wait_for(lambda: receiver.sequences("/stuck") == [1])

    (path / "inside").unlink()
    path.rmdir()
    status, answer = await daemon.request("DELETE", "/v1/tenants/stuck")
    assert (status, answer["deleted"]) == (200, True), answer


async def test_tenant_created_again_after_a_restart_continues_its_sequences(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={})
    body = {"endpoint": receiver.url("/again"), "secret": "s", "events": [EVENT]}
    status, _ = await daemon.request("PUT", "/v1/tenants/again", json=body)
    assert status == 201
    await daemon.ingest("again", [{"event": EVENT} for _ in range(3)])
    await wait_for(lambda: receiver.sequences("/again") == [1, 2, 3])
    await wait_for(lambda: delivered_once(daemon, "again"))  # the last 200 is recorded
    status, _ = await daemon.request("DELETE", "/v1/tenants/again")
    assert status == 200
    await daemon.server.stop()

    restarted = await start_daemon(daemon.service.config.path)
    status, _ = await restarted.request("PUT", "/v1/tenants/again", json=body)
    assert status == 201
    answer = await restarted.ingest("again", {"event": EVENT})
    assert answer["webhooks"][0]["sequence"] == 4
    state = await restarted.status("again")
    assert state["waiting"] == 1, state
    await wait_for(lambda: receiver.sequences("/again") == [1, 2, 3, 4], timeout=5)


# -- the `tenant` command ------------------------------------------------------------------------


async def webhookd(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command line in a thread, so the test's receiver keeps answering meanwhile."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "webhookd", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_tenant_command_set_show_change_and_rm(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    http: aiohttp.ClientSession,
) -> None:
    token = "cli-test-token"
    config = write_config(
        tmp_path, {"main": tenant(receiver.url("/main"))}, daemon={"api_token": token}
    )
    process = process_factory(config)
    process.start()
    auth = {"Authorization": f"Bearer {token}"}

    async def api(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with http.request(method, process.base + path, json=body, headers=auth) as response:
            return response.status, await response.json()

    c = ("-c", str(config))
    created = await webhookd(
        "tenant", "set", "clit", *c,
        "--endpoint", receiver.url("/one"),
        "--events", f"{EVENT},TASK_CREATED",
        "--secret", "cli-secret",
        "--batching",
        "--option", "batch_window=0.5",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    path = tmp_path / "tenants.d" / "clit.toml"
    expected = {
        "enabled": True,
        "batching": True,
        "endpoint": receiver.url("/one"),
        "secret": "cli-secret",
        "events": [EVENT, "TASK_CREATED"],
        "authorization_header": True,
        "batch_window": 0.5,
    }
    assert read_toml(path) == expected
    assert mode_of(path) == 0o600

    shown = await webhookd("tenant", "show", "clit", *c)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert editable(view) == {**expected, "secret": "***"}
    assert (view["source"], view["delivery"]["batch_window"]) == ("api", 0.5)

    status, _ = await api("POST", "/v1/tenants/clit/webhooks", {"event": EVENT})
    assert status == 202
    await wait_for(lambda: receiver.sequences("/one") == [1], timeout=5)
    assert receiver.at("/one")[0].headers["Authorization"] == "Bearer cli-secret"

    # Only --endpoint: everything else, the secret included, is kept.
    changed = await webhookd("tenant", "set", "clit", *c, "--endpoint", receiver.url("/two"))
    assert changed.returncode == 0, changed.stderr
    assert read_toml(path) == {**expected, "endpoint": receiver.url("/two")}
    status, _ = await api("POST", "/v1/tenants/clit/webhooks", {"event": "TASK_CREATED"})
    assert status == 202
    await wait_for(lambda: receiver.sequences("/two") == [2], timeout=5)
    request = receiver.at("/two")[0]
    assert request.headers["Authorization"] == "Bearer cli-secret"
    assert request.webhooks[0]["secret"] == "cli-secret"

    # rm: refused while webhooks wait, then --discard drops them.
    status, _ = await api("POST", "/v1/tenants/clit/pause")
    assert status == 200
    status, _ = await api("POST", "/v1/tenants/clit/webhooks", [{"event": EVENT}] * 2)
    assert status == 202
    refused = await webhookd("tenant", "rm", "clit", *c)
    assert (refused.returncode, refused.stderr) == (
        1,
        "error: 2 webhooks are waiting for clit; let them deliver (webhookd status clit), "
        "or add --discard to drop them\n",
    )
    assert path.exists()
    removed = await webhookd("tenant", "rm", "clit", "--discard", *c)
    assert removed.returncode == 0, removed.stderr
    assert "removed clit (discarded 2 waiting webhooks)" in removed.stdout
    assert not path.exists()
    gone = await webhookd("tenant", "show", "clit", *c)
    assert (gone.returncode, gone.stderr) == (1, "error: no tenant named 'clit' is configured\n")
    for result in (created, shown, changed, refused, removed, gone):
        assert "cli-secret" not in result.stdout + result.stderr
        assert token not in result.stdout + result.stderr


# -- signing, checked by `webhookd receiver` ------------------------------------------------------


@pytest.fixture
def receiver_process(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Path]]]:
    """Start `webhookd receiver` subprocesses; returns (base URL, output file)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> tuple[str, Path]:
        port = free_port()
        output = tmp_path / f"receiver-{port}.out"
        with output.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "webhookd",
                    "receiver",
                    "--listen",
                    f"127.0.0.1:{port}",
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, output.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), 0.2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the receiver did not listen"
                time.sleep(0.02)
        return f"http://127.0.0.1:{port}", output

    yield start
    for proc in started:
        proc.kill()
        proc.wait(10)


async def test_signed_deliveries_pass_the_receiver_and_a_wrong_key_is_401(
    receiver_process: Callable[..., tuple[str, Path]], start_daemon: StartDaemon
) -> None:
    good, _ = receiver_process("--signing-secret", SIGNING, "--secret", "sig-secret")
    bad, bad_output = receiver_process("--signing-secret", OTHER_SIGNING, "--secret", "sig-secret")
    signed = {"secret": "sig-secret", "signing_secret": SIGNING}
    daemon = await start_daemon(
        tenants={
            "single": tenant(good + "/single", **signed),
            "batched": tenant(good + "/batched", batching=True, batch_window=0.1, **signed),
            "mismatch": tenant(bad + "/mismatch", **signed),
        }
    )
    for name in ("single", "batched", "mismatch"):
        await daemon.ingest(name, [{"event": EVENT, "data": {"n": n}} for n in range(3)])

    for name in ("single", "batched"):

        async def delivered(name: str = name) -> bool:
            return await delivered_once(daemon, name)

        await wait_for(delivered, timeout=10)
        status = await daemon.status(name)
        assert (status["queue"], status["recent_failures"]) == ("empty", []), status

    def first_failure() -> Any:
        failures = daemon.service.workers["mismatch"].failures
        return failures[0] if failures else None

    await wait_for(first_failure, timeout=10)
    status = await daemon.status("mismatch")
    assert status["waiting"] == 3
    assert status["queue"] == "stalled"
    assert (status["recent_failures"][0]["status"], status["recent_failures"][0]["error"]) == (
        401,
        "HTTP 401",
    )
    await wait_for(lambda: "401 bad webhook-signature" in bad_output.read_text(), timeout=5)


# -- check and init ------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webhookd", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_check_prints_a_summary_or_the_errors(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "alpha": tenant("https://alpha.example/hooks", secret="alpha-secret", batching=True),
            "beta": tenant("https://beta.example/hooks", enabled=False),
        },
    )
    (tmp_path / "tenants.d").mkdir()
    (tmp_path / "tenants.d" / "gamma.toml").write_text(
        'endpoint = "https://gamma.example/x"\nsecret = "gamma-secret"\nevents = ["TASK_CREATED"]\n'
    )
    ok = run_cli("check", "-c", str(config))
    assert ok.returncode == 0, ok.stderr
    assert f"{config}: OK" in ok.stdout
    assert "3 tenants" in ok.stdout
    for name, endpoint in (
        ("alpha", "https://alpha.example/hooks"),
        ("beta", "https://beta.example/hooks"),
        ("gamma", "https://gamma.example/x"),
    ):
        line = next((x for x in ok.stdout.splitlines() if x.split()[:1] == [name]), None)
        assert line is not None and endpoint in line, (name, ok.stdout)
    assert "alpha-secret" not in ok.stdout
    assert "gamma-secret" not in ok.stdout
    assert "without TLS" not in ok.stdout  # every endpoint is https


def test_check_names_endpoints_where_the_secret_travels_in_clear(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "safe": tenant("https://safe.example/hooks"),
            "plain": tenant("http://plain.example/hooks"),
        },
    )
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "1 endpoint without TLS: the secret travels unencrypted to plain" in result.stdout

    bad = write_config(
        tmp_path,
        {"alpha": tenant("ftp://alpha.example/hooks")},
        daemon={"bogus": 1},
        name="bad.toml",
    )
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 1
    assert f"error: {bad}: tenants.alpha.endpoint: not an http(s) URL" in result.stderr
    assert f"error: {bad}: daemon.bogus: unknown key" in result.stderr
    assert "OK" not in result.stdout


def test_check_refuses_a_ca_file_that_is_not_a_certificate_bundle(tmp_path: Path) -> None:
    """docs/configuration.md#validation: "bad values are errors that name the file (as given) and
    the key path ... and stop startup". docs/cli.md#webhookd-check: `webhookd check` "validate,
    print a summary, exit 1 on errors". README (Run as a service): `webhookd check -c
    /etc/webhookd/config.toml` is the step before `systemctl enable --now webhookd`.

    An operator sets `ca_file` to the private CA's *key* or a DER file by mistake (anything
    that is a file but not PEM certificates). Checking only that it is a file would let
    `webhookd check` say "OK", and `webhookd run` would then exit 1 with
    `cannot_start error="[X509: NO_CERTIFICATE_OR_CRL_FOUND] ..."`, naming neither the file
    nor `daemon.ca_file`; a reload setting such a ca_file would be taken too (only
    `restart_needed`), so the next restart would fail.
    """
    (tmp_path / "private-ca.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a cert\n")
    config = write_config(
        tmp_path,
        {"acme": tenant("https://hooks.acme.example/x")},
        daemon={"ca_file": "private-ca.pem"},
    )
    result = run_cli("check", "-c", str(config))
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"check accepted an unusable ca_file:\n{output}"
    assert f"{config}: daemon.ca_file:" in output, output


def test_init_writes_a_private_config_with_a_fresh_token(tmp_path: Path) -> None:
    tokens = []
    for path in (tmp_path / "one" / "config.toml", tmp_path / "two.toml"):
        result = run_cli("init", str(path))
        assert result.returncode == 0, result.stderr
        assert mode_of(path) == 0o600
        token = read_toml(path)["daemon"]["api_token"]
        assert token not in result.stdout + result.stderr
        tokens.append(token)
    assert all(isinstance(t, str) and len(t) >= 32 for t in tokens), tokens
    assert tokens[0] != tokens[1]


def example_keys() -> list[str]:
    """Every key config.example.toml sets, as `table.key` (tenant keys as `tenants.*.key`)."""
    raw = tomllib.loads((ROOT / "config.example.toml").read_text(encoding="utf-8"))
    keys = []
    for table, values in raw.items():
        if table == "tenants":
            keys += [f"tenants.*.{k}" for tenant_table in values.values() for k in tenant_table]
        else:
            keys += [f"{table}.{k}" for k in values]
    return sorted(set(keys))


def commented_keys(text: str) -> set[str]:
    """The keys of a TOML text that carry a `# comment` on their line, as `table.key`; a
    table or key line that is itself commented out counts too (a table to copy)."""
    found, table = set(), ""
    for line in text.splitlines():
        setting, commented, comment = line.removeprefix("# ").partition(" # ")
        header = re.fullmatch(r"\[([\w.-]+)\]\s*", setting)
        if header:
            table = re.sub(r"^tenants\.[\w-]+$", "tenants.*", header.group(1))
        elif commented and comment.strip() and "=" in setting:
            found.add(f"{table}.{setting.partition('=')[0].strip()}")
    return found


def test_init_output_is_commented_and_passes_check(tmp_path: Path) -> None:
    """The starter is the example's keys and comments with production values: it loads
    cleanly, sends nothing anywhere until a tenant is added, and names no file that an
    installed copy (pip install, no source tree) lacks."""
    path = tmp_path / "config.toml"
    assert run_cli("init", str(path)).returncode == 0
    text = path.read_text(encoding="utf-8")
    # As on a fresh machine: no variable the starter file might name is set.
    env = {k: v for k, v in os.environ.items() if not k.endswith("_WEBHOOK_SECRET")}
    result = run_cli("check", "-c", str(path), env=env)
    assert (result.returncode, result.stderr) == (0, "")
    assert f"{path}: OK" in result.stdout
    assert "  0 tenants\n" in result.stdout
    assert "warning" not in result.stdout

    missing = [key for key in example_keys() if key not in commented_keys(text)]
    assert missing == [], missing
    for absent in ("README", "config.example.toml", "SPEC", "../"):
        assert absent not in text, absent
    assert f"webhookd check -c {path}" in text
    daemon = read_toml(path)["daemon"]
    assert daemon["allow_private_endpoints"] is False
    assert (daemon["database"], daemon["tenants_dir"]) == ("webhookd.db", "tenants.d")

    # The tenant left commented out is one to copy: uncommented and given a secret, it loads.
    tenant_lines = text[text.index("# [tenants.") :].splitlines()
    path.write_text(text + "\n" + "\n".join(line.removeprefix("# ") for line in tenant_lines))
    result = run_cli("check", "-c", str(path), env=env)
    assert (result.returncode, result.stderr) == (0, "")
    assert "  1 tenant\n" in result.stdout


def test_init_state_dir_puts_the_database_and_tenants_there(tmp_path: Path) -> None:
    """Whatever the folder's name holds, it is written as a TOML string that reads back."""
    path = tmp_path / "etc" / "config.toml"
    state = tmp_path / 'state "quoted" \\ dir'
    result = run_cli("init", str(path), "--state-dir", f"{state}/")
    assert result.returncode == 0, result.stderr
    daemon = read_toml(path)["daemon"]
    assert (daemon["database"], daemon["tenants_dir"]) == (
        f"{state}/webhookd.db",
        f"{state}/tenants.d",
    )
    assert run_cli("check", "-c", str(path)).returncode == 0


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    assert run_cli("init", str(path)).returncode == 0
    before = path.read_bytes()
    refused = run_cli("init", str(path))
    assert refused.returncode != 0
    assert "--force" in refused.stderr
    assert path.read_bytes() == before
    forced = run_cli("init", str(path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert mode_of(path) == 0o600
    old_token = tomllib.loads(before.decode())["daemon"]["api_token"]
    assert read_toml(path)["daemon"]["api_token"] != old_token


# -- a GET answer sent back, masked secrets with nothing to keep, the file's mode ---------------


async def test_a_tenant_get_can_be_edited_and_put_back(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """README (Configuration): "Responses show secrets as `"***"`; sending `"***"` back keeps
    the stored secret, so a GET can be edited and PUT back."

    The GET answer carries `tenant`, `source` and `delivery`; PUT takes them back unchanged
    (refused as unknown keys, they would make every script strip them first).
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


async def test_put_refuses_an_edited_delivery_view_and_a_mask_with_no_secret_behind_it(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """`delivery` in a GET answer shows the effective settings; an edit there would be lost,
    so it is refused and the top-level key named. `"***"` keeps a stored secret; for a new
    tenant there is none, and storing the three asterisks as its secret would be wrong."""
    daemon = await start_daemon(tenants={})
    directory = tenants_dir(daemon)
    body = {"endpoint": receiver.url("/newt"), "secret": "s1", "events": [EVENT]}
    status, view = await daemon.request("PUT", "/v1/tenants/newt", json=body)
    assert status == 201, view
    before = (directory / "newt.toml").read_bytes()

    edited = {**view, "delivery": {**view["delivery"], "timeout": 1.0}}
    status, answer = await daemon.request("PUT", "/v1/tenants/newt", json=edited)
    assert status == 400, answer
    assert '"timeout": 5.0' in assert_error(answer, "invalid_tenant")
    # ...and as a top-level key it is taken; the view left as it was passes along.
    status, view = await daemon.request("PUT", "/v1/tenants/newt", json={**view, "timeout": 1.0})
    assert status == 200, view
    assert view["timeout"] == view["delivery"]["timeout"] == 1.0

    for key in ("secret", "signing_secret"):
        masked = {**body, key: "***"}
        status, answer = await daemon.request("PUT", "/v1/tenants/other", json=masked)
        assert status == 400, answer
        assert "there is none to keep" in assert_error(answer, "invalid_tenant")
    assert files_in(directory) == ["newt.toml"]
    assert (directory / "newt.toml").read_bytes() != before  # the timeout change


async def test_a_tenant_file_is_0600_even_over_a_leftover_temporary_file(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """O_CREAT's mode applies only to a new file: a temporary file left by a crash with a
    looser mode would otherwise pass its mode to the tenant file holding the secret."""
    daemon = await start_daemon(tenants={})
    directory = tenants_dir(daemon)
    directory.mkdir(parents=True, exist_ok=True)
    leftover = directory / ".newt.toml.tmp"
    leftover.write_text("partial")
    leftover.chmod(0o644)
    body = {"endpoint": receiver.url("/newt"), "secret": "s1", "events": [EVENT]}
    status, view = await daemon.request("PUT", "/v1/tenants/newt", json=body)
    assert status == 201, view
    assert files_in(directory) == ["newt.toml"]
    assert mode_of(directory / "newt.toml") == 0o600
