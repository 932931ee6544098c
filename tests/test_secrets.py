"""No secret ever leaves webhookd, except inside a delivery to its own tenant (docs/wire-format.md,
docs/cli.md#common-rules).

One daemon runs as a subprocess at log level debug and is driven through everything a producer
and an operator can do: ingest (taken and refused), deliveries that succeed, fail with a 500
and fail to connect, retries, a skip and a requeue, a SIGHUP reload that rotates a secret, a
reload refused for a bad config, every status and tenant view, metrics, the tenant API (good and
bad PUTs), 401s, and the `check`, `status` and `tenant show` commands. Then every byte the
daemon printed, every answer it gave, everything the commands printed and its database files
are searched for every secret, signing secret and the API token, plainly and in base64 (at
each alignment) and, for signing keys, the decoded key bytes, raw and hex.

The receiver's copy is the control: it must hold the tenants' secrets, so the search cannot
pass because nothing was ever sent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import signal
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from tests.conftest import Process, Receiver, free_port, wait_for
from tests.postgres import PostgresServer
from tests.test_reload import log_events

EVENT = "CHECK_COMPLETED"
PASSWORD_ENV = "WEBHOOKD_DATABASE_PASSWORD"
ProcessFactory = Callable[..., Process]


def whsec(key: bytes) -> str:
    return "whsec_" + base64.b64encode(key).decode()


@dataclass
class Secrets:
    """Every secret value in the scenario: random, unique, named for the report."""

    token: str = field(default_factory=lambda: "tok-" + secrets.token_urlsafe(24))
    inline: str = field(default_factory=lambda: "sec-inline-" + secrets.token_hex(16))
    rotated: str = field(default_factory=lambda: "sec-rotated-" + secrets.token_hex(16))
    env: str = field(default_factory=lambda: "sec-env-" + secrets.token_hex(16))
    file: str = field(default_factory=lambda: "sec-file-" + secrets.token_hex(16))
    put: str = field(default_factory=lambda: "sec-put-" + secrets.token_hex(16))
    bad_put: str = field(default_factory=lambda: "sec-bad-put-" + secrets.token_hex(16))
    typo: str = field(default_factory=lambda: "sec-typo-" + secrets.token_hex(16))
    inline_key: bytes = field(default_factory=lambda: os.urandom(32))
    put_key: bytes = field(default_factory=lambda: os.urandom(24))
    # 15 bytes: one short of the minimum, so refused, and still long enough to search for.
    bad_put_key: bytes = field(default_factory=lambda: os.urandom(15))
    bad_reload_key: bytes = field(default_factory=lambda: os.urandom(15))
    env_name: str = field(default_factory=lambda: "WEBHOOKD_TEST_SECRET_" + secrets.token_hex(4))

    def forbidden(self) -> dict[str, bytes]:
        """name -> bytes that must appear in nothing the daemon shows."""
        found: dict[str, bytes] = {}
        for name in ("token", "inline", "rotated", "env", "file", "put", "bad_put", "typo"):
            found.update(text_forms(name, getattr(self, name)))
        for name in ("inline_key", "put_key", "bad_put_key", "bad_reload_key"):
            key: bytes = getattr(self, name)
            found.update(text_forms(f"{name} (whsec_)", whsec(key)))
            found.update(byte_forms(f"{name} (decoded)", key))
        return found


def byte_forms(name: str, value: bytes) -> dict[str, bytes]:
    """The value raw, in hex, and in base64 and base64url at each of the three alignments it
    can have inside a longer base64 text (the 4 characters that depend on neighbours cut)."""
    forms = {f"{name}": value, f"{name} hex": value.hex().encode()}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + value)
        core = encoded[4 if offset else 0 : -4]
        forms[f"{name} base64@{offset}"] = core
        forms[f"{name} base64url@{offset}"] = core.translate(bytes.maketrans(b"+/", b"-_"))
    # A few random characters could turn up by chance in a large log or database file.
    assert all(len(form) >= 12 for form in forms.values()), forms
    return forms


def text_forms(name: str, value: str) -> dict[str, bytes]:
    return byte_forms(name, value.encode())


class Transcript:
    """Everything the daemon showed anyone, labelled by where it was shown."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []

    def add(self, label: str, data: bytes) -> None:
        self.items.append((label, data))

    def leaks(self, forbidden: dict[str, bytes]) -> list[str]:
        return [
            f"{what} in {label}: ...{_around(data, form)}..."
            for label, data in self.items
            for what, form in forbidden.items()
            if form in data
        ]


def _around(data: bytes, form: bytes) -> str:
    at = data.index(form)
    return repr(data[max(0, at - 80) : at + len(form) + 40])


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as client:
        yield client


@dataclass
class Scenario:
    s: Secrets
    session: aiohttp.ClientSession
    process: Process
    transcript: Transcript
    env: dict[str, str]

    @property
    def base(self) -> str:
        return self.process.base

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "",
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[int, bytes]:
        """An API call with the token (or `token`, or none); the answer goes in the transcript."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token or self.s.token}"
        async with self.session.request(
            method, self.base + path, headers=sent, **kwargs
        ) as response:
            body = await response.read()
        headers_text = "".join(f"{k}: {v}\n" for k, v in response.headers.items()).encode()
        self.transcript.add(f"{method} {path} -> {response.status}", headers_text + body)
        return response.status, body

    async def json(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        status, body = await self.call(method, path, **kwargs)
        assert status == expect, (method, path, status, body)
        return json.loads(body)

    async def cli(self, *args: str, expect: int = 0) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "webhookd",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
        self.transcript.add(f"webhookd {' '.join(args)} -> exit {proc.returncode}", output)
        assert proc.returncode == expect, (args, proc.returncode, output.decode())
        return output.decode()

    def logged(self, event: str) -> int:
        return self.process.log().count(f'"event":"{event}"')

    async def eventually(self, check: Callable[[], Any], timeout: float = 15.0) -> Any:
        """wait_for, for a condition that needs the daemon to answer."""
        deadline = time.monotonic() + timeout
        while True:
            value = await check()
            if value:
                return value
            assert time.monotonic() < deadline, f"not within {timeout}s: {check}"
            await asyncio.sleep(0.02)


def config_document(
    s: Secrets,
    receiver: Receiver,
    *,
    port: int,
    refused_port: int,
    inline_secret: str,
    broken: bool = False,
) -> dict[str, Any]:
    inline: dict[str, Any] = {
        "endpoint": receiver.url("/inline"),
        "secret": inline_secret,
        "signing_secret": whsec(s.inline_key),
        "events": [EVENT, "TASK_CREATED"],
    }
    if broken:  # two operator mistakes, each holding a secret the error must not repeat
        inline["signing_secret"] = whsec(s.bad_reload_key)
        inline["secrte"] = s.typo
    return {
        "daemon": {
            "database": "webhookd.db",
            "listen": f"127.0.0.1:{port}",
            "api_token": s.token,
            "tenants_dir": "tenants.d",
            "allow_private_endpoints": True,
            "log_level": "debug",
            "log_format": "json",
            "shutdown_grace": 2.0,
        },
        "delivery": {"retry_base": 0.05},
        "tenants": {
            "inline": inline,
            "envy": {
                "endpoint": receiver.url("/envy"),
                "secret_env": s.env_name,
                "events": ["*"],
                "batching": True,
                "batch_window": 0.0,
            },
            "filed": {
                "endpoint": f"http://127.0.0.1:{refused_port}/filed",
                "secret_file": "secrets/filed.secret",
                "events": ["*"],
            },
        },
    }


def verify_signature(key: bytes, headers: dict[str, str], body: bytes) -> None:
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}", headers


def assert_carries(receiver: Receiver, path: str, secret: str, key: bytes | None = None) -> None:
    """The control: what the tenant's endpoint received holds the tenant's secret."""
    requests = receiver.at(path)
    assert requests, f"nothing was delivered to {path}"
    for request in requests:
        assert request.headers["Authorization"] == f"Bearer {secret}", request.headers
        assert all(w["secret"] == secret for w in request.webhooks), request.body
        assert secret.encode() in request.body
        if key is not None:
            verify_signature(key, request.headers, request.body)


async def test_no_secret_or_token_is_ever_shown(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: ProcessFactory,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = Secrets()
    # The test process reads the config too (Process loads it), so it needs the variable.
    monkeypatch.setenv(s.env_name, s.env)
    (tmp_path / "secrets").mkdir()
    secret_file = tmp_path / "secrets" / "filed.secret"
    secret_file.write_text(s.file + "\n")
    secret_file.chmod(0o600)
    port, refused_port = free_port(), free_port()  # nothing listens on refused_port
    config = tmp_path / "config.toml"

    def write(inline_secret: str, *, broken: bool = False) -> None:
        document = config_document(
            s,
            receiver,
            port=port,
            refused_port=refused_port,
            inline_secret=inline_secret,
            broken=broken,
        )
        config.write_text(tomli_w.dumps(document))

    write(s.inline)
    receiver.script("/inline", 500)  # the first attempt fails, the retry succeeds
    receiver.always("/envy", 500)
    env = {**os.environ, s.env_name: s.env}
    process = process_factory(config, env={s.env_name: s.env})
    await asyncio.to_thread(process.start)
    run = Scenario(s, session, process, Transcript(), env)
    c = str(config)

    # -- 401s, and the one open path -----------------------------------------------------------
    for token in (None, "tok-wrong", s.token[:-1], s.token + "x", s.token.upper()):
        status, body = await run.call("GET", "/v1/status", token=token)
        assert status == 401 and json.loads(body)["error"] == "unauthorized", body
    status, _ = await run.call("POST", "/v1/tenants/inline/webhooks", token=None, json={})
    assert status == 401
    status, _ = await run.call("GET", "/healthz", token=None)
    assert status == 200

    # -- ingest: taken, not subscribed, refused -----------------------------------------------
    items = [{"event": EVENT, "data": {"n": n}} for n in range(3)]
    answer = await run.json("POST", "/v1/tenants/inline/webhooks", 202, json=items)
    assert [w["status"] for w in answer["webhooks"]] == ["queued"] * 3
    answer = await run.json(
        "POST", "/v1/tenants/inline/webhooks", 202, json={"event": "RISK_LEVEL_CHANGED"}
    )
    assert answer["webhooks"][0]["status"] == "not_subscribed"
    for name in ("envy", "filed"):
        await run.json("POST", f"/v1/tenants/{name}/webhooks", 202, json=items[:2])
    refusals: list[tuple[str, Any, int]] = [
        ("inline", {"event": "NOT_AN_EVENT"}, 422),
        ("inline", {"event": EVENT, "data": [1]}, 400),
        ("inline", {"event": EVENT, "secret": s.inline}, 400),
        ("inline", [], 400),
        ("nobody", {"event": EVENT}, 404),
    ]
    for name, body, expect in refusals:
        await run.json("POST", f"/v1/tenants/{name}/webhooks", expect, json=body)
    await run.json(
        "POST",
        "/v1/tenants/inline/webhooks",
        400,
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )

    # -- deliveries: a 500 then 200s, a 500 for ever, a refused connection --------------------
    await wait_for(lambda: len(receiver.at("/inline", ok_only=True)) == 3)
    await wait_for(lambda: len(receiver.at("/envy")) >= 3)

    async def filed_failed_twice() -> bool:
        status = await run.json("GET", "/v1/tenants/filed/status")
        return bool(status["attempts"] >= 2)

    await run.eventually(filed_failed_twice)
    failures = (await run.json("GET", "/v1/tenants/filed/status"))["recent_failures"]
    assert failures[0]["error"] == "connection refused", failures

    # -- control: retry, refresh, pause/resume, skip, parked, requeue -------------------------
    await run.json("POST", "/v1/tenants/envy/retry")
    await run.json("POST", "/v1/retry")
    await run.json("POST", "/v1/tenants/filed/refresh")
    await run.json("POST", "/v1/tenants/filed/pause")
    await run.json("POST", "/v1/tenants/filed/resume")

    async def skipped() -> bool:
        status, _ = await run.call("POST", "/v1/tenants/envy/skip")
        return status == 200  # 409 while an attempt is in flight

    await run.eventually(skipped)
    parked = (await run.json("GET", "/v1/tenants/envy/parked"))["parked"]
    assert len(parked) == 1, parked
    await run.json("POST", f"/v1/tenants/envy/parked/{parked[0]['id']}/requeue")

    # -- reload with a rotated secret ---------------------------------------------------------
    write(s.rotated)
    rotated_config = config.read_bytes()
    process_signal(process, signal.SIGHUP)
    await wait_for(lambda: run.logged("reloaded") >= 1)
    await run.json("POST", "/v1/tenants/inline/webhooks", 202, json={"event": EVENT})
    await wait_for(lambda: len(receiver.at("/inline", ok_only=True)) == 4)

    # -- the tenant API: a new tenant with secrets, an invalid one, a main-file one ---------
    new_tenant = {
        "endpoint": receiver.url("/api"),
        "secret": s.put,
        "signing_secret": whsec(s.put_key),
        "events": [EVENT],
    }
    shown = await run.json("PUT", "/v1/tenants/api", 201, json=new_tenant)
    assert shown["secret"] == shown["signing_secret"] == "***", shown
    tenant_file = tmp_path / "tenants.d" / "api.toml"
    assert tenant_file.stat().st_mode & 0o777 == 0o600
    assert s.put in tenant_file.read_text()  # where the secret lives: a private file
    masked = {**new_tenant, "secret": "***", "signing_secret": "***"}
    await run.json("PUT", "/v1/tenants/api", 200, json=masked)  # the masked values keep theirs
    await run.json("POST", "/v1/tenants/api/webhooks", 202, json={"event": EVENT})
    await wait_for(lambda: len(receiver.at("/api", ok_only=True)) == 1)
    invalid = {
        "endpoint": "ftp://nowhere",
        "secret": s.bad_put,
        "secret_env": "ALSO_THIS",
        "signing_secret": whsec(s.bad_put_key),
        "events": ["NOPE"],
    }
    detail = (await run.json("PUT", "/v1/tenants/bad", 400, json=invalid))["detail"]
    assert "endpoint" in detail and "signing_secret" in detail, detail
    invalid_signing = {**new_tenant, "signing_secret": whsec(s.bad_put_key)}
    await run.json("PUT", "/v1/tenants/api", 400, json=invalid_signing)
    await run.json("PUT", "/v1/tenants/inline", 409, json={**new_tenant, "secret": s.bad_put})

    # -- a reload refused: the running config stays -------------------------------------------
    write(s.rotated, broken=True)
    process_signal(process, signal.SIGHUP)
    await wait_for(lambda: run.logged("reload_rejected") >= 2)
    await run.cli("check", "-c", c, expect=1)
    config.write_bytes(rotated_config)

    # -- every view -----------------------------------------------------------------------------
    names = ["api", "envy", "filed", "inline"]
    status_all = await run.json("GET", "/v1/status")
    assert [t["tenant"] for t in status_all["tenants"]] == names
    await run.call("GET", "/v1/status?format=text")
    await run.call("GET", "/v1/status", headers={"Accept": "text/plain"})
    for name in names:
        await run.json("GET", f"/v1/tenants/{name}/status")
        await run.call("GET", f"/v1/tenants/{name}/status?format=text")
        await run.call("GET", f"/v1/tenants/{name}/status", headers={"Accept": "text/plain"})
        await run.json("GET", f"/v1/tenants/{name}/webhooks?limit=1000")
        await run.json("GET", f"/v1/tenants/{name}/parked")
        await run.json("GET", f"/v1/tenants/{name}")
        # The history, a lookup of its newest webhook and a dry-run replay (issue 13).
        history = await run.json("GET", f"/v1/tenants/{name}/history?limit=1000")
        await run.call("GET", f"/v1/tenants/{name}/history?format=text")
        for record in history["records"][:1]:
            webhook_id = urllib.parse.quote(record["id"], safe="")
            await run.json("GET", f"/v1/tenants/{name}/webhooks/{webhook_id}")
            await run.call("GET", f"/v1/tenants/{name}/webhooks/{webhook_id}?format=text")
        await run.json("POST", f"/v1/tenants/{name}/replay", json={"since": 0, "dry_run": True})
    await run.json("GET", "/v1/tenants")
    status, metrics = await run.call("GET", "/metrics")
    assert status == 200 and b"webhookd_deliveries" in metrics

    # -- the command line -----------------------------------------------------------------------
    check = await run.cli("check", "-c", c)
    rows = {line.split()[0]: line.split("  ") for line in check.splitlines() if line.split()[:1]}
    cells = {name: [cell.strip() for cell in row if cell] for name, row in rows.items()}
    secrets = {name: cells[name][3] for name in ("envy", "filed", "inline")}  # SECRET
    assert secrets == {"envy": "env", "filed": "file", "inline": "inline, signed"}, check
    await run.cli("status", "-c", c)
    for name in names:
        await run.cli("status", name, "-c", c)
        await run.cli("history", name, "-c", c)
    await run.cli("tenant", "show", "-c", c)
    await run.cli("tenant", "show", "api", "-c", c)

    assert await asyncio.to_thread(process.terminate) == 0

    # -- the control: deliveries carry the secrets ------------------------------------------------
    before, after = receiver.at("/inline")[:4], receiver.at("/inline")[4:]
    assert [r.status for r in before] == [500, 200, 200, 200]
    for request in before:
        assert request.headers["Authorization"] == f"Bearer {s.inline}"
        assert all(w["secret"] == s.inline for w in request.webhooks)
        verify_signature(s.inline_key, request.headers, request.body)
    assert len(after) == 1 and after[0].webhooks[0]["secret"] == s.rotated
    verify_signature(s.inline_key, after[0].headers, after[0].body)
    assert_carries(receiver, "/envy", s.env)
    assert_carries(receiver, "/api", s.put, s.put_key)

    # -- the search -------------------------------------------------------------------------------
    log = process.log_path.read_bytes()
    for event in ("started", "delivered", "delivery_failed", "reloaded", "reload_rejected"):
        assert f'"event":"{event}"'.encode() in log, f"{event} was never logged"
    assert b"tenant_saved" in log and b"connection refused" in log and b"stopped" in log
    run.transcript.add("daemon.log", log)
    for database_file in sorted(tmp_path.glob("webhookd.db*")):
        run.transcript.add(database_file.name, database_file.read_bytes())
    labels = [label for label, _ in run.transcript.items]
    assert len(labels) > 60, labels
    control = Transcript()  # the search itself works: it finds the secret the tenant file holds
    control.add("tenants.d/api.toml", tenant_file.read_bytes())
    assert control.leaks(s.forbidden())
    leaks = run.transcript.leaks(s.forbidden())
    assert not leaks, "secrets shown:\n" + "\n".join(leaks)


# -- the PostgreSQL password ---------------------------------------------------------------------


@pytest.mark.parametrize("source", ["url", "database_password_file", "env"])
async def test_no_database_password_is_ever_shown(
    source: str,
    tmp_path: Path,
    receiver: Receiver,
    process_factory: ProcessFactory,
    session: aiohttp.ClientSession,
    postgres_server: PostgresServer,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PostgreSQL password from each of its three places (the URL, database_password_file,
    $WEBHOOKD_DATABASE_PASSWORD), and a wrong one, through what shows the database: a reload
    onto it (`restart_needed`), a reload refused (the password set twice), the views and
    metrics after it, and `check` connecting with the right password, the wrong one, and both.

    The control: the role must log in with its password (SCRAM), and `check` connects.
    """
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    s = Secrets()
    right = "db-right-" + secrets.token_hex(12)
    wrong = "db-wrong-" + secrets.token_hex(12)
    role = "shown_" + secrets.token_hex(4)
    postgres_server.create_role(role, right)
    url = postgres_url.replace("postgresql://postgres@", f"postgresql://{role}@")
    (tmp_path / "secrets").mkdir()
    port = free_port()
    env = {PASSWORD_ENV: right} if source == "env" else {}

    def with_password(password: str, name: str) -> dict[str, Any]:
        """[daemon] keys that give `password` from `source` (the env's is set for all)."""
        if source == "url":
            return {"database": url.replace(f"{role}@", f"{role}:{password}@")}
        if source == "database_password_file":
            (tmp_path / "secrets" / name).write_text(password + "\n")
            (tmp_path / "secrets" / name).chmod(0o600)
            return {"database": url, "database_password_file": f"secrets/{name}"}
        return {"database": url}

    def write(file: str, **daemon: Any) -> str:
        document = {
            "daemon": {
                "database": "webhookd.db",
                "listen": f"127.0.0.1:{port}",
                "api_token": s.token,
                "allow_private_endpoints": True,
                "log_level": "debug",
                "log_format": "json",
                "shutdown_grace": 2.0,
                **daemon,
            },
            "tenants": {
                "inline": {"endpoint": receiver.url("/inline"), "secret": s.inline, "events": ["*"]}
            },
        }
        (tmp_path / file).write_text(tomli_w.dumps(document))
        return str(tmp_path / file)

    config = write("config.toml")  # SQLite: the daemon runs on it; PostgreSQL is a restart away
    process = process_factory(Path(config), env=env)
    await asyncio.to_thread(process.start)
    run = Scenario(s, session, process, Transcript(), {**os.environ, **env})
    await run.json("POST", "/v1/tenants/inline/webhooks", 202, json={"event": EVENT})
    await wait_for(lambda: len(receiver.at("/inline", ok_only=True)) == 1)

    # -- a reload onto PostgreSQL: a restart-only key, named -------------------------------------
    write("config.toml", **with_password(right, "right.password"))
    process_signal(process, signal.SIGHUP)
    await wait_for(lambda: run.logged("restart_needed") >= 1)
    assert "database" in log_events(process, "restart_needed")[0]["keys"]

    # -- check: the right password, a wrong one, the password set twice --------------------------
    output = await run.cli("check", "-c", config)
    assert "reachable" in output, output
    wrong_config = write("wrong.toml", **with_password(wrong, "w.password"))
    run.env = {**os.environ, PASSWORD_ENV: wrong} if source == "env" else run.env
    output = await run.cli("check", "-c", wrong_config, expect=1)
    assert "password authentication failed" in output, output
    run.env = {**os.environ, **env}
    twice = with_password(right, "twice.password")
    if source == "url":
        (tmp_path / "secrets" / "other.password").write_text(wrong + "\n")
        twice["database_password_file"] = "secrets/other.password"
    else:
        twice["database"] = url.replace(f"{role}@", f"{role}:{wrong}@")
    output = await run.cli("check", "-c", write("twice.toml", **twice), expect=1)
    assert "the password is set in 2 places" in output, output

    # -- a reload refused for the same mistake; the views after it --------------------------------
    write("config.toml", **twice)
    process_signal(process, signal.SIGHUP)
    await wait_for(lambda: run.logged("reload_rejected") >= 1)
    for path in ("/v1/status", "/v1/status?format=text", "/v1/tenants", "/v1/tenants/inline"):
        await run.call("GET", path)
    await run.call("GET", "/metrics")
    await run.call("GET", "/healthz", token=None)
    await run.cli("status", "-c", config)
    assert await asyncio.to_thread(process.terminate) == 0

    # -- the search -------------------------------------------------------------------------------
    run.transcript.add("daemon.log", process.log_path.read_bytes())
    forbidden = {**text_forms("the password", right), **text_forms("a wrong password", wrong)}
    control = Transcript()  # the search finds the password where it is kept
    control.add(
        "the configuration",
        b"".join(
            p.read_bytes()
            for p in tmp_path.rglob("*")
            if p.is_file() and p.suffix in (".toml", ".password")
        ),
    )
    assert control.leaks(forbidden)
    leaks = run.transcript.leaks(forbidden)
    assert not leaks, "database password shown:\n" + "\n".join(leaks)


def process_signal(process: Process, signum: int) -> None:
    assert process.proc is not None
    process.proc.send_signal(signum)
