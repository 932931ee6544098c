"""Several webhookd on one PostgreSQL database: heartbeats, tenant leases, wake-ups.

Any instance queues webhooks for any tenant (the sequence counter is a locked row, so
sequences stay consecutive whoever ingests). Delivering is another matter: a tenant's
order holds only if one instance at a time sends its head. So each tenant has a lease row
(`leases`): an owner, a fencing token and an expiry.

- **Claiming.** Every tick (a third of `lease_seconds`), each instance renews its own
  leases and its heartbeat (`instances`), then counts the tenants and the live instances,
  and claims expired or free leases (`FOR UPDATE SKIP LOCKED`) up to its fair share,
  `ceil(tenants / instances)`, each claim bumping the token.
- **Fencing.** Every write of a delivery's outcome (acknowledge, failure, park) carries the
  token its instance claimed the tenant with, and the writer checks it against the lease
  row, locked `FOR SHARE` in the same transaction: a claim waits for that commit, and a
  write after a claim is refused (`LeaseLost`). An instance paused past its lease (SIGSTOP,
  a frozen VM) cannot record anything when it wakes; it stops that tenant's worker.
- **Knowing when not to send.** `holds` is false once a lease's renewal is older than the
  lease: the renewal's request left this process before the server stamped the expiry, so
  no other instance can have claimed it while `holds` is true, whatever the clocks say.
- **Rebalancing.** An instance holding more than its share hands the extra tenants over:
  their workers finish the attempt in flight, then the lease is freed and a NOTIFY tells
  the others to claim at once. A SIGTERM hands every lease back the same way.
- **Wake-ups.** A commit that queues webhooks sends `NOTIFY webhookd_queued` with it
  (announce.py): the tenant, its last sequence and, when they are small, the webhooks
  themselves; the owner's worker takes those, or reads them from the table. Each tick also
  asks which owned tenants' counters moved past what their workers know, so a notification
  lost with a dropped session delays a delivery by one tick at most.
- **Configuration.** Tenants made through the tenant API are rows of `api_tenants`; a write
  sends NOTIFY webhookd_cluster 'tenants', and every instance reads them again (each tick
  also checks a fingerprint of the table). Each instance publishes a digest of its main
  file's tenants with its heartbeat, and each tick lists the live instances whose digest
  differs (`mismatch`, logged as `config_mismatch` when it changes).

The cluster's statements run on a session of its own, beside the writer: renewing must not
queue behind a group commit, and LISTEN needs a session that stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from webhookd import logs
from webhookd.config import PostgresURL
from webhookd.records import Owner, StoreError
from webhookd.store.postgres import announce, connection
from webhookd.store.postgres.connection import CONNECT_ERRORS

if TYPE_CHECKING:
    from webhookd.store.postgres.connection import Connection
    from webhookd.store.protocol import Members

log = logs.get_logger("webhookd.cluster")

QUEUED = announce.CHANNEL
# Payload: why ("free", "joined", "tenants", "config"): every instance ticks now; but
# "discarded TENANT" only has the others read that removed tenant's state again.
CHANGED = "webhookd_cluster"
TICKS_PER_LEASE = 3
RENEW_CHUNK = 500  # leases renewed per commit (see _tick_locked)
RECONNECT_S = 1.0
# How many leases a handover may run at once: each waits for its attempt in flight.
RELEASING_MAX = 50

UPSERT_INSTANCE = """
    INSERT INTO instances (id, host, pid, api_url, config_digest)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), api_url = $4, config_digest = $5"""

# Only the leases this instance delivers (`held`): one it could not take up again (its
# state unreadable) lapses, and is claimed afresh, by any instance.
RENEW = """
    UPDATE leases SET expires_at = now() + make_interval(secs => $2)
    WHERE owner = $1 AND tenant = ANY($3::text[]) RETURNING tenant, fence"""

SURVEY = """
    SELECT (SELECT count(*) FROM leases) AS tenants,
           (SELECT count(*) FROM instances
            WHERE heartbeat_at > now() - make_interval(secs => $1)) AS live,
           (SELECT count(*) FROM leases WHERE expires_at < now()) AS free,
           (SELECT min(n) FROM (
                SELECT count(l.tenant) AS n FROM instances AS i
                LEFT JOIN leases AS l ON l.owner = i.id AND l.expires_at > now()
                WHERE i.heartbeat_at > now() - make_interval(secs => $1)
                GROUP BY i.id) AS held) AS fewest"""

CLAIM = """
    UPDATE leases AS l SET owner = $1, fence = l.fence + 1,
        expires_at = now() + make_interval(secs => $2)
    FROM (SELECT tenant FROM leases WHERE expires_at < now()
          ORDER BY tenant LIMIT $3 FOR UPDATE SKIP LOCKED) AS free
    WHERE l.tenant = free.tenant
    RETURNING l.tenant, l.fence"""

FREE = """
    UPDATE leases SET owner = NULL, expires_at = '-infinity'
    WHERE tenant = $1 AND owner = $2 AND fence = $3"""

ADD_TENANTS = """
    INSERT INTO leases (tenant) SELECT unnest($1::text[]) ON CONFLICT (tenant) DO NOTHING"""

# Tenants queued by a process that never announced them (a database migrated from SQLite,
# or a version before leases) get their row at start.
ADD_STORED = """
    INSERT INTO leases (tenant) SELECT tenant FROM tenant_state ON CONFLICT (tenant) DO NOTHING"""

# The counters of the tenants held that moved past what this instance knows ($2, in the
# order of $1): usually none, rather than every held tenant's at every tick.
COUNTERS = """
    SELECT c.tenant, c.last_sequence
    FROM counters AS c JOIN unnest($1::text[], $2::bigint[]) AS k (tenant, known)
      ON c.tenant = k.tenant
    WHERE c.tenant = ANY($1::text[]) AND c.last_sequence > k.known"""

# The tenant's owner while its lease is live, and where that instance's API is reached.
OWNER = """
    SELECT l.owner, i.api_url FROM leases AS l LEFT JOIN instances AS i ON i.id = l.owner
    WHERE l.tenant = $1 AND l.owner IS NOT NULL AND l.expires_at > now()"""

# One tenant's lease, taken for a control call when no live instance holds it.
CLAIM_ONE = """
    UPDATE leases SET owner = $1, fence = fence + 1,
        expires_at = now() + make_interval(secs => $2)
    WHERE tenant = $3 AND expires_at < now()
    RETURNING fence"""

# What status shows of the cluster: the live instances, and who holds which tenant.
SURVEY_INSTANCES = """
    SELECT i.id, i.host, i.pid, i.api_url, i.config_digest,
           extract(epoch FROM now() - i.heartbeat_at) AS heartbeat_age_s,
           (SELECT count(*) FROM leases AS l
            WHERE l.owner = i.id AND l.expires_at > now()) AS tenants
    FROM instances AS i
    WHERE i.heartbeat_at > now() - make_interval(secs => $1) ORDER BY i.id"""

# The accepted_at of each tenant's head webhook: how long the oldest has waited.
HEADS = """
    SELECT s.tenant, w.accepted_at FROM tenant_state AS s
    JOIN webhooks AS w ON w.tenant = s.tenant AND w.sequence = s.acked_sequence + 1
    WHERE s.tenant = ANY($1::text[])"""

SURVEY_OWNERS = "SELECT tenant, owner FROM leases WHERE expires_at > now() AND owner IS NOT NULL"

# Tenants made through the tenant API, shared by every instance. A write sends
# NOTIFY webhookd_cluster 'tenants' with its commit; every instance then reads them again.
# The fingerprint, read every tick, catches a notification lost with a dropped session:
# xmin changes with every version of a row, so any insert, update or delete changes it.
API_TENANTS = "SELECT tenant, config FROM api_tenants ORDER BY tenant"
API_TENANTS_FINGERPRINT = """
    SELECT count(*)::text || ' ' || coalesce(
        md5(string_agg(tenant || ' ' || xmin::text, ',' ORDER BY tenant)), '')
    FROM api_tenants"""
SAVE_API_TENANT = """
    INSERT INTO api_tenants (tenant, config) VALUES ($1, $2)
    ON CONFLICT (tenant) DO UPDATE SET config = $2, updated_at = now()
    RETURNING (xmax = 0) AS created"""
DELETE_API_TENANT = "DELETE FROM api_tenants WHERE tenant = $1 RETURNING tenant"

# The other live instances whose main-file tenants differ from this one's (an instance
# that publishes no digest, an older version, is left out).
MISMATCHED = """
    SELECT id FROM instances
    WHERE heartbeat_at > now() - make_interval(secs => $1)
      AND id <> $2 AND config_digest <> '' AND config_digest <> $3
    ORDER BY id"""

FORGET_DEAD = """
    DELETE FROM instances WHERE heartbeat_at < now() - make_interval(secs => $1)"""


@dataclass
class Lease:
    fence: int
    valid_until: float  # monotonic: the renewal's request time plus the lease
    releasing: bool = False


def instance_name() -> str:
    """Host, process and a random tag (process ids are reused, across restarts too)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class PgCluster:
    """This instance's membership: its heartbeat, its leases, and the wake-ups it hears."""

    def __init__(self, database: PostgresURL, lease_seconds: float) -> None:
        self.database = database
        self.lease_seconds = lease_seconds
        self.instance = instance_name()
        self.api_url = ""  # where the others reach this instance's API (set before start)
        self.config_digest = ""  # the main file's tenants, as the others compare them
        # The live instances whose digest differs from this one's, as of the last tick.
        self.mismatch: list[str] = []
        self._published_digest = ""
        self._api_fingerprint: str | None = None  # of api_tenants, as last read
        self.held: dict[str, Lease] = {}
        # For the metrics: live instances as the last tick counted them, and lease changes.
        self.live_instances = 0
        self.tenants = 0  # tenants with a lease row, as the last survey counted them
        self.lease_changes = {"gained": 0, "lost": 0, "released": 0}
        self.joined = False  # between start and leave: the store fences outcomes then
        self._members: Members | None = None
        self._conn: Connection | None = None
        self._loop: asyncio.Task[None] | None = None
        self._nudge = asyncio.Event()
        self._claiming = True
        self._stopping = False
        self._releasing: dict[str, asyncio.Task[None]] = {}
        self.unreachable: str | None = None  # set while ticks fail to reach the database
        self._lock = asyncio.Lock()  # one statement at a time on the session

    @property
    def tick_s(self) -> float:
        return self.lease_seconds / TICKS_PER_LEASE

    # -- what the service and the writer ask -------------------------------------------------

    def holds(self, tenant: str) -> bool:
        lease = self.held.get(tenant)
        return lease is not None and not lease.releasing and time.monotonic() < lease.valid_until

    def fence(self, tenant: str) -> int | None:
        """The token this instance claimed `tenant` with, while it thinks it holds it (the
        database has the last word: the writer checks the token against the row)."""
        lease = self.held.get(tenant)
        return lease.fence if lease is not None else None

    async def owner(self, tenant: str) -> Owner | None:
        """Who holds `tenant`'s lease now (as the database has it), or None if no one does:
        a lease free or expired, or a tenant without one."""
        try:
            async with self._lock:
                conn = await self._session()
                row = await conn.fetchrow(OWNER, tenant)
        except CONNECT_ERRORS as exc:
            raise StoreError(connection.unreachable(self.database, exc)) from None
        if row is None:
            return None
        return Owner(row["owner"], row["api_url"] or "")

    async def claim(self, tenant: str) -> bool:
        """Take `tenant`'s lease now if no live instance holds it (a control call for a
        tenant between owners). False if another instance holds it, or this one is
        stopping; the next ticks hand it over again if this instance is over its share."""
        members = self._members
        if members is None or not self._claiming:
            return False
        async with self._lock:
            sent = time.monotonic()
            try:
                conn = await self._session()
                fence = await conn.fetchval(CLAIM_ONE, self.instance, self.lease_seconds, tenant)
            except CONNECT_ERRORS as exc:
                raise StoreError(connection.unreachable(self.database, exc)) from None
            if fence is None:
                return False
            self.held[tenant] = Lease(fence, sent + self.lease_seconds)
            try:
                await members.gained(tenant)
            except Exception as exc:
                log.error("lease_not_taken", tenant=tenant, error=str(exc))
                del self.held[tenant]
                with contextlib.suppress(*CONNECT_ERRORS):
                    await conn.execute(FREE, tenant, self.instance, fence)
                return False
        self.lease_changes["gained"] += 1
        log.info("lease_claimed_for_control", tenant=tenant, held=len(self.held))
        return True

    def refused(self, tenant: str, fence: int | None) -> None:
        """The database refused a write made with `fence`: the lease is another's."""
        lease = self.held.get(tenant)
        if lease is not None and lease.fence == fence:
            del self.held[tenant]
            self.lease_changes["lost"] += 1

    # -- joining and leaving -----------------------------------------------------------------

    async def start(self, members: Members, tenants: Sequence[str]) -> None:
        """Join the cluster: raises `StoreError` (via CONNECT_ERRORS) if the database cannot
        be reached now; the store was just opened, so it can."""
        self._members = members
        self.joined = True
        async with self._lock:
            conn = await self._session()
            await conn.execute(ADD_STORED)
            await conn.execute(ADD_TENANTS, list(tenants))
        await self._tick()
        async with self._lock:
            await conn.execute("SELECT pg_notify($1, 'joined')", CHANGED)
        self._loop = asyncio.create_task(self._run(), name="webhookd-cluster")

    async def add_tenants(self, tenants: Sequence[str]) -> None:
        if not tenants:
            return
        try:
            async with self._lock:
                conn = await self._session()
                await conn.execute(ADD_TENANTS, list(tenants))
        except CONNECT_ERRORS as exc:
            # The next start adds them (ADD_STORED covers any that ingest meanwhile).
            log.warning("lease_rows_not_added", error=connection.reason(exc))
            return
        self._nudge.set()

    def publish_digest(self, digest: str) -> None:
        """A new digest of the main file's tenants (a reload): published at once, and the
        others told to compare again."""
        self.config_digest = digest
        self._nudge.set()

    # -- tenants made through the API --------------------------------------------------------

    async def api_tenants(self) -> dict[str, str]:
        """Every API tenant's stored table (TOML text), read now. Raises StoreError."""
        try:
            async with self._lock:
                conn = await self._session()
                self._api_fingerprint, tenants = await self._read_api_tenants(conn)
                return tenants
        except CONNECT_ERRORS as exc:
            raise StoreError(connection.unreachable(self.database, exc)) from None

    async def _read_api_tenants(self, conn: Connection) -> tuple[str, dict[str, str]]:
        """The table's fingerprint, and its rows as of that fingerprint."""
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            fingerprint: str = await conn.fetchval(API_TENANTS_FINGERPRINT)
            rows = await conn.fetch(API_TENANTS)
        return fingerprint, {r["tenant"]: r["config"] for r in rows}

    async def save_api_tenant(self, tenant: str, text: str) -> bool:
        """Store an API tenant's table and give it a lease row, in one transaction that
        tells every instance; True if it was created. Raises StoreError (nothing stored)."""
        try:
            async with self._lock:
                conn = await self._session()
                async with conn.transaction():
                    created: bool = await conn.fetchval(SAVE_API_TENANT, tenant, text)
                    await conn.execute(ADD_TENANTS, [tenant])
                    await conn.execute("SELECT pg_notify($1, 'tenants')", CHANGED)
        except CONNECT_ERRORS as exc:
            raise StoreError(connection.unreachable(self.database, exc)) from None
        return created

    async def delete_api_tenant(self, tenant: str) -> bool:
        """Remove an API tenant and tell every instance; False if there was none. Raises
        StoreError (nothing removed)."""
        try:
            async with self._lock:
                conn = await self._session()
                async with conn.transaction():
                    deleted = await conn.fetchval(DELETE_API_TENANT, tenant)
                    await conn.execute("SELECT pg_notify($1, 'tenants')", CHANGED)
        except CONNECT_ERRORS as exc:
            raise StoreError(connection.unreachable(self.database, exc)) from None
        return deleted is not None

    async def announce_discarded(self, tenant: str) -> None:
        """A removed tenant's queue was discarded here: the others read its state again
        (status shows what they last saw of it otherwise). Best effort: a lost one leaves
        a stale status until a restart, never a delivery."""
        try:
            async with self._lock:
                conn = await self._session()
                await conn.execute("SELECT pg_notify($1, $2)", CHANGED, f"discarded {tenant}")
        except CONNECT_ERRORS as exc:
            log.warning("discard_not_announced", tenant=tenant, error=connection.reason(exc))

    def drain(self) -> None:
        """Claim nothing more (the service is stopping); leases held are still renewed, so
        the attempts in flight can finish and be recorded."""
        self._claiming = False

    async def leave(self) -> None:
        """Hand every lease back and remove this instance's row. Idempotent."""
        self._claiming = False
        # The loop ends between ticks: a tick cancelled mid-transaction would leave its
        # session busy, and the leases it renewed locked until the server noticed.
        self._stopping = True
        self._nudge.set()
        if self._loop is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._loop), self.lease_seconds)
            except TimeoutError:
                self._loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._loop
            self._loop = None
        releasing = list(self._releasing.values())
        for task in releasing:
            task.cancel()
        await asyncio.gather(*releasing, return_exceptions=True)
        conn = self._conn
        if conn is not None and not conn.is_closed():
            try:
                async with self._lock, conn.transaction():
                    await conn.execute(
                        "UPDATE leases SET owner = NULL, expires_at = '-infinity' WHERE owner = $1",
                        self.instance,
                    )
                    await conn.execute("DELETE FROM instances WHERE id = $1", self.instance)
                    await conn.execute("SELECT pg_notify($1, 'free')", CHANGED)
                log.info("leases_released", tenants=len(self.held))
                self.lease_changes["released"] += len(self.held)
            except CONNECT_ERRORS as exc:
                # They expire instead, within lease_seconds.
                log.warning("leases_not_released", error=connection.reason(exc))
        self.held.clear()
        self.joined = False
        await self._close()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*CONNECT_ERRORS):
                await conn.close(timeout=2.0)
            conn.terminate()

    # -- the session -------------------------------------------------------------------------

    async def _session(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        self._conn = None
        # A statement stuck longer than a lease (a lock never granted, a server gone quiet)
        # is cut, and the session replaced: renewing must not hang on it. A process frozen
        # inside a tick's transaction has its session ended after a lease, so the leases it
        # locked can be claimed by the others.
        lease_ms = str(int(self.lease_seconds * 1000))
        conn = await connection.connect(
            self.database,
            "cluster",
            {"statement_timeout": lease_ms, "idle_in_transaction_session_timeout": lease_ms},
        )
        try:
            await conn.add_listener(QUEUED, self._heard_queued)
            await conn.add_listener(CHANGED, self._heard_changed)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        return conn

    def _heard_queued(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        tenant, rest = announce.heard(str(payload))
        if tenant in self.held and self._members is not None:
            self._members.queued(tenant, *announce.webhooks(rest))

    def _heard_changed(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        reason, _, tenant = str(payload).partition(" ")
        if reason == "discarded":
            if self._members is not None:
                self._members.discarded(tenant)
            return
        self._nudge.set()

    # -- the tick ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), self.tick_s)
            self._nudge.clear()
            if self._stopping:
                return
            try:
                await self._tick()
            except CONNECT_ERRORS as exc:
                if self.unreachable is None:  # said once per outage
                    log.error("cluster_unreachable", error=connection.reason(exc))
                self.unreachable = connection.unreachable(self.database, exc)
                await self._close()
                await asyncio.sleep(RECONNECT_S)
            except Exception:
                log.exception("cluster_tick_crashed")
                await asyncio.sleep(RECONNECT_S)

    async def _tick(self) -> None:
        async with self._lock:
            await self._tick_locked()

    async def _tick_locked(self) -> None:
        members = self._members
        assert members is not None
        sent = time.monotonic()  # before the request: the server stamps expiry after
        conn = await self._session()
        await conn.execute(
            UPSERT_INSTANCE,
            self.instance,
            socket.gethostname(),
            os.getpid(),
            self.api_url,
            self.config_digest,
        )
        # In commits of RENEW_CHUNK leases: a renewal locks each row it renews until its
        # commit, and every outcome of those tenants waits for it meanwhile (the fence is
        # read FOR SHARE), so 10,000 leases renewed at once held deliveries ~100 ms at each
        # tick. `sent` is before the first: each lease is valid from then, or later.
        held = sorted(self.held)
        renewed: dict[str, int] = {}
        for start in range(0, len(held), RENEW_CHUNK):
            chunk = held[start : start + RENEW_CHUNK]
            for r in await conn.fetch(RENEW, self.instance, self.lease_seconds, chunk):
                renewed[r["tenant"]] = r["fence"]
        if self.unreachable is not None:
            log.warning("cluster_reconnected")
            self.unreachable = None
        await self._compare_digests(conn)
        await self._check_api_tenants(conn)
        for tenant, lease in list(self.held.items()):
            if renewed.get(tenant) != lease.fence:
                del self.held[tenant]
                self.lease_changes["lost"] += 1
                members.lost(tenant, "another instance claimed its lease")
            else:
                lease.valid_until = sent + self.lease_seconds
        # Counters of the tenants held: what a lost notification did not say.
        if self.held:
            tenants = list(self.held)
            known = [members.last_known(t) for t in tenants]
            for row in await conn.fetch(COUNTERS, tenants, known):
                members.queued(row["tenant"], row["last_sequence"])
        if not self._claiming:
            return
        survey = await conn.fetchrow(SURVEY, self.lease_seconds)
        assert survey is not None
        self.live_instances = survey["live"]
        self.tenants = survey["tenants"]
        live = max(1, survey["live"])
        share = math.ceil(survey["tenants"] / live)
        owned = len(self.held) - len(self._releasing)
        if owned < share and survey["free"]:
            await self._claim(conn, share - owned, sent)
        elif owned > share and not survey["free"] and (survey["fewest"] or 0) < share:
            self._hand_over(owned - share)

    async def _compare_digests(self, conn: Connection) -> None:
        """Tell the others about a new digest of the main file's tenants; compare theirs
        with it, and say so when the set of those that differ changes."""
        if self.config_digest != self._published_digest:
            # The upsert before it is committed: the others compare with the new one now.
            await conn.execute("SELECT pg_notify($1, 'config')", CHANGED)
            self._published_digest = self.config_digest
        if self.config_digest:
            rows = await conn.fetch(
                MISMATCHED, self.lease_seconds, self.instance, self.config_digest
            )
            mismatch = [r["id"] for r in rows]
            if mismatch != self.mismatch:
                if mismatch:
                    log.warning(
                        "config_mismatch",
                        instance=self.instance,
                        instances=mismatch,
                        detail="the tenants of the main configuration file differ between "
                        "these instances and this one; make the files the same and reload",
                    )
                else:
                    # As loud as the mismatch: whoever saw one sees it end.
                    log.warning("config_mismatch_cleared", instance=self.instance)
                self.mismatch = mismatch

    async def _check_api_tenants(self, conn: Connection) -> None:
        """Read the API tenants again when they changed: a notification makes this tick
        happen at once, and the fingerprint catches one that was lost."""
        members = self._members
        assert members is not None
        fingerprint = await conn.fetchval(API_TENANTS_FINGERPRINT)
        if fingerprint != self._api_fingerprint:
            fingerprint, tenants = await self._read_api_tenants(conn)
            members.api_tenants_changed(tenants)
            self._api_fingerprint = fingerprint  # once applied: a failure tries again

    async def _claim(self, conn: Connection, count: int, sent: float) -> None:
        members = self._members
        assert members is not None
        claimed = await conn.fetch(CLAIM, self.instance, self.lease_seconds, count)
        for row in claimed:
            tenant, fence = row["tenant"], row["fence"]
            self.held[tenant] = Lease(fence, sent + self.lease_seconds)
            try:
                await members.gained(tenant)
            except Exception as exc:
                # Its state could not be read: give it back for another try.
                log.error("lease_not_taken", tenant=tenant, error=str(exc))
                del self.held[tenant]
                with contextlib.suppress(*CONNECT_ERRORS):
                    await conn.execute(FREE, tenant, self.instance, fence)
            else:
                self.lease_changes["gained"] += 1
        if claimed:
            log.info("leases_claimed", count=len(claimed), held=len(self.held))

    def _hand_over(self, count: int) -> None:
        """Start handing `count` tenants over, the ones with nothing waiting first."""
        candidates = [t for t, lease in self.held.items() if not lease.releasing]
        count = min(count, RELEASING_MAX - len(self._releasing), len(candidates))
        for tenant in sorted(candidates, key=self._busy)[:count]:
            self.held[tenant].releasing = True
            self._releasing[tenant] = asyncio.create_task(
                self._release(tenant), name=f"webhookd-release-{tenant}"
            )

    def _busy(self, tenant: str) -> Any:
        members = self._members
        waiting = getattr(members, "waiting_for", None)
        return waiting(tenant) if waiting is not None else 0

    async def _release(self, tenant: str) -> None:
        members = self._members
        assert members is not None
        try:
            await members.release(tenant)
            lease = self.held.get(tenant)
            if lease is None:
                return  # lost meanwhile
            async with self._lock:
                conn = await self._session()
                async with conn.transaction():
                    await conn.execute(FREE, tenant, self.instance, lease.fence)
                    await conn.execute("SELECT pg_notify($1, 'free')", CHANGED)
            del self.held[tenant]
            self.lease_changes["released"] += 1
            log.info("lease_handed_over", tenant=tenant)
        except CONNECT_ERRORS as exc:
            # Still ours in the database: keep delivering it, from its state as stored.
            log.warning("lease_not_handed_over", tenant=tenant, error=connection.reason(exc))
            lease = self.held.get(tenant)
            if lease is not None:
                lease.releasing = False
                try:
                    await members.gained(tenant)
                except Exception as error:
                    # Its state cannot be read either (the database is away): its worker
                    # has stopped, so give the lease up; it lapses, not renewed, and is
                    # claimed again once it has expired.
                    log.error("lease_not_taken", tenant=tenant, error=str(error))
                    self.held.pop(tenant, None)
        finally:
            self._releasing.pop(tenant, None)

    # -- what status shows -------------------------------------------------------------------

    async def heads(self, tenants: Sequence[str]) -> dict[str, float]:
        """When each of `tenants`' head webhook was accepted (those with one waiting)."""
        try:
            async with self._lock:
                conn = await self._session()
                rows = await conn.fetch(HEADS, list(tenants))
        except CONNECT_ERRORS as exc:
            raise StoreError(connection.unreachable(self.database, exc)) from None
        return {r["tenant"]: r["accepted_at"] for r in rows}

    async def survey(self) -> dict[str, Any]:
        """The live instances and who owns which tenant, read now from the database:
        `{"instances": [{"id", "host", "pid", "api_url", "config_digest",
        "heartbeat_age_s", "tenants"}, ...], "owners": {tenant: instance}}`. Raises
        `StoreError` when the database cannot be asked."""
        try:
            async with self._lock:
                conn = await self._session()
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    instances = await conn.fetch(SURVEY_INSTANCES, self.lease_seconds)
                    owners = await conn.fetch(SURVEY_OWNERS)
        except CONNECT_ERRORS as exc:
            raise StoreError(connection.unreachable(self.database, exc)) from None
        return {
            "instances": [
                {**dict(r), "heartbeat_age_s": round(float(r["heartbeat_age_s"]), 1)}
                for r in instances
            ],
            "owners": {r["tenant"]: r["owner"] for r in owners},
        }
