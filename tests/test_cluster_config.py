"""Configuration across several instances on one PostgreSQL database: tenants made through
the tenant API live in the database (any instance writes them, every instance delivers and
shows them, a restart reads them back, a lost notification is caught by the tick), and the
main file's tenants are compared through a published digest (`config_mismatch`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from structlog.testing import capture_logs

from tests import test_cluster
from tests.conftest import Daemon, Process, Receiver, tenant, wait_for, write_config
from tests.postgres import PostgresServer
from tests.test_cluster import LEASE_S, StartInstance, instance_config, items
from webhookd import config as config_mod

SECRET = "hunter2-api-secret"
start_instance = test_cluster.start_instance  # the fixture: in-process instances


def configured(daemon: Daemon) -> set[str]:
    return set(daemon.service.config.tenants)


async def unknown(daemon: Daemon, name: str) -> bool:
    """The instance's status knows nothing of `name`."""
    status, _ = await daemon.request("GET", f"/v1/tenants/{name}/status")
    return status == 404 and name not in {t["tenant"] for t in daemon.service.status()["tenants"]}


async def put(daemon: Daemon, name: str, body: dict[str, Any]) -> tuple[int, Any]:
    return await daemon.request("PUT", f"/v1/tenants/{name}", json=body)


async def test_an_api_tenant_made_through_one_instance_is_shared_by_every_instance(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {"main": tenant(receiver.url("/main"))})
    a = await start_instance(instance_config(path, postgres_url))
    b = await start_instance(instance_config(path, postgres_url))

    status, body = await put(a, "acme", tenant(receiver.url("/acme"), secret=SECRET))
    assert status == 201, body
    assert body["source"] == "api" and body["secret"] == "***"
    # Known to the other instance within moments (its NOTIFY), with the secret kept.
    await wait_for(lambda: "acme" in configured(b), timeout=5)
    assert b.service.config.tenants["acme"].secret.reveal() == SECRET
    assert (await b.status("acme"))["queue"] == "empty"
    status, shown = await b.request("GET", "/v1/tenants/acme")
    assert (status, shown["source"], shown["secret"]) == (200, "api", "***")
    assert not (tmp_path / "tenants.d").exists()  # in the database, not tenants_dir

    # Delivered by whichever instance claims it, ingested through either.
    await wait_for(lambda: "acme" in held(a) | held(b), timeout=4 * LEASE_S)
    await b.ingest("acme", items("b", 2))
    await a.ingest("acme", items("a", 1))
    await wait_for(lambda: receiver.sequences("/acme") == [1, 2, 3], timeout=5)
    assert all(r.json["secret"] == SECRET for r in receiver.at("/acme"))

    # Replaced through B: 200, and A applies the change.
    status, body = await put(b, "acme", {**tenant(receiver.url("/acme2")), "secret": "***"})
    assert status == 200, body
    await wait_for(lambda: a.service.config.tenants["acme"].endpoint.endswith("/acme2"), timeout=5)
    assert a.service.config.tenants["acme"].secret.reveal() == SECRET

    # A tenant of the main file cannot be made through the API, on any instance.
    status, body = await put(b, "main", tenant(receiver.url("/x")))
    assert (status, body["error"]) == (409, "conflict")

    # Deleted through the instance that does not deliver it while a webhook waits
    # (undeliverable): refused, counted from the database; then discarded, and gone
    # everywhere, the owner's view of its queue included.
    owner, other = (a, b) if "acme" in held(a) else (b, a)
    receiver.always("/acme2", 503)
    await owner.ingest("acme", items("w", 1))
    await wait_for(lambda: len(receiver.at("/acme2")) >= 1, timeout=5)
    status, body = await other.request("DELETE", "/v1/tenants/acme")
    assert (status, body["error"]) == (409, "queue_not_empty"), body
    assert "1 webhook is waiting" in body["detail"]
    status, body = await other.request("DELETE", "/v1/tenants/acme?discard=true")
    assert (status, body) == (200, {"tenant": "acme", "deleted": True, "discarded": 1})
    await wait_for(lambda: "acme" not in configured(owner), timeout=5)
    sent = len(receiver.at("/acme2"))
    for daemon in (a, b):
        assert (await daemon.request("GET", "/v1/tenants/acme"))[0] == 404
        await daemon.ingest("acme", items("late", 1), expect=404)
    # Nothing left of it in either status (not an orphan with what one instance last saw).
    await wait_for(lambda: unknown(a, "acme"), timeout=5)
    await wait_for(lambda: unknown(b, "acme"), timeout=5)
    await asyncio.sleep(1.0)
    assert len(receiver.at("/acme2")) == sent  # no attempt since, on any instance


async def test_api_tenants_survive_a_restart_of_every_instance(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {})
    a = await start_instance(instance_config(path, postgres_url))
    b = await start_instance(instance_config(path, postgres_url))
    for name in ("acme", "globex"):
        status, body = await put(a, name, tenant(receiver.url(f"/{name}"), secret=SECRET))
        assert status == 201, body
    await wait_for(lambda: configured(b) == {"acme", "globex"}, timeout=5)
    await a.server.stop()
    await b.server.stop()

    c = await start_instance(instance_config(path, postgres_url))
    d = await start_instance(instance_config(path, postgres_url))
    for daemon in (c, d):
        assert configured(daemon) == {"acme", "globex"}
        assert daemon.service.config.tenants["acme"].secret.reveal() == SECRET
    await c.ingest("acme", items("after", 1))
    await d.ingest("globex", items("after", 1))
    await wait_for(
        lambda: receiver.sequences("/acme") == [1] and receiver.sequences("/globex") == [1],
        timeout=4 * LEASE_S,
    )


async def test_tenant_files_left_in_tenants_dir_are_not_read_and_said_so(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {})
    config_mod.write_tenant_file(tmp_path / "tenants.d", "old", tenant(receiver.url("/old")))
    with capture_logs() as logs:
        a = await start_instance(instance_config(path, postgres_url))
    assert configured(a) == set()
    [said] = [e for e in logs if e["event"] == "tenants_dir_not_read"]
    assert (said["tenants"], said["count"]) == (["old"], 1)
    assert "webhookd migrate" in said["detail"]


async def test_a_tenant_api_write_while_the_database_is_down_is_503_and_changes_nothing(
    tmp_path: Path,
    receiver: Receiver,
    postgres_server: PostgresServer,
    postgres_url: str,
    start_instance: StartInstance,
) -> None:
    path = write_config(tmp_path, {})
    a = await start_instance(instance_config(path, postgres_url))
    assert (await put(a, "acme", tenant(receiver.url("/acme"), secret=SECRET)))[0] == 201

    await asyncio.to_thread(postgres_server.stop)
    with capture_logs() as logs:
        status, body = await put(a, "globex", tenant(receiver.url("/g"), secret=SECRET))
        assert (status, body["error"]) == (503, "unavailable"), body
        assert body["detail"].startswith("tenant globex was not saved: the database ")
        status, body = await a.request("DELETE", "/v1/tenants/acme")
        assert (status, body["error"]) == (503, "unavailable"), body
    assert configured(a) == {"acme"}  # as stored: neither applied
    assert SECRET not in repr(logs) + repr(body)

    await asyncio.to_thread(postgres_server.start)
    assert (await put(a, "globex", tenant(receiver.url("/g"), secret=SECRET)))[0] == 201
    assert configured(a) == {"acme", "globex"}


async def test_an_api_tenant_change_whose_notification_is_lost_is_caught_by_the_tick(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    path = write_config(tmp_path, {})
    a = await start_instance(instance_config(path, postgres_url))
    b = await start_instance(instance_config(path, postgres_url))
    stored = config_mod.tenant_toml(tenant(receiver.url("/acme")))
    conn = await asyncpg.connect(postgres_url)
    try:
        # As an instance does, but without the NOTIFY: as if it was lost with a session.
        await conn.execute("INSERT INTO api_tenants (tenant, config) VALUES ('acme', $1)", stored)
        await conn.execute("INSERT INTO leases (tenant) VALUES ('acme')")
        await wait_for(
            lambda: "acme" in configured(a) and "acme" in configured(b), timeout=3 * LEASE_S
        )
        await b.ingest("acme", items("x", 1))
        await wait_for(lambda: receiver.sequences("/acme") == [1], timeout=4 * LEASE_S)

        await conn.execute("DELETE FROM api_tenants WHERE tenant = 'acme'")
        await wait_for(
            lambda: "acme" not in configured(a) and "acme" not in configured(b),
            timeout=3 * LEASE_S,
        )
    finally:
        await conn.close()


def held(daemon: Daemon) -> set[str]:
    cluster = daemon.service.cluster
    assert cluster is not None
    return {name for name in daemon.service.workers if cluster.holds(name)}


async def test_instances_whose_main_files_differ_show_a_config_mismatch_until_reloaded(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance: StartInstance
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same = {"acme": tenant(receiver.url("/acme"), secret=SECRET)}
    path_a = write_config(tmp_path / "a", same)
    path_b = write_config(tmp_path / "b", {"acme": tenant(receiver.url("/other"), secret=SECRET)})
    with capture_logs() as logs:
        a = await start_instance(instance_config(path_a, postgres_url))
        b = await start_instance(instance_config(path_b, postgres_url))
        id_a, id_b = (instance_id(d) for d in (a, b))

        async def mismatch(daemon: Daemon) -> Any:
            status, body = await daemon.request("GET", "/v1/status")
            assert status == 200, body
            return body["totals"]["config_mismatch"]

        await wait_for(lambda: mismatch(a), timeout=3 * LEASE_S)
        await wait_for(lambda: mismatch(b), timeout=3 * LEASE_S)
        assert await mismatch(a) == [id_b] and await mismatch(b) == [id_a]
        status, text = await a.request("GET", "/v1/status?format=text")
        assert (
            status == 200 and f"config_mismatch: the main file's tenants differ on {id_b}" in text
        )
        said = [e for e in logs if e["event"] == "config_mismatch"]
        assert {(e["instance"], tuple(e["instances"])) for e in said} == {
            (id_a, (id_b,)),
            (id_b, (id_a,)),
        }
        assert len(said) == 2  # once per change, not once per tick
        status, text = await a.request("GET", "/metrics")
        assert status == 200 and "\nwebhookd_config_mismatch 1.0\n" in text

        # B's file made the same as A's, then reloaded (SIGHUP): cleared on both at once.
        write_config(tmp_path / "b", same)
        assert await b.service.reload()
    # Captured again: a reload configures logging anew. The new digest is published at
    # once and both compare again at once, well within a tick.
    with capture_logs() as later:
        await wait_for(lambda: not mismatch_of(a) and not mismatch_of(b), timeout=LEASE_S / 2)
        assert await mismatch(a) == [] and await mismatch(b) == []
        await wait_for(
            lambda: len([e for e in later if e["event"] == "config_mismatch_cleared"]) == 2,
            timeout=LEASE_S,
        )
    cleared = {e["instance"] for e in later if e["event"] == "config_mismatch_cleared"}
    assert cleared == {id_a, id_b}
    status, text = await a.request("GET", "/metrics")
    assert status == 200 and "\nwebhookd_config_mismatch 0.0\n" in text
    assert SECRET not in repr(logs) + repr(later)
    conn = await asyncpg.connect(postgres_url)
    try:
        digests = await conn.fetch("SELECT config_digest FROM instances")
    finally:
        await conn.close()
    assert len({r["config_digest"] for r in digests}) == 1
    assert SECRET not in repr(digests)


def instance_id(daemon: Daemon) -> str:
    cluster = daemon.service.cluster
    assert cluster is not None
    return cluster.instance


def mismatch_of(daemon: Daemon) -> list[str]:
    cluster = daemon.service.cluster
    assert cluster is not None
    return cluster.mismatch


def test_the_digest_covers_what_delivers_and_reveals_no_secret(tmp_path: Path) -> None:
    def digest(**overrides: Any) -> str:
        table = tenant("https://hooks.example/a", **overrides)
        if "secret_file" in table:
            del table["secret"]
        path = write_config(tmp_path, {"acme": table})
        return config_mod.tenants_digest(config_mod.load(path))

    base = digest(secret=SECRET)
    assert SECRET not in base and len(base) == 64
    assert digest(secret=SECRET) == base
    assert digest(secret=SECRET + "x") != base
    assert digest(secret=SECRET, timeout=3.0) != base
    assert digest(secret=SECRET, events=["CHECK_COMPLETED"]) != base
    # Where a secret is read from may differ per host; its value may not.
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    assert digest(secret_file="secret.txt") == base
    # API tenants are shared through the database: not part of it.
    loaded = config_mod.load(write_config(tmp_path, {"acme": tenant("https://hooks.example/a")}))
    extra = dataclasses.replace(
        loaded.tenants["acme"], name="api", from_api=True, origin=Path("api_tenants/api")
    )
    with_api = dataclasses.replace(loaded, tenants={**loaded.tenants, "api": extra})
    assert config_mod.tenants_digest(with_api) == config_mod.tenants_digest(loaded)


async def test_daemons_on_one_database_compare_their_files_and_share_api_tenants(
    tmp_path: Path,
    receiver: Receiver,
    postgres_url: str,
    process_factory: Callable[..., Process],
) -> None:
    """As run: `webhookd run` twice, a real SIGHUP, logs as written."""
    same = {"main": tenant(receiver.url("/main"), secret=SECRET)}
    daemon = {"database": postgres_url, "lease_seconds": LEASE_S}
    paths = []
    for name, tenants in (("a", same), ("b", {"main": tenant(receiver.url("/other"))})):
        (tmp_path / name).mkdir()
        paths.append(write_config(tmp_path / name, tenants, daemon=daemon))
    a, b = (process_factory(path) for path in paths)
    a.start()
    b.start()
    async with aiohttp.ClientSession() as session:

        async def get(process: Process, path: str) -> Any:
            async with session.get(process.base + path) as response:
                assert response.status == 200, await response.text()
                return await response.json()

        async def found(process: Process, path: str) -> bool:
            async with session.get(process.base + path) as response:
                return response.status == 200

        async def mismatch(process: Process) -> list[str]:
            totals = (await get(process, "/v1/status"))["totals"]
            return totals["config_mismatch"]  # type: ignore[no-any-return]

        await wait_for(lambda: mismatch(a), timeout=3 * LEASE_S)
        await wait_for(lambda: mismatch(b), timeout=3 * LEASE_S)

        # A tenant made through one is the other's too.
        made = tenant(receiver.url("/acme"), secret=SECRET)
        async with session.put(a.base + "/v1/tenants/acme", json=made) as response:
            assert response.status == 201, await response.text()
        await wait_for(lambda: found(b, "/v1/tenants/acme"), timeout=5)

        # B's file made the same as A's (its own listen address kept), then SIGHUP.
        listen = config_mod.load(paths[1]).daemon.listen
        write_config(tmp_path / "b", same, daemon={**daemon, "listen": listen})
        assert b.proc is not None
        b.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: not_(mismatch(a)), timeout=2 * LEASE_S)
        await wait_for(lambda: not_(mismatch(b)), timeout=2 * LEASE_S)
    conn = await asyncpg.connect(postgres_url)
    try:
        ids = {r["pid"]: r["id"] for r in await conn.fetch("SELECT id, pid FROM instances")}
    finally:
        await conn.close()
    assert a.terminate() == 0 and b.terminate() == 0
    for process, other in ((a, b), (b, a)):
        events = [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]
        said = [e for e in events if e["event"].startswith("config_mismatch")]
        assert [e["event"] for e in said] == ["config_mismatch", "config_mismatch_cleared"], said
        assert other.proc is not None
        assert said[0]["instances"] == [ids[other.proc.pid]]
        assert SECRET not in process.log()


async def not_(value: Awaitable[Any]) -> bool:
    return not await value
