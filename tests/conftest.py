"""Shared fixtures: a real receiver on 127.0.0.1, real config files, an in-process daemon."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import tomli_w
import uvloop
from aiohttp import web

# The PostgreSQL fixtures, registered for every test file by importing them here.
from tests.postgres import postgres_server, postgres_url  # noqa: F401

# A deadline per test (tests/watchdog.py), registered here as a plugin hook.
from tests.watchdog import (  # noqa: F401
    pytest_configure,
    pytest_runtest_logreport,
    pytest_runtest_protocol,
    tracked,
)
from webhookd import config as config_mod
from webhookd import logs
from webhookd.config import TenantConfig
from webhookd.records import Webhook
from webhookd.scheduler import Clock
from webhookd.serve import Server
from webhookd.service import Service
from webhookd.store.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01
) -> Any:
    """Poll `condition` until it is truthy; fail the test after `timeout` seconds.

    The condition may be a coroutine function (a check that asks the daemon's API).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)


async def stop_server(server: asyncio.Server | None, tasks: set[asyncio.Task[Any]]) -> None:
    """Stop a raw asyncio server and cancel its connection handlers (`tasks`)."""
    assert server is not None
    server.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.wait_closed()


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    """An in-process reload reconfigures structlog globally; give later tests theirs back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    # webhookd.logs.Logger keeps the logger bound under the reload's configuration (and
    # its processor list, which capture_logs cannot reach) until told to rebuild it.
    logs._generation[0] += 1


# -- a real HTTP receiver ------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()
    status: int  # what we answered

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def webhooks(self) -> list[dict[str, Any]]:
        document = self.json
        return document if isinstance(document, list) else [document]


Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Receiver:
    """Records every request; answers 200 unless a path is scripted otherwise."""

    port: int = 0
    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[int | Behaviour]] = field(default_factory=dict)
    defaults: dict[str, int | Behaviour] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path: str, *answers: int | Behaviour) -> None:
        """Answer the next requests to `path` with these, in order, then the default."""
        self.scripts.setdefault(path, []).extend(answers)

    def always(self, path: str, answer: int | Behaviour) -> None:
        self.defaults[path] = answer

    def at(self, path: str, *, ok_only: bool = False) -> list[Received]:
        return [r for r in self.requests if r.path == path and (r.status == 200 or not ok_only)]

    def sequences(self, path: str, *, ok_only: bool = True) -> list[int]:
        return [w["sequence"] for r in self.at(path, ok_only=ok_only) for w in r.webhooks]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        queue = self.scripts.get(request.path)
        answer: int | Behaviour = queue.pop(0) if queue else self.defaults.get(request.path, 200)
        if isinstance(answer, int):
            response: web.StreamResponse = web.Response(status=answer, text="ok")
        else:
            response = await answer(request)
        self.requests.append(
            Received(request.path, dict(request.headers), body, time.monotonic(), response.status)
        )
        return response


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """In-process tests run on uvloop, as `webhookd run` does: its transports differ from
    asyncio's (they are not asyncio.Transport subclasses, and report errors their own way)."""
    return {"uvloop": lambda: tracked(uvloop.new_event_loop)}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/{path:.*}", recv.handle)
    # Handlers that hang on purpose are cancelled when the client gives up, and teardown
    # does not wait for them.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    recv.port = runner.addresses[0][1]
    yield recv
    await runner.cleanup()


# -- configuration -------------------------------------------------------------------------------


def tenant(endpoint: str, **overrides: Any) -> dict[str, Any]:
    """A tenant table with test-friendly defaults (any key may be overridden)."""
    table: dict[str, Any] = {"endpoint": endpoint, "secret": "s3cr3t", "events": ["*"]}
    table.update(overrides)
    return table


def write_config(
    directory: Path,
    tenants: dict[str, dict[str, Any]],
    *,
    daemon: dict[str, Any] | None = None,
    delivery: dict[str, Any] | None = None,
    events: dict[str, Any] | None = None,
    name: str = "config.toml",
) -> Path:
    raw: dict[str, Any] = {
        "daemon": {
            "database": "webhookd.db",
            "listen": f"127.0.0.1:{free_port()}",
            "allow_private_endpoints": True,
            "log_level": "warning",
            "shutdown_grace": 2.0,
            **(daemon or {}),
        },
        "delivery": {"retry_base": 0.05, **(delivery or {})},
        "tenants": tenants,
    }
    if events:
        raw["events"] = events
    path = directory / name
    path.write_text(tomli_w.dumps(raw))
    return path


def load_tenant(directory: Path, endpoint: str, **overrides: Any) -> TenantConfig:
    """The tenant "acme" as config.load builds it, for tests that drive a Sender directly."""
    path = write_config(directory, {"acme": tenant(endpoint, **overrides)})
    return config_mod.load(path).tenants["acme"]


def webhook(webhook_id: str = "evt-1") -> Webhook:
    """A queued webhook (sequence 1), as the store hands it to a Sender."""
    return Webhook(1, webhook_id, "CHECK_COMPLETED", time.time(), '{"n":1}')


# -- an in-process daemon ------------------------------------------------------------------------


class Daemon:
    """A started Server (a Service behind its API) plus an HTTP client pointed at the API."""

    def __init__(self, server: Server, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.service = server.service
        self.session = session
        d = self.service.config.daemon
        self.base = f"http://{d.listen_host}:{server.addresses[0][1]}"
        token = d.api_token.reveal()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def sqlite_store(self) -> SqliteStore:
        """The store as its SQLite engine, for tests of what only SQLite has (pragmas, files)."""
        store = self.service.store
        assert isinstance(store, SqliteStore), store
        return store

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with self.session.request(
            method, self.base + path, headers=headers, **kwargs
        ) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    async def ingest(self, tenant_name: str, items: Any, expect: int = 202) -> Any:
        status, body = await self.request("POST", f"/v1/tenants/{tenant_name}/webhooks", json=items)
        assert status == expect, (status, body)
        return body

    async def status(self, tenant_name: str) -> dict[str, Any]:
        status, body = await self.request("GET", f"/v1/tenants/{tenant_name}/status")
        assert status == 200, body
        return body  # type: ignore[no-any-return]


StartDaemon = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[StartDaemon]:
    """Start an in-process daemon from a config file; stopped at teardown."""
    started: list[Daemon] = []
    session = aiohttp.ClientSession()

    async def start(
        config_path: Path | None = None, *, clock: Clock | None = None, **kwargs: Any
    ) -> Daemon:
        path = config_path or write_config(tmp_path, **kwargs)
        server = Server(Service(config_mod.load(path), clock=clock))
        await server.start()
        daemon = Daemon(server, session)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        await daemon.server.stop()
    await session.close()


# -- the daemon as a subprocess ------------------------------------------------------------------


class Process:
    """`webhookd run` as a child process, for end-to-end, signal and kill -9 tests."""

    def __init__(
        self,
        config_path: Path,
        env: dict[str, str] | None = None,
        nofile: tuple[int, int] | None = None,
    ) -> None:
        self.config_path = config_path
        self.nofile = nofile  # (soft, hard) RLIMIT_NOFILE to start the child with
        self.config = config_mod.load(config_path)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config_path.parent / "daemon.log"

    @property
    def base(self) -> str:
        d = self.config.daemon
        return f"http://{d.listen_host}:{d.listen_port}"

    def start(self, timeout: float = 15.0) -> None:
        self.spawn()
        self.wait_listening(timeout)

    def spawn(self) -> None:
        """Start the child and return at once (start() also waits until it listens)."""
        command = [sys.executable, "-m", "webhookd", "run", "-c", str(self.config_path)]
        if self.nofile:
            # Set the limit, then become the daemon (exec keeps the pid and the limit).
            command[1:1] = [
                "-c",
                "import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, {self.nofile!r}); "
                "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
            ]
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(command, stdout=log, stderr=log, env=self.env)

    def wait_listening(self, timeout: float = 15.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection(
                    (self.config.daemon.listen_host, self.config.daemon.listen_port), 0.2
                ):
                    return
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"daemon did not listen within {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def process_factory() -> Iterator[Callable[..., Process]]:
    made: list[Process] = []

    def make(
        config_path: Path,
        env: dict[str, str] | None = None,
        nofile: tuple[int, int] | None = None,
    ) -> Process:
        process = Process(config_path, env, nofile)
        made.append(process)
        return process

    yield make
    for process in made:
        process.stop()
