"""Reloading the configuration (SIGHUP, or `Service.reload()` in-process) and what it changes.

docs/configuration.md#reloading: added tenants start, removed ones stop (queue kept, `orphaned`),
changed ones apply from their next attempt; an invalid file keeps the running configuration;
restart-only `[daemon]` keys are named in a warning. Also §4 (enabled vs paused, the event filter)
and `source_address`, which are configuration behaviour seen on the wire.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import (
    Daemon,
    Process,
    Receiver,
    StartDaemon,
    free_port,
    tenant,
    wait_for,
    write_config,
)

EVENT = "CHECK_COMPLETED"


pytestmark = pytest.mark.usefixtures("restore_structlog")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def log_events(process: Process, event: str | None = None) -> list[dict[str, Any]]:
    """The subprocess's JSON log lines (optionally only one event), oldest first."""
    found = []
    for line in process.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and (event is None or entry.get("event") == event):
            found.append(entry)
    return found


def items(count: int, start: int = 0, event: str = EVENT) -> list[dict[str, Any]]:
    return [{"event": event, "data": {"n": n}} for n in range(start, start + count)]


# -- one scenario, two ways to reload ------------------------------------------------------------


@dataclass
class Deployment:
    """The config file of a running daemon; rewritten with the same listen address."""

    path: Path
    listen: str
    log_level: str

    def write(
        self,
        tenants: dict[str, dict[str, Any]],
        *,
        daemon: dict[str, Any] | None = None,
        delivery: dict[str, Any] | None = None,
        events: dict[str, Any] | None = None,
    ) -> None:
        write_config(
            self.path.parent,
            tenants,
            daemon={"listen": self.listen, "log_level": self.log_level, **(daemon or {})},
            delivery=delivery,
            events=events,
            name=self.path.name,
        )


class Target:
    """A running daemon, in-process or as a subprocess, driven through its HTTP API."""

    async def request(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        raise NotImplementedError

    async def reload(self) -> None:
        raise NotImplementedError

    async def ingest(self, name: str, body: Any) -> list[dict[str, Any]]:
        status, answer = await self.request("POST", f"/v1/tenants/{name}/webhooks", body)
        assert status == 202, (status, answer)
        webhooks: list[dict[str, Any]] = answer["webhooks"]
        return webhooks

    async def status(self, name: str) -> dict[str, Any]:
        status, answer = await self.request("GET", f"/v1/tenants/{name}/status")
        assert status == 200, (status, answer)
        result: dict[str, Any] = answer
        return result


class InProcess(Target):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def request(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        return await self.daemon.request(method, path, json=json)

    async def reload(self) -> None:
        assert await self.daemon.service.reload()


class Subprocess(Target):
    def __init__(self, process: Process, session: aiohttp.ClientSession) -> None:
        self.process = process
        self.session = session

    async def request(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        return await call(self.session, self.process, method, path, json)

    async def reload(self) -> None:
        """SIGHUP, then wait until the daemon logged that the reload was applied."""
        before = len(log_events(self.process, "reloaded"))
        assert self.process.proc is not None
        self.process.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: len(log_events(self.process, "reloaded")) > before, timeout=10)


async def call(
    session: aiohttp.ClientSession, process: Process, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with session.request(method, process.base + path, json=body) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


Deploy = Callable[..., Awaitable[tuple[Target, Deployment]]]


@pytest.fixture(params=["in-process", "subprocess"])
async def deploy(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_daemon: StartDaemon,
    process_factory: Callable[..., Process],
    http: aiohttp.ClientSession,
) -> Deploy:
    """Start a daemon from `tenants`; reload it with `Target.reload()` after `Deployment.write`."""

    async def start(tenants: dict[str, dict[str, Any]], **kwargs: Any) -> tuple[Target, Deployment]:
        # The subprocess logs at info so that each applied reload ("reloaded") can be awaited.
        level = "info" if request.param == "subprocess" else "warning"
        deployment = Deployment(tmp_path / "config.toml", f"127.0.0.1:{free_port()}", level)
        deployment.write(tenants, **kwargs)
        if request.param == "in-process":
            return InProcess(await start_daemon(deployment.path)), deployment
        process = process_factory(deployment.path)
        process.start()
        return Subprocess(process, http), deployment

    return start


# -- added, removed, re-added --------------------------------------------------------------------


async def test_reload_adds_removes_and_restores_tenants(receiver: Receiver, deploy: Deploy) -> None:
    receiver.always("/beta", 503)
    # Short, bounded backoff so that beta is retried promptly once it is back.
    quick = {"retry_base": 0.05, "retry_doublings": 2, "retry_after_doublings": 0.2}
    alpha = tenant(receiver.url("/alpha"))
    beta = tenant(receiver.url("/beta"), **quick)
    target, deployment = await deploy({"alpha": alpha, "beta": beta})

    status, _ = await target.request("POST", "/v1/tenants/gamma/webhooks", {"event": EVENT})
    assert status == 404
    queued = await target.ingest("beta", items(5))
    assert [w["sequence"] for w in queued] == [1, 2, 3, 4, 5]
    await wait_for(lambda: len(receiver.at("/beta")) >= 2)  # failing: it waits in backoff

    # gamma added, beta removed.
    deployment.write({"alpha": alpha, "gamma": tenant(receiver.url("/gamma"))})
    await target.reload()
    answer = await target.ingest("gamma", items(3))
    assert [w["status"] for w in answer] == ["queued"] * 3
    await wait_for(lambda: len(receiver.sequences("/gamma")) == 3)
    assert receiver.sequences("/gamma") == [1, 2, 3]

    orphan = await wait_for(
        lambda: _status_when(target, "beta", lambda s: not s["in_flight"]), timeout=5
    )
    assert (orphan["queue"], orphan["waiting"], orphan["enabled"]) == ("orphaned", 5, False)
    status, everything = await target.request("GET", "/v1/status")
    assert status == 200
    assert {t["tenant"]: t["queue"] for t in everything["tenants"]}["beta"] == "orphaned"
    status, body = await target.request("POST", "/v1/tenants/beta/webhooks", {"event": EVENT})
    assert (status, body["error"]) == (404, "not_found")
    # No attempt starts for an orphan, although its endpoint now answers 200.
    attempts = len(receiver.at("/beta"))
    receiver.always("/beta", 200)
    await asyncio.sleep(0.5)  # let time pass: nothing may be sent
    assert len(receiver.at("/beta")) == attempts
    kept = await target.request("GET", "/v1/tenants/beta/webhooks?limit=10")
    assert [w["sequence"] for w in kept[1]["webhooks"]] == [1, 2, 3, 4, 5]

    # beta back: delivery resumes where it stopped, in order, each webhook once.
    deployment.write({"alpha": alpha, "beta": beta, "gamma": tenant(receiver.url("/gamma"))})
    await target.reload()
    await wait_for(lambda: len(receiver.sequences("/beta")) == 5)
    later = await target.ingest("beta", items(2, start=5))
    assert [w["sequence"] for w in later] == [6, 7]
    await wait_for(lambda: len(receiver.sequences("/beta")) == 7)
    delivered = [w for r in receiver.at("/beta", ok_only=True) for w in r.webhooks]
    assert [w["sequence"] for w in delivered] == [1, 2, 3, 4, 5, 6, 7]
    assert [w["data"]["n"] for w in delivered] == list(range(7))
    # The receiver sees each 200 before the daemon records it: wait for the record.
    await wait_for(lambda: _status_when(target, "beta", lambda s: s["queue"] == "empty"))


async def test_tenant_removed_before_a_restart_and_added_back_continues_its_sequences(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    deployment = Deployment(tmp_path / "config.toml", f"127.0.0.1:{free_port()}", "warning")
    acme = tenant(receiver.url("/acme"))
    deployment.write({"acme": acme})
    daemon = await start_daemon(deployment.path)
    target = InProcess(daemon)
    await target.ingest("acme", items(3))
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2, 3])
    await wait_for(lambda: _status_when(target, "acme", lambda s: s["waiting"] == 0))
    deployment.write({})
    await target.reload()
    await daemon.server.stop()

    # Restarted without acme (its queue was empty), then acme is added back by a reload.
    target = InProcess(await start_daemon(deployment.path))
    deployment.write({"acme": acme})
    await target.reload()
    answer = await target.ingest("acme", items(1, start=3))
    assert answer[0]["sequence"] == 4  # never reused
    status = await target.status("acme")
    assert status["waiting"] == 1, status
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2, 3, 4], timeout=5)


async def _status_when(
    target: Target, name: str, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    status = await target.status(name)
    return status if predicate(status) else None


# -- changed -------------------------------------------------------------------------------------


async def test_changed_tenant_applies_from_its_next_attempt(
    receiver: Receiver, deploy: Deploy
) -> None:
    receiver.always("/old", 503)
    backoff = {"retry_base": 0.3, "retry_doublings": 1, "retry_after_doublings": 0.5}
    old = tenant(receiver.url("/old"), secret="old-secret", **backoff)
    target, deployment = await deploy({"acme": old})
    await target.ingest("acme", items(2))
    await wait_for(lambda: len(receiver.at("/old")) >= 1)

    # New endpoint, new secret, batching on: the webhooks in backoff go there, as a batch.
    new = tenant(
        receiver.url("/new"), secret="new-secret", batching=True, batch_window=0.1, **backoff
    )
    deployment.write({"acme": new})
    await target.reload()
    await wait_for(lambda: len(receiver.sequences("/new")) == 2, timeout=5)
    first_new = receiver.at("/new")[0]
    assert first_new.status == 200
    assert isinstance(first_new.json, list), "batching on: the body is an array"
    assert receiver.sequences("/new") == [1, 2]
    assert first_new.headers["Authorization"] == "Bearer new-secret"
    assert {w["secret"] for w in first_new.webhooks} == {"new-secret"}
    # Only an attempt already in flight at the reload may still have gone to /old.
    assert all(r.at < first_new.at for r in receiver.at("/old"))

    # Batching off again: the next webhook goes alone, as one object.
    deployment.write({"acme": {**new, "batching": False}})
    await target.reload()
    answer = await target.ingest("acme", items(1, start=2))
    assert answer[0]["sequence"] == 3
    await wait_for(lambda: len(receiver.sequences("/new")) == 3)
    last = receiver.at("/new")[-1]
    assert isinstance(last.json, dict), "batching off: the body is one object"
    assert (last.json["sequence"], last.json["secret"]) == (3, "new-secret")
    assert receiver.sequences("/new") == [1, 2, 3]
    assert all(w["secret"] == "old-secret" for r in receiver.at("/old") for w in r.webhooks)


async def test_attempts_in_flight_during_a_reload_are_recorded_not_resent(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    release = asyncio.Event()

    async def hold(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="ok")

    receiver.script("/old", hold)
    receiver.script("/gone", hold)
    deployment = Deployment(tmp_path / "config.toml", f"127.0.0.1:{free_port()}", "warning")
    deployment.write({"acme": tenant(receiver.url("/old")), "gone": tenant(receiver.url("/gone"))})
    daemon = await start_daemon(deployment.path)
    target = InProcess(daemon)
    await target.ingest("acme", items(3))
    await target.ingest("gone", items(3))
    workers = daemon.service.workers
    await wait_for(lambda: workers["acme"].in_flight and workers["gone"].in_flight)

    # acme changes endpoint and gone is removed while both have an attempt in flight.
    deployment.write({"acme": tenant(receiver.url("/new"))})
    await target.reload()
    release.set()
    await wait_for(lambda: receiver.sequences("/new") == [2, 3])
    assert receiver.sequences("/old") == [1]
    gone = await wait_for(
        lambda: _status_when(target, "gone", lambda s: not s["in_flight"] and s["waiting"] == 2)
    )
    assert gone["queue"] == "orphaned"
    await asyncio.sleep(0.3)  # let time pass: nothing more may be sent
    assert receiver.sequences("/gone") == [1]
    assert receiver.sequences("/new") == [2, 3]


async def test_allow_private_endpoints_applies_at_once_on_reload(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    deployment = Deployment(tmp_path / "config.toml", f"127.0.0.1:{free_port()}", "warning")
    tenants = {"acme": tenant(receiver.url("/acme"))}
    deployment.write(tenants)
    target = InProcess(await start_daemon(deployment.path))
    await target.ingest("acme", items(1))
    await wait_for(lambda: receiver.sequences("/acme") == [1])
    await wait_for(lambda: _status_when(target, "acme", lambda s: s["waiting"] == 0))

    # Refused from the next attempt on, even though a kept-alive connection may be open.
    deployment.write(tenants, daemon={"allow_private_endpoints": False})
    await target.reload()
    await target.ingest("acme", items(1, start=1))
    outcome = await wait_for(
        lambda: _status_when(target, "acme", lambda s: s["recent_failures"] or not s["waiting"])
    )
    assert receiver.sequences("/acme") == [1], "sent to a loopback address after it was refused"
    assert outcome["recent_failures"][0]["error"].startswith("blocked"), outcome

    deployment.write(tenants)
    await target.reload()
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2], timeout=5)


# -- a rejected reload ---------------------------------------------------------------------------


async def test_invalid_reload_keeps_the_running_configuration(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    http: aiohttp.ClientSession,
) -> None:
    deployment = Deployment(tmp_path / "config.toml", f"127.0.0.1:{free_port()}", "info")
    deployment.write({"acme": tenant(receiver.url("/acme"))})
    process = process_factory(deployment.path)
    process.start()
    target = Subprocess(process, http)

    # Invalid in two places; the valid-looking change (/elsewhere) must not apply either.
    deployment.write(
        {"acme": tenant(receiver.url("/elsewhere")), "broken": tenant("ftp://example.com/x")},
        daemon={"colour": "blue"},
    )
    assert process.proc is not None
    process.proc.send_signal(signal.SIGHUP)
    rejected = await wait_for(lambda: log_events(process, "reload_rejected"), timeout=10)
    await wait_for(lambda: len(log_events(process, "reload_rejected")) >= 2)
    errors = [e["error"] for e in log_events(process, "reload_rejected")]
    source = str(deployment.path)
    assert f"{source}: tenants.broken.endpoint: not an http(s) URL" in errors, errors
    assert f"{source}: daemon.colour: unknown key" in errors, errors
    assert rejected[0]["level"] == "error"
    assert log_events(process, "reloaded") == []

    # Still running the old configuration: acme delivers to /acme; broken does not exist.
    await target.ingest("acme", items(1))
    await wait_for(lambda: receiver.sequences("/acme") == [1])
    status, _ = await target.request("POST", "/v1/tenants/broken/webhooks", {"event": EVENT})
    assert status == 404

    # Not TOML at all: rejected too, naming the file.
    deployment.path.write_text("[tenants.acme\nendpoint = ")
    process.proc.send_signal(signal.SIGHUP)
    await wait_for(
        lambda: any("not valid TOML" in e["error"] for e in log_events(process, "reload_rejected"))
    )
    last = log_events(process, "reload_rejected")[-1]["error"]
    assert last.startswith(f"{source}: not valid TOML"), last
    await target.ingest("acme", items(1, start=1))
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2])

    # The reload loop survived: a valid file applies.
    deployment.write({"acme": tenant(receiver.url("/elsewhere"))})
    await target.reload()
    await target.ingest("acme", items(1, start=2))
    await wait_for(lambda: receiver.sequences("/elsewhere") == [3])
    assert receiver.sequences("/acme") == [1, 2]
    assert process.proc.poll() is None


# -- SIGHUP during start-up ----------------------------------------------------------------------


def sighup_mask(pid: int, field: str) -> bool:
    """Whether SIGHUP (signal 1: bit 0) is in /proc's `field` mask of the process's main
    thread: SigBlk (blocked), SigCgt (a handler is installed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return bool(int(line.split()[1], 16) & 1 << (signal.SIGHUP - 1))
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def sighups_during_start_up(
    directory: Path,
    offsets: list[float],
    receiver: Receiver,
    process_factory: Callable[..., Process],
    http: aiohttp.ClientSession,
) -> list[bool]:
    """Spawn a daemon, change its file, send SIGHUP `offsets` seconds after the spawn; check
    it lives, becomes ready, applies the change and stops cleanly. For each signal: whether
    it came before the daemon's handler was in place."""
    deployment = Deployment(directory / "config.toml", f"127.0.0.1:{free_port()}", "info")
    deployment.write({"a": tenant(receiver.url("/a"))})
    process = process_factory(deployment.path)
    spawned = time.monotonic()
    process.spawn()
    proc = process.proc
    assert proc is not None
    pid = proc.pid
    # Only the interpreter's own start-up comes before the hold (a few tens of ms idle,
    # more under load): a signal before that would end any Python program.
    try:
        await wait_for(lambda: proc.poll() is not None or sighup_mask(pid, "SigBlk"), 10, 0.001)
    except AssertionError:
        raise AssertionError("SIGHUP is never held: one during start-up ends the daemon") from None
    assert proc.poll() is None, process.log()
    deployment.write({"a": tenant(receiver.url("/a")), "b": tenant(receiver.url("/b"))})
    before_handler = []
    for offset in offsets:
        await asyncio.sleep(max(0.0, spawned + offset - time.monotonic()))
        before_handler.append(not sighup_mask(pid, "SigCgt"))
        proc.send_signal(signal.SIGHUP)

    await asyncio.to_thread(process.wait_listening)
    await wait_for(lambda: log_events(process, "reloaded"), timeout=10)
    assert proc.poll() is None
    events = [e["event"] for e in log_events(process) if e["event"] in ("started", "reloaded")]
    assert events[0] == "started", events  # the reload came once the daemon was ready
    target = Subprocess(process, http)
    assert [(await target.status(name))["tenant"] for name in ("a", "b")] == ["a", "b"]
    # Released once ready, not left blocked: a later SIGHUP reloads as usual.
    await target.reload()
    assert not sighup_mask(pid, "SigBlk")
    assert await asyncio.to_thread(process.terminate) == 0
    return before_handler


async def test_a_sighup_during_start_up_is_held_and_applied_once_ready(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    http: aiohttp.ClientSession,
) -> None:
    """SIGHUP's default action ends a process. Sent 50 to 200 ms after the daemon was spawned
    (alone, or several in a row), while it is still importing and starting, it must neither
    kill it nor be lost: the daemon holds it from its first line and reloads once ready."""
    before_handler = []
    for run, offsets in enumerate([[0.05], [0.1], [0.15], [0.2], [0.05, 0.06, 0.08, 0.12, 0.2]]):
        directory = tmp_path / f"run{run}"
        directory.mkdir()
        before_handler += await sighups_during_start_up(
            directory, offsets, receiver, process_factory, http
        )
    # The signals went to the window that used to be fatal (most, if not all, of them).
    assert any(before_handler), before_handler


# -- [daemon] keys -------------------------------------------------------------------------------


async def test_restart_only_key_warns_and_log_level_applies_at_once(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    http: aiohttp.ClientSession,
) -> None:
    deployment = Deployment(tmp_path / "config.toml", f"127.0.0.1:{free_port()}", "warning")
    tenants = {"acme": tenant(receiver.url("/acme"))}
    deployment.write(tenants)
    process = process_factory(deployment.path)
    process.start()
    target = Subprocess(process, http)
    await target.ingest("acme", items(1))
    await wait_for(lambda: receiver.sequences("/acme") == [1])
    assert await wait_for(lambda: _status_when(target, "acme", lambda s: s["waiting"] == 0))
    assert log_events(process, "delivered") == []  # info lines are below "warning"

    deployment.log_level = "info"
    deployment.write(tenants, daemon={"max_connections": 50})
    assert process.proc is not None
    process.proc.send_signal(signal.SIGHUP)
    warning = (await wait_for(lambda: log_events(process, "restart_needed"), timeout=10))[0]
    assert warning["keys"] == ["max_connections"]
    assert warning["level"] == "warning"

    # log_level applied at once: the next delivery is logged at info.
    await target.ingest("acme", items(1, start=1))
    delivered = (await wait_for(lambda: log_events(process, "delivered"), timeout=10))[0]
    assert (delivered["tenant"], delivered["first_sequence"]) == ("acme", 2)
    assert delivered["level"] == "info"


async def test_restart_needed_is_logged_when_the_same_reload_raises_log_verbosity(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    http: aiohttp.ClientSession,
) -> None:
    """docs/configuration.md#reloading: "`[daemon]` keys other than `log_level`, `log_format` and
    `allow_private_endpoints` take effect at the next restart; a reload that changes them logs
    a warning naming them." README (Configuration): "(a reload that changes them logs
    `restart_needed` naming them)".

    An operator runs quietly with `log_level = "error"`, then edits config.toml to
    `log_level = "info"` and `max_connections = 50` and reloads, expecting to see what the
    reload did. The new level is applied before `restart_needed` (and any `config_warning`)
    is logged: under the old "error" level the warning would be filtered out while the
    `reloaded` line right after it (at info) is written, and the operator would believe
    max_connections is now 50.
    """
    listen = f"127.0.0.1:{free_port()}"
    tenants = {"acme": tenant(receiver.url("/acme"))}
    config = write_config(tmp_path, tenants, daemon={"listen": listen, "log_level": "error"})
    process = process_factory(config)
    await asyncio.to_thread(process.start)

    write_config(
        tmp_path,
        tenants,
        daemon={"listen": listen, "log_level": "info", "max_connections": 50},
    )
    await Subprocess(process, http).reload()  # "reloaded" is at info: the new level is in force
    warned = log_events(process, "restart_needed")
    assert warned and warned[-1]["keys"] == ["max_connections"], (
        "no restart_needed warning for max_connections; log:\n" + process.log()
    )


async def test_changing_tenants_dir_by_reload_does_not_drop_api_tenants_before_the_restart(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    http: aiohttp.ClientSession,
) -> None:
    """docs/configuration.md#reloading: "`[daemon]` keys other than `log_level`, `log_format` and
    `allow_private_endpoints` take effect at the next restart; a reload that changes them logs
    a warning naming them." docs/http-api.md: `PUT /v1/tenants/{t}` is "written to
    `tenants_dir/{t}.toml` ..., applied live".

    An operator prepares a move of the tenant files by setting `tenants_dir = "moved.d"`
    (still empty) in config.toml and runs `systemctl reload webhookd`. The daemon logs
    `restart_needed keys=["tenants_dir"]` and keeps reading the old folder until the
    restart. Were the tenants taken from the new folder at once, every API-made tenant of
    the old one would stop (orphaned) while `daemon.tenants_dir` kept the old value: a
    tenant PUT afterwards (answered 201) would be written to the old folder, and the next
    reload, for any reason, would silently remove it again.
    """
    (tmp_path / "tenants.d").mkdir()
    (tmp_path / "moved.d").mkdir()
    beta = tmp_path / "tenants.d" / "beta.toml"
    beta.write_text(f'endpoint = "{receiver.url("/beta")}"\nsecret = "s3cr3t"\nevents = ["*"]\n')
    beta.chmod(0o600)
    listen = f"127.0.0.1:{free_port()}"
    tenants = {"acme": tenant(receiver.url("/acme"))}
    daemon = {"listen": listen, "log_level": "info", "tenants_dir": "tenants.d"}
    config = write_config(tmp_path, tenants, daemon=daemon)
    process = process_factory(config)
    await asyncio.to_thread(process.start)
    target = Subprocess(process, http)
    status, _ = await call(http, process, "GET", "/v1/tenants/beta")
    assert status == 200

    write_config(tmp_path, tenants, daemon={**daemon, "tenants_dir": "moved.d"})
    await target.reload()
    warned = log_events(process, "restart_needed")
    assert warned and "tenants_dir" in warned[-1]["keys"], warned

    # An operator creates a tenant through the API before the restart: 201.
    gamma = tenant(receiver.url("/gamma"))
    status, body = await call(http, process, "PUT", "/v1/tenants/gamma", gamma)
    assert status == 201, body
    # Any later reload (another tenant's secret rotated, say).
    await target.reload()

    found = {}
    for name in ("beta", "gamma"):
        found[name], _ = await call(http, process, "GET", f"/v1/tenants/{name}")
    assert found == {"beta": 200, "gamma": 200}, (
        f"tenants after a reload that only warned 'restart_needed: tenants_dir': {found}"
    )


# -- reload under load ---------------------------------------------------------------------------


async def test_reloads_under_sustained_ingest_lose_and_duplicate_nothing(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    http: aiohttp.ClientSession,
) -> None:
    per_tenant, chunk = 1000, 10
    deployment = Deployment(tmp_path / "config.toml", f"127.0.0.1:{free_port()}", "info")
    batched = {"batching": True, "batch_size": 50}

    def config(flip: bool) -> dict[str, dict[str, Any]]:
        return {
            "alpha": tenant(receiver.url("/alpha-2" if flip else "/alpha-1")),
            "beta": tenant(receiver.url("/beta")),
            "gamma": tenant(receiver.url("/gamma"), **batched, batch_window=0.3 if flip else 0.05),
        }

    paths = {"alpha": ["/alpha-1", "/alpha-2"], "beta": ["/beta"], "gamma": ["/gamma"]}
    deployment.write(config(False))
    process = process_factory(deployment.path)
    process.start()
    target = Subprocess(process, http)
    acknowledged: dict[str, list[int]] = {name: [] for name in paths}

    async def produce(name: str) -> None:
        for start in range(0, per_tenant, chunk):
            answer = await target.ingest(name, items(chunk, start=start))
            assert {w["status"] for w in answer} == {"queued"}
            acknowledged[name].extend(w["sequence"] for w in answer)
            await asyncio.sleep(0.03)  # pacing: about 3 s of steady ingest

    async def reload_repeatedly() -> None:
        for n in range(10):
            await asyncio.sleep(0.25)  # pacing between reloads
            deployment.write(config(n % 2 == 0))
            await target.reload()

    started = time.monotonic()
    await asyncio.gather(reload_repeatedly(), *(produce(name) for name in paths))
    ingest_s = time.monotonic() - started

    def delivered(name: str) -> list[dict[str, Any]]:
        ok = sorted(
            (r for path in paths[name] for r in receiver.at(path, ok_only=True)),
            key=lambda r: r.at,
        )
        return [w for r in ok for w in r.webhooks]

    await wait_for(
        lambda: all(len(delivered(name)) >= per_tenant for name in paths), timeout=60, interval=0.1
    )
    assert len(log_events(process, "reloaded")) == 10
    assert log_events(process, "reload_rejected") == []
    assert [r for r in receiver.requests if r.status != 200] == []
    for name in paths:
        webhooks = delivered(name)
        assert sorted(acknowledged[name]) == list(range(1, per_tenant + 1)), name
        sequences = [w["sequence"] for w in webhooks]
        assert sequences == list(range(1, per_tenant + 1)), (name, _anomalies(sequences))
        assert [w["data"]["n"] for w in webhooks] == list(range(per_tenant)), name
    # Both endpoint paths took part, so the reloads really switched alpha mid-stream.
    assert receiver.at("/alpha-1") and receiver.at("/alpha-2")
    assert ingest_s < 30


def _anomalies(sequences: list[int]) -> dict[str, list[int]]:
    seen: set[int] = set()
    duplicates = []
    for sequence in sequences:
        if sequence in seen:
            duplicates.append(sequence)
        seen.add(sequence)
    missing = sorted(set(range(1, max(sequences, default=0) + 1)) - seen)
    return {"duplicates": duplicates[:20], "missing": missing[:20]}


# -- enabled = false -----------------------------------------------------------------------------


async def test_disabling_by_reload_keeps_the_queue_and_enabling_delivers_it(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    deployment = Deployment(tmp_path / "config.toml", f"127.0.0.1:{free_port()}", "warning")
    deployment.write({"acme": tenant(receiver.url("/acme"))})
    daemon = await start_daemon(deployment.path)
    target = InProcess(daemon)
    status, _ = await target.request("POST", "/v1/tenants/acme/pause")
    assert status == 200
    await target.ingest("acme", items(4))

    deployment.write({"acme": tenant(receiver.url("/acme"), enabled=False)})
    await target.reload()
    status, _ = await target.request("POST", "/v1/tenants/acme/resume")  # only `enabled` holds
    assert status == 200
    answer = await target.ingest("acme", [{"event": EVENT, "id": "late"}, {"event": EVENT}])
    assert answer == [
        {"id": "late", "sequence": None, "status": "disabled"},
        {"id": None, "sequence": None, "status": "disabled"},
    ]
    disabled = await target.status("acme")
    assert (disabled["queue"], disabled["waiting"], disabled["enabled"]) == ("disabled", 4, False)
    await asyncio.sleep(0.4)  # let time pass: nothing may be sent
    assert receiver.requests == []
    _, peek = await target.request("GET", "/v1/tenants/acme/webhooks?limit=10")
    assert [(w["sequence"], w["data"]["n"]) for w in peek["webhooks"]] == [
        (1, 0),
        (2, 1),
        (3, 2),
        (4, 3),
    ]

    deployment.write({"acme": tenant(receiver.url("/acme"))})
    await target.reload()
    await wait_for(lambda: len(receiver.sequences("/acme")) == 4)
    assert [r.json["data"]["n"] for r in receiver.at("/acme")] == [0, 1, 2, 3]
    answer = await target.ingest("acme", items(1, start=4))
    assert answer[0]["sequence"] == 5  # the refused ones took no number
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2, 3, 4, 5])


# -- the event catalogue -------------------------------------------------------------------------


async def test_event_catalogue_deprecated_custom_and_unknown_types(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: Callable[..., Process],
    http: aiohttp.ClientSession,
) -> None:
    deployment = Deployment(tmp_path / "config.toml", f"127.0.0.1:{free_port()}", "info")
    legacy_events = ["PROFILE_STATUS_CHANGED", "COLLECTED_DATA_UPDATED", "CHECK_COMPLETED"]
    tenants = {
        "legacy": tenant(receiver.url("/legacy"), events=legacy_events),
        "every": tenant(receiver.url("/every"), events=["*"]),
    }
    deployment.write(tenants, events={"custom": ["INVOICE_PAID"]})
    process = process_factory(deployment.path)
    process.start()
    target = Subprocess(process, http)

    warnings = [e["warning"] for e in log_events(process, "config_warning")]
    source = str(deployment.path)
    assert f"{source}: tenants.legacy.events: PROFILE_STATUS_CHANGED is deprecated" in warnings
    assert (
        f"{source}: tenants.legacy.events: COLLECTED_DATA_UPDATED is deprecated; "
        "use COLLECTED_DATA_CHANGED"
    ) in warnings

    # Deprecated types still deliver for a tenant that lists them; others are not_subscribed.
    answer = await target.ingest(
        "legacy",
        [
            {"event": "PROFILE_STATUS_CHANGED"},
            {"event": "TASK_CREATED"},
            {"event": "COLLECTED_DATA_UPDATED"},
            {"event": "INVOICE_PAID"},
        ],
    )
    assert [(w["status"], w["sequence"]) for w in answer] == [
        ("queued", 1),
        ("not_subscribed", None),
        ("queued", 2),
        ("not_subscribed", None),
    ]
    await wait_for(lambda: receiver.sequences("/legacy") == [1, 2])
    assert [r.json["event"] for r in receiver.at("/legacy")] == [
        "PROFILE_STATUS_CHANGED",
        "COLLECTED_DATA_UPDATED",
    ]

    # "*" covers the custom type, and not the deprecated ones.
    answer = await target.ingest(
        "every", [{"event": "INVOICE_PAID"}, {"event": "PROFILE_STATUS_CHANGED"}]
    )
    assert [w["status"] for w in answer] == ["queued", "not_subscribed"]
    await wait_for(lambda: receiver.sequences("/every") == [1])
    assert receiver.at("/every")[0].json["event"] == "INVOICE_PAID"

    # Not in the catalogue: 422, and nothing of the request is queued.
    status, body = await target.request(
        "POST", "/v1/tenants/every/webhooks", [{"event": EVENT}, {"event": "REFUND_ISSUED"}]
    )
    assert (status, body["error"]) == (422, "unknown_event")
    assert "REFUND_ISSUED" in body["detail"]

    # A reload that declares it makes it ingestible, and "*" covers it at once.
    deployment.write(tenants, events={"custom": ["INVOICE_PAID", "REFUND_ISSUED"]})
    await target.reload()
    answer = await target.ingest("every", [{"event": EVENT}, {"event": "REFUND_ISSUED"}])
    assert [(w["status"], w["sequence"]) for w in answer] == [("queued", 2), ("queued", 3)]
    await wait_for(lambda: receiver.sequences("/every") == [1, 2, 3])
    assert [r.json["event"] for r in receiver.at("/every")][1:] == [EVENT, "REFUND_ISSUED"]


# -- source_address ------------------------------------------------------------------------------


async def test_source_address_per_tenant_and_daemon_wide(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    remotes: dict[str, list[str | None]] = {"/own": [], "/default": []}

    def recording(path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            remotes[path].append(request.remote)
            return web.Response(text="ok")

        return handle

    for path in remotes:
        receiver.always(path, recording(path))
    # Linux routes all of 127.0.0.0/8 to loopback, so these are real, distinct local sources.
    deployment = Deployment(tmp_path / "config.toml", f"127.0.0.1:{free_port()}", "warning")
    daemon_keys = {"source_address": "127.0.0.3"}
    own = tenant(receiver.url("/own"), source_address="127.0.0.2")
    deployment.write({"own": own, "default": tenant(receiver.url("/default"))}, daemon=daemon_keys)
    target = InProcess(await start_daemon(deployment.path))
    await target.ingest("own", items(2))
    await target.ingest("default", items(2))
    await wait_for(lambda: len(remotes["/own"]) == 2 and len(remotes["/default"]) == 2)
    assert remotes == {"/own": ["127.0.0.2"] * 2, "/default": ["127.0.0.3"] * 2}

    # A tenant's source_address is tenant configuration: a reload changes it for the next send.
    moved = {**own, "source_address": "127.0.0.4"}
    deployment.write(
        {"own": moved, "default": tenant(receiver.url("/default"))}, daemon=daemon_keys
    )
    await target.reload()
    await target.ingest("own", items(1, start=2))
    await wait_for(lambda: len(remotes["/own"]) == 3)
    assert remotes["/own"][-1] == "127.0.0.4"
