"""The service: the store, one worker per tenant, the sender; ingest, status, control, reload.

The HTTP API talks to this module, never to SQL, and this module knows nothing of HTTP:
serve.py builds the API around it and runs both. Its shutdown comes in two steps, so that
the API can close between them: `drain` stops ingest (503) and lets in-flight attempts
finish up to `shutdown_grace`, their outcomes recorded; `close` closes the client, commits
what is pending and closes the database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import orjson

from webhookd import checks, logs, status, views
from webhookd import config as config_mod
from webhookd.config import Config, ConfigError, TenantConfig
from webhookd.errors import CODES
from webhookd.ids import generated_sequence, id_tag
from webhookd.ingest import IngestItem
from webhookd.metrics import Metrics
from webhookd.records import (
    HistoryQuery,
    HistoryRecord,
    HistorySize,
    NewWebhook,
    Owner,
    PruneResult,
    ReplaySelection,
    ReplayTooLarge,
    ReplayWithoutPayloads,
    StoreError,
    TenantRecord,
    TenantRow,
    Webhook,
)
from webhookd.scheduler import Clock, InFlight, TenantWorker
from webhookd.sender import Sender
from webhookd.store import make_store

log = logs.get_logger("webhookd.service")

HEALTH_TIMEOUT_S = 2.0  # a database slower than this to answer a ping is unhealthy
# History pruning: rows per step (one short transaction), and the pause between rounds once
# nothing is left to prune now. While a step says more remain, the next follows at once.
PRUNE_STEP = 200
# The least pause between two pruning steps while more remain (see _prune_forever).
PRUNE_BREATHER_S = 0.002
PRUNE_INTERVAL_S = 2.0


class ServiceError(Exception):
    """An error an API caller sees as `{"error": code, "detail": message}`, with the status
    the registry of codes (errors.py) gives `code`."""

    code = "internal"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def status(self) -> int:
        return CODES[self.code].status


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    code = "conflict"


class QueueNotEmpty(Conflict):
    """Removing a tenant whose webhooks still wait (a client may offer to discard them)."""

    code = "queue_not_empty"


class UnknownEventType(ServiceError):
    code = "unknown_event"


class Unavailable(ServiceError):
    code = "unavailable"


class OwnerChanged(ServiceError):
    """A control forwarded here by another instance, for a tenant this one does not hold
    (the lease moved meanwhile): not forwarded again, so that no request goes round."""

    code = "owner_changed"


class UnknownWebhook(ServiceError):
    """A lookup of an id the tenant never had."""

    code = "unknown_webhook"


class ForgottenWebhook(ServiceError):
    """A lookup of a producer id not remembered by a tenant that has forgotten ids: never
    seen, or forgotten after the idempotency window."""

    code = "forgotten"


class ReplayRefused(ServiceError):
    code = "replay_too_large"


class PayloadsNotKept(ServiceError):
    code = "payloads_not_kept"


class InvalidIngest(ServiceError):
    code = "bad_request"


class InvalidTenant(ServiceError):
    code = "invalid_tenant"

    def __init__(self, detail: str, errors: Sequence[str] = ()) -> None:
        super().__init__(detail)
        # One sentence per wrong key ("tenant acme: endpoint: ..."), for the page at /ui/
        # to show each beside its field.
        self.errors = list(errors) or [detail]


class Service:
    def __init__(self, config: Config, *, clock: Clock | None = None) -> None:
        self.config = config
        self._retentions_made: Mapping[str, float] = {}
        self._retentions_of: Config | None = None  # the config they were made from
        self.clock = clock or Clock()
        daemon = config.daemon
        self.store = make_store(daemon.database, daemon.durability, daemon.lease_seconds)
        # Several instances on one database (PostgreSQL): a tenant is delivered here only
        # while this instance holds its lease. None on SQLite: every tenant is delivered.
        self.cluster = self.store.cluster
        self.sender = Sender(
            max_connections=daemon.max_connections,
            source_address=daemon.source_address,
            allow_private=daemon.allow_private_endpoints,
            ca_file=daemon.ca_file,
            proxy=daemon.proxy,
        )
        self.metrics = Metrics(self)
        self.workers: dict[str, TenantWorker] = {}
        self._dormant: dict[str, TenantRecord] = {}
        self.accepting = False
        self._draining = False  # from the first step of a stop on
        self.started = asyncio.Event()  # set once serving (the API listens)
        self._abort = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self.problem: str | None = None  # what the last health check found wrong
        # The api_token the file holds since a reload changed it; it applies at restart.
        self.token_at_restart: config_mod.Secret | None = None
        # PostgreSQL: the tenants made through the API, as stored (name -> TOML text), and
        # as parsed against the running configuration (name -> (text, tenant)).
        self._api_texts: dict[str, str] = {}
        self._api_parsed: dict[str, tuple[str, TenantConfig]] = {}
        # The history's size as last asked (metrics read it at scrape time, without I/O).
        self.history_seen = HistorySize(0, 0, 0)
        self.prune_interval = PRUNE_INTERVAL_S

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database and start a worker per tenant. Ingest is refused until
        `serving`; a start that raises leaves what it began for `drain` and `close`."""
        self.store.on_enqueued = self._enqueued
        self._dormant = {r.name: r for r in await self.store.open()}
        if self.cluster is not None:
            # The main file's tenants are this instance's own (the others compare their
            # digest with it); those made through the API are the database's.
            digest = await asyncio.to_thread(config_mod.tenants_digest, self.config)
            self.cluster.config_digest = digest
            self._api_texts = await self.cluster.api_tenants()
            self.config = self._with_api_tenants(self.config)
            self._warn_unread_tenants_dir()
        self._switch_tenants(self.config.tenants)
        for name, record in list(self._dormant.items()):
            # In the database but no longer configured: with webhooks kept, it is shown
            # (orphaned); otherwise it stays dormant until it comes back.
            if record.row.last_sequence > record.row.acked_sequence or record.parked:
                self._add_worker(self._dormant.pop(name), None)
        if self.cluster is not None:
            # Published in `instances` from the first heartbeat: where controls for the
            # tenants this instance holds are sent by the others.
            self.cluster.api_url = self.config.daemon.api_url
            await self.cluster.start(self, list(self.config.tenants))
        self._in_background(self._prune_forever())

    def serving(self, listen: Sequence[str]) -> None:
        """The API listens on `listen`: accept ingest from now on, and say so."""
        self.accepting = True
        self.started.set()
        log.info(
            "started",
            listen=list(listen),
            tenants=len(self.config.tenants),
            waiting=sum(w.waiting for w in self.workers.values()),
            database=str(self.config.daemon.database),
        )

    def _add_worker(self, record: TenantRecord, tenant: TenantConfig | None) -> TenantWorker:
        worker = TenantWorker(
            record,
            tenant,
            store=self.store,
            sender=self.sender,
            clock=self.clock,
            on_attempt=self.metrics.attempted,
            may_send=self.cluster.holds if self.cluster is not None else None,
        )
        self.workers[record.name] = worker
        if self.cluster is None:
            worker.start()  # else once its lease is claimed (`gained`)
        return worker

    def _switch_tenants(self, tenants: Mapping[str, TenantConfig]) -> None:
        """Make the workers match `tenants`; the one place tenants come and go.

        Added tenants start from their stored state (sequence counter, backoff, paused),
        removed ones stop with their queue kept (orphaned), changed ones apply from their
        next attempt. Used at start, on reload and by the tenant API.
        """
        added, removed, changed = [], [], []
        for name, tenant in tenants.items():
            worker = self.workers.get(name)
            if worker is None:
                record = self._dormant.pop(name, None) or TenantRecord(name, TenantRow())
                self._add_worker(record, tenant)
                added.append(name)
            elif worker.config != tenant:
                worker.configure(tenant)
                changed.append(name)
        for name, worker in self.workers.items():
            if name not in tenants and worker.config is not None:
                worker.configure(None)
                removed.append(name)
        if self.started.is_set() and (added or removed or changed):
            log.info("tenants_changed", added=added, removed=removed, changed=changed)
        if self.cluster is not None and self.started.is_set() and added:
            self._in_background(self.cluster.add_tenants(added))

    async def _as_stored(self, names: list[str]) -> None:
        """Removed tenants (PostgreSQL), as stored: a worker's state is what this instance
        saw, and another may have delivered the tenant since, or discarded its queue (a
        DELETE through another instance). Read from the database, so that a tenant with
        nothing left is no longer shown, rather than shown orphaned with what is gone."""
        try:
            records = {r.name: r for r in await self.store.load(names)}
        except StoreError:
            return  # shown as last seen; a restart reads it again
        for name in names:
            worker = self.workers.get(name)
            if worker is None or worker.config is not None:
                continue  # configured again meanwhile
            record = records.get(name) or TenantRecord(name, TenantRow())
            if worker.task is None:  # never delivered here
                self._add_worker(record, None)
            elif record.row.acked_sequence > worker.row.acked_sequence:
                # Delivered here, but its queue was dropped elsewhere: as in `gained`.
                worker.stop()
                worker.task.cancel()
                await worker.join()
                if self.workers.get(name) is worker:
                    fresh = self._add_worker(record, worker.config)
                    if self.cluster is not None and self.cluster.holds(name):
                        fresh.start()

    def _in_background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _use_tenants(self, tenants: Mapping[str, TenantConfig]) -> None:
        self.config = replace(self.config, tenants=dict(sorted(tenants.items())))
        self._switch_tenants(self.config.tenants)

    def _with_api_tenants(self, config: Config) -> Config:
        """`config`'s main-file tenants and the API tenants stored in the database, each
        validated against `config` (as a tenants_dir file is at load). One that does not
        validate here (a secret_env unset on this host) keeps its running version, if any."""
        tenants = {name: t for name, t in config.tenants.items() if not t.from_api}
        for name, text in self._api_texts.items():
            if name in tenants:
                log.error(
                    "api_tenant_ignored",
                    tenant=name,
                    detail=f"also defined in {config.path}, which wins; remove one of them",
                )
                continue
            parsed = self._api_parsed.get(name)
            if parsed is None or parsed[0] != text:
                try:
                    tenant, _ = config_mod.parse_stored_tenant(name, text, config)
                except ConfigError as exc:
                    for error in exc.errors:
                        log.error("api_tenant_invalid", tenant=name, error=error)
                    running = self.config.tenants.get(name)
                    if running is not None and running.from_api:
                        tenants[name] = running
                    continue
                parsed = self._api_parsed[name] = (text, tenant)
            tenants[name] = parsed[1]
        for name in set(self._api_parsed) - set(self._api_texts):
            del self._api_parsed[name]
        return replace(config, tenants=dict(sorted(tenants.items())))

    def _warn_unread_tenants_dir(self) -> None:
        """Tenant files left in tenants_dir (a move from SQLite without `migrate`) are not
        read on PostgreSQL: say so rather than let those tenants vanish silently."""
        directory = self.config.daemon.tenants_dir
        if directory is None or not directory.is_dir():
            return
        main = self.config.path.resolve()
        files = {
            f.stem
            for f in directory.glob("*.toml")
            if not f.name.startswith(".") and f.resolve() != main
        }
        unread = sorted(files - set(self._api_texts))
        if unread:
            log.warning(
                "tenants_dir_not_read",
                folder=str(directory),
                tenants=unread[:20],
                count=len(unread),
                detail="on PostgreSQL, tenants made through the API live in the database; "
                "`webhookd migrate` copies them there from SQLite",
            )

    def discarded(self, tenant: str) -> None:
        worker = self.workers.get(tenant)
        if worker is not None and worker.config is None:
            self._in_background(self._as_stored([tenant]))

    def api_tenants_changed(self, tenants: Mapping[str, str]) -> None:
        """The API tenants in the database changed (through any instance): apply them."""
        if tenants == self._api_texts:
            return
        self._api_texts = dict(tenants)
        before = set(self.config.tenants)
        self._use_tenants(self._with_api_tenants(self.config).tenants)
        removed = sorted(before - set(self.config.tenants))
        if removed and self.started.is_set():
            self._in_background(self._as_stored(removed))

    def _enqueued(self, tenant: str, webhooks: list[Webhook]) -> None:
        worker = self.workers.get(tenant)
        if worker is not None:
            worker.enqueued(webhooks)

    # -- leases (several instances on one database) ------------------------------------------

    async def gained(self, tenant: str) -> None:
        """This instance now delivers `tenant`: from its state as stored now (the previous
        owner's last outcome included), not as this instance last saw it."""
        records = await self.store.load([tenant])
        record = records[0] if records else TenantRecord(tenant, TenantRow())
        old = self.workers.get(tenant)
        if old is not None and old.task is not None:
            old.stop()
            old.task.cancel()
            await old.join()
        if self._draining:
            # A claim that crossed the start of a stop: a worker started now would be one
            # the drain never stops. The cluster gives the lease back.
            raise Unavailable(f"webhookd is stopping; {tenant} is not taken up")
        self._dormant.pop(tenant, None)
        worker = self._add_worker(record, self.config.tenants.get(tenant))
        worker.start()
        log.info("lease_claimed", tenant=tenant, waiting=worker.waiting)

    def lost(self, tenant: str, reason: str) -> None:
        worker = self.workers.get(tenant)
        if worker is not None and worker.task is not None:
            worker.stop()
            worker.task.cancel()  # its outcome could not be recorded: the new owner resends
        log.warning("lease_lost", tenant=tenant, detail=reason)

    async def release(self, tenant: str) -> None:
        worker = self.workers.get(tenant)
        if worker is not None and worker.task is not None:
            worker.stop()  # the attempt in flight ends and is recorded
            await worker.join()

    def queued(
        self, tenant: str, last_sequence: int, webhooks: list[Webhook] | None = None
    ) -> None:
        worker = self.workers.get(tenant)
        if worker is not None and worker.task is not None:
            if webhooks:
                worker.enqueued(webhooks)
            else:
                worker.announced(last_sequence)

    def last_known(self, tenant: str) -> int:
        worker = self.workers.get(tenant)
        return 0 if worker is None else worker.row.last_sequence

    def waiting_for(self, tenant: str) -> int:
        """How busy a tenant is, to hand the idle ones over first."""
        worker = self.workers.get(tenant)
        return 0 if worker is None else worker.waiting + (1 if worker.in_flight else 0)

    def abort(self) -> None:
        """A second stop signal: cancel in-flight attempts now (their webhooks stay queued)."""
        self._abort.set()

    async def drain(self) -> None:
        """The first step of an ordered, bounded stop: refuse ingest, then let in-flight
        attempts finish and record their outcomes, for up to `shutdown_grace` or until
        `abort`; what is left is cancelled, its webhooks still queued. Idempotent."""
        self.accepting = False
        self._draining = True
        if self.cluster is not None:
            self.cluster.drain()  # claim nothing more; keep renewing while attempts end
        if not self.started.is_set():
            # Never served, or a start that failed part-way: nothing was in flight yet.
            # Whatever it began is ended, or its tasks would outlive the daemon.
            for worker in self.workers.values():
                if worker.task is not None:
                    worker.task.cancel()
                await worker.join()
            return
        for worker in self.workers.values():
            worker.stop()
        tasks = [w.task for w in self.workers.values() if w.task is not None and not w.task.done()]
        if tasks:
            in_flight = sum(1 for w in self.workers.values() if w.in_flight)
            grace = self.config.daemon.shutdown_grace
            log.info("stopping", in_flight=in_flight, grace_s=grace)
            # Whichever comes first: every attempt finished, the grace ran out, or a
            # second signal. Then cancel what is left: its webhooks stay queued.
            finished = asyncio.ensure_future(asyncio.wait(tasks))
            aborted = asyncio.ensure_future(self._abort.wait())
            await asyncio.wait(
                [finished, aborted], timeout=grace, return_when=asyncio.FIRST_COMPLETED
            )
            finished.cancel()
            aborted.cancel()
            for task in tasks:
                task.cancel()
            for worker in self.workers.values():
                await worker.join()

    async def close(self) -> None:
        """The last step: close the client, commit what is pending and close the database
        (its threads would otherwise keep the process from exiting). Idempotent."""
        await self.sender.close()
        for task in list(self._background):
            task.cancel()
        if self.cluster is not None:
            await self.cluster.leave()  # the others take these tenants over at once
        await self.store.close()
        if self.started.is_set():
            self.started.clear()
            log.info("stopped")

    # -- reload ------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the configuration file; on any error keep the running configuration."""
        async with self._reload_lock:
            try:
                new = await asyncio.to_thread(
                    config_mod.load,
                    self.config.path,
                    tenants_from=self.config.daemon.tenants_dir,  # restart-only, like the rest
                )
            except ConfigError as exc:
                for error in exc.errors:
                    log.error("reload_rejected", error=error)
                return False
            self.apply(new)
            if self.cluster is not None:
                digest = await asyncio.to_thread(config_mod.tenants_digest, new)
                self.cluster.publish_digest(digest)
            return True

    def apply(self, new: Config) -> None:
        """Switch to `new`: start added tenants, orphan removed ones, reconfigure the rest."""
        old = self.config
        if self.cluster is not None:
            self._api_parsed.clear()  # validated again against the new file
            new = self._with_api_tenants(new)
        restart_keys = [
            key
            for key in vars(new.daemon)
            if key not in ("log_level", "log_format", "allow_private_endpoints", "proxy")
            and getattr(new.daemon, key) != getattr(old.daemon, key)
        ]
        # The new level first: a reload that raises verbosity shows its own warnings.
        logs.configure(new.daemon.log_format, new.daemon.log_level)
        if restart_keys:
            log.warning("restart_needed", keys=sorted(restart_keys))
        token = new.daemon.api_token
        self.token_at_restart = None if token == old.daemon.api_token else token
        # As at start (`run`): what the file gets wrong beyond errors, DNS aside.
        for warning in [*new.warnings, *checks.findings(new, resolve=False)]:
            log.warning("config_warning", warning=warning)
        self.sender.set_allow_private(new.daemon.allow_private_endpoints)
        self.sender.set_proxy(new.daemon.proxy)
        # Keys that need a restart keep their running values until then.
        daemon = replace(
            old.daemon,
            log_level=new.daemon.log_level,
            log_format=new.daemon.log_format,
            allow_private_endpoints=new.daemon.allow_private_endpoints,
            proxy=new.daemon.proxy,
        )
        self.config = replace(new, daemon=daemon)
        self._switch_tenants(new.tenants)
        removed = sorted(set(old.tenants) - set(new.tenants))
        if self.cluster is not None and removed and self.started.is_set():
            self._in_background(self._as_stored(removed))
        log.info("reloaded", tenants=len(new.tenants))

    def set_tenant(self, tenant: TenantConfig) -> None:
        """Apply one tenant's configuration live (the tenant API)."""
        self._use_tenants({**self.config.tenants, tenant.name: tenant})

    async def put_tenant(self, name: str, raw: Any) -> tuple[bool, TenantConfig]:
        """Create or replace an API tenant: validate, write its file atomically, apply live.

        Returns (created, tenant). A masked secret ("***", as GET shows it) keeps the
        current one, so a GET can be edited and PUT back.
        """
        async with self._reload_lock:
            existing = self.config.tenants.get(name)
            if existing is not None and not existing.from_api:
                raise Conflict(f"tenant {name!r} is defined in {self.config.path}; change it there")
            directory = self.config.daemon.tenants_dir
            if directory is None and self.cluster is None:
                raise Conflict("tenants_dir is not set in [daemon]; the tenant API needs it")
            if isinstance(raw, dict):
                raw = _from_view(raw, existing, self.config.delivery)
            # On PostgreSQL the tenant lives in the database, shared by every instance.
            origin = config_mod.api_tenant_origin(name) if self.cluster is not None else None
            try:
                tenant, warnings = config_mod.parse_api_tenant(
                    name, raw, self.config, source=f"tenant {name}", origin=origin
                )
            except ConfigError as exc:
                raise InvalidTenant("; ".join(exc.errors), exc.errors) from None
            table = config_mod.tenant_table(tenant, redact=False)
            created = existing is None
            if self.cluster is not None:
                text = config_mod.tenant_toml(table)
                try:
                    created = await self.cluster.save_api_tenant(name, text)
                except StoreError as exc:
                    raise Unavailable(f"tenant {name} was not saved: {exc}") from None
                self._api_texts[name] = text
                self._api_parsed[name] = (text, tenant)
            else:
                assert directory is not None
                try:
                    await asyncio.to_thread(config_mod.write_tenant_file, directory, name, table)
                except OSError as exc:
                    raise Unavailable(
                        f"cannot write {directory}/{name}.toml: {exc.strerror}"
                    ) from None
            self.set_tenant(tenant)
            for warning in warnings:
                log.warning("config_warning", warning=warning)
            log.info("tenant_saved", tenant=name, created=created)
            return created, tenant

    async def delete_tenant(self, name: str, *, discard: bool) -> dict[str, Any]:
        """Remove an API tenant. Refused while webhooks wait, unless `discard`."""
        async with self._reload_lock:
            existing = self.config.tenants.get(name)
            if existing is None:
                raise NotFound(f"no tenant named {name!r} is configured")
            if not existing.from_api:
                raise Conflict(f"tenant {name!r} is defined in {self.config.path}; remove it there")
            worker = self.workers[name]
            waiting = worker.waiting
            if self.cluster is not None:
                # Another instance may deliver it: its queue as stored, not as seen here.
                records = await self._write(self.store.load([name]))
                row = records[0].row if records else TenantRow()
                waiting = row.last_sequence - row.acked_sequence
            if waiting and not discard:
                many = f"{waiting} webhooks are" if waiting > 1 else "1 webhook is"
                raise QueueNotEmpty(
                    f"{many} waiting for {name}; let them deliver, "
                    "or DELETE with ?discard=true to drop them"
                )
            if self.cluster is not None:
                try:
                    await self.cluster.delete_api_tenant(name)  # every instance stops it
                except StoreError as exc:
                    raise Unavailable(f"tenant {name} was not deleted: {exc}") from None
                self._api_texts.pop(name, None)
            else:
                directory = existing.origin.parent
                try:
                    await asyncio.to_thread(config_mod.remove_tenant_file, directory, name)
                except OSError as exc:  # as a PUT that cannot write it: a 503, not a 500
                    raise Unavailable(
                        f"cannot remove {directory}/{name}.toml: {exc.strerror}"
                    ) from None
            self.remove_tenant(name)  # no new attempt starts from here on
            dropped = await self._write(worker.discard()) if discard else 0
            if self.cluster is not None:
                await self._as_stored([name])
                if discard:
                    await self.cluster.announce_discarded(name)
            log.warning("tenant_deleted", tenant=name, discarded=dropped)
            return {"tenant": name, "deleted": True, "discarded": dropped}

    def remove_tenant(self, name: str) -> None:
        self._use_tenants({n: t for n, t in self.config.tenants.items() if n != name})

    # -- ingest ------------------------------------------------------------------------------

    def tenant_config(self, name: str) -> TenantConfig:
        tenant = self.config.tenants.get(name)
        if tenant is None:
            raise NotFound(f"no tenant named {name!r} is configured")
        return tenant

    async def ingest(self, name: str, items: Sequence[IngestItem]) -> list[dict[str, Any]]:
        """Queue what the tenant subscribes to; answer per item, in order, after the commit."""
        if not self.accepting:
            raise Unavailable("webhookd is shutting down; send again shortly")
        tenant = self.tenant_config(name)
        catalogue = self.config.catalogue
        unknown = sorted({i.event for i in items if not catalogue.is_known(i.event)})
        if unknown:
            shown = ", ".join(e[:64] + catalogue.unknown_hint(e) for e in unknown[:5])
            more = ", …" if len(unknown) > 5 else ""
            raise UnknownEventType(
                f"unknown event type {shown}{more}; nothing was queued "
                f"(`webhookd events` lists the catalogue)"
            )
        if not tenant.enabled:
            self.metrics.ingested(name, "disabled", len(items))
            return [{"id": i.id, "sequence": None, "status": "disabled"} for i in items]
        answers: list[dict[str, Any] | None] = []
        queued: list[NewWebhook] = []
        for item in items:
            if item.event in tenant.subscribed:
                queued.append(NewWebhook(item.id, item.event, item.data))
                answers.append(None)
            else:
                answers.append({"id": item.id, "sequence": None, "status": "not_subscribed"})
        if queued:
            await self._check_reserved_ids(name, queued)
            try:
                results = await self.store.enqueue(name, queued, self.clock.now())
            except StoreError as exc:
                raise Unavailable(f"nothing was queued: {exc}") from None
            stored = iter(results)
            duplicates = 0
            for index, answer in enumerate(answers):
                if answer is None:
                    result = next(stored)
                    answers[index] = {
                        "id": result.id,
                        "sequence": result.sequence,
                        "status": result.status,
                    }
                    duplicates += result.status == "duplicate"
            self.metrics.ingested(name, "queued", len(results) - duplicates)
            if duplicates:
                self.metrics.ingested(name, "duplicate", duplicates)
        not_subscribed = len(items) - len(queued)
        if not_subscribed:
            self.metrics.ingested(name, "not_subscribed", not_subscribed)
        return [a for a in answers if a is not None]

    async def _check_reserved_ids(self, name: str, queued: Sequence[NewWebhook]) -> None:
        """A producer id in the form of this tenant's generated ids is one it was given (the
        store answers `duplicate`), or one that would collide with a later generated id."""
        tag = id_tag(name)
        given = self.workers[name].row.last_sequence  # updated before any 202 is sent
        for item in queued:
            if item.id is not None:
                first = generated_sequence(tag, item.id)
                if first is not None and first > given and self.cluster is not None:
                    # Other instances queue for this tenant too: the counter as stored.
                    try:
                        records = await self.store.load([name])
                    except StoreError as exc:
                        raise Unavailable(f"nothing was queued: {exc}") from None
                    given = records[0].row.last_sequence if records else 0
                if first is not None and first > given:
                    raise InvalidIngest(
                        f"id {item.id!r} has the form of the ids webhookd generates for "
                        f"{name} but was never given out; use an id of your own"
                    )

    # -- status ------------------------------------------------------------------------------

    def worker(self, name: str) -> TenantWorker:
        worker = self.workers.get(name)
        if worker is None or (worker.config is None and not worker.waiting and not worker.parked):
            raise NotFound(f"no tenant named {name!r}")
        return worker

    def visible_workers(self) -> list[TenantWorker]:
        return [
            w
            for name, w in sorted(self.workers.items())
            if w.config is not None or w.waiting or w.parked
        ]

    def tenant_status(self, name: str) -> dict[str, Any]:
        return status.tenant(self.worker(name), self.clock.now())

    def status(self) -> dict[str, Any]:
        shown = status.daemon(self.visible_workers(), self.clock.now(), self.store.disk_full)
        if self.cluster is not None:
            # The live instances whose main-file tenants differ from this one's.
            shown["totals"]["config_mismatch"] = list(self.cluster.mismatch)
        return shown

    async def status_view(self) -> dict[str, Any]:
        """`status()` as the API shows it. With several instances on one database, each
        tenant also shows its `owner`, and the totals the live `instances`: a tenant held
        here shows this instance's workers (in memory, current); one held elsewhere, or by
        no one, its state as stored now (a few queries for all of them, no call to other
        instances), never this instance's stale copy."""
        shown = await self._status_view()
        size = await self.history_size()
        shown["totals"]["history_records"] = size.records
        shown["totals"]["history_bytes"] = size.bytes
        return shown

    async def _status_view(self) -> dict[str, Any]:
        cluster = self.cluster
        if cluster is None:
            return self.status()
        workers = self.visible_workers()
        try:
            survey = await cluster.survey()
            owners: dict[str, str] = survey["owners"]
            elsewhere = [w.name for w in workers if owners.get(w.name) != cluster.instance]
            observed = await self._observed(elsewhere)
        except StoreError as exc:
            # The database is out of reach: what this instance knows, and that it is all.
            shown = [w for w in workers if cluster.holds(w.name)]
            result = status.daemon(shown, self.clock.now(), self.store.disk_full)
            for one in result["tenants"]:
                one["owner"] = cluster.instance
            result["totals"]["instances"] = []
            result["totals"]["cluster_unknown"] = (
                f"only the tenants this instance holds are shown: {exc}"
            )
            result["totals"]["config_mismatch"] = list(cluster.mismatch)
            return result
        shown = [observed.get(w.name, w) for w in workers]
        result = status.daemon(shown, self.clock.now(), self.store.disk_full)
        for one in result["tenants"]:
            one["owner"] = owners.get(one["tenant"])
        result["totals"]["instances"] = [
            {
                "id": i["id"],
                "host": i["host"],
                "api_url": i["api_url"],
                "heartbeat_age_s": i["heartbeat_age_s"],
                "tenants": i["tenants"],
            }
            for i in survey["instances"]
        ]
        # The live instances whose main-file tenants differ from this one's.
        result["totals"]["config_mismatch"] = list(cluster.mismatch)
        return result

    async def tenant_status_view(self, name: str) -> dict[str, Any]:
        """`tenant_status()` as the API shows it; with several instances, as `status_view`
        shows one tenant (with its `owner`)."""
        cluster = self.cluster
        if cluster is None:
            return self.tenant_status(name)
        worker = self.worker(name)
        try:
            owner = await cluster.owner(name)
            if owner is None or owner.instance != cluster.instance:
                worker = (await self._observed([name]))[name]
        except StoreError as exc:
            raise Unavailable(str(exc)) from None
        return {
            **status.tenant(worker, self.clock.now()),
            "owner": None if owner is None else owner.instance,
        }

    async def _observed(self, names: Sequence[str]) -> dict[str, TenantWorker]:
        """Tenants held by another instance (or by none), as the database has them now:
        workers that are never started, for status to read."""
        if not names:
            return {}
        assert self.cluster is not None
        records = {r.name: r for r in await self.store.load(names)}
        heads = await self.cluster.heads(names)
        observed: dict[str, TenantWorker] = {}
        for name in names:
            record = records.get(name) or TenantRecord(name, TenantRow())
            observed[name] = Observed(
                record,
                self.config.tenants.get(name),
                heads.get(name),
                store=self.store,
                sender=self.sender,
                clock=self.clock,
            )
        return observed

    def status_line(self) -> str:
        line = status.line(self.visible_workers())
        return f"{line}; {self.problem}" if self.problem else line

    # -- where a control runs (several instances on one database) ---------------------------

    async def placement(self, name: str, *, forwarded: bool = False) -> Owner | None:
        """Where a control call for tenant `name` must run: None here, else the instance
        holding its lease (the API forwards the call there).

        A control acts on the worker that delivers the tenant: only there are its head, the
        attempt in flight and its backoff known, and only there is a skip fenced. A tenant no
        live instance holds (its owner just died, or it was just added) is claimed here on
        demand, rather than changed in the database behind the next owner's back: its worker
        then starts from the stored state, and the control acts on it as on any other. A
        call `forwarded` by another instance is never forwarded again.
        """
        self.worker(name)  # 404 for an unknown tenant, before asking anyone
        cluster = self.cluster
        if cluster is None or cluster.holds(name):
            return None
        for _ in range(3):  # a lease changing hands while we look: look again
            try:
                owner = await cluster.owner(name)
                if owner is None and await cluster.claim(name):
                    return None
            except StoreError as exc:
                raise Unavailable(str(exc)) from None
            if owner is None:
                if not self.accepting:
                    raise Unavailable("webhookd is shutting down; send again shortly")
                continue
            if owner.instance == cluster.instance:
                return None  # held here (between renewals, or being handed over)
            if forwarded:
                raise OwnerChanged(
                    f"this instance no longer holds {name}'s lease (now {owner.instance}); "
                    "send again"
                )
            return owner
        raise Unavailable(f"{name}'s lease is changing hands; send again shortly")

    async def other_instances(self) -> list[Owner]:
        """The other live instances and where their APIs are (none on SQLite)."""
        if self.cluster is None:
            return []
        try:
            survey = await self.cluster.survey()
        except StoreError as exc:
            raise Unavailable(str(exc)) from None
        return [
            Owner(i["id"], i["api_url"])
            for i in survey["instances"]
            if i["id"] != self.cluster.instance
        ]

    # -- control -----------------------------------------------------------------------------

    def retry(self, name: str) -> dict[str, Any]:
        """Ask for an attempt now; answer with the state that leaves (the attempt is due now,
        no longer in backoff), not the one the call found."""
        worker = self.worker(name)
        will = worker.request_retry()
        shown = status.tenant(worker, self.clock.now())
        return {
            "tenant": name,
            "retrying": will,
            **{key: shown[key] for key in ("queue", "waiting", "attempts", "next_attempt_at")},
        }

    def retry_all(self) -> dict[str, Any]:
        # With several instances, those held here (the API asks the others for theirs).
        retried = [
            w.name
            for w in self.visible_workers()
            if (self.cluster is None or self.cluster.holds(w.name))
            and w.waiting
            and w.queue_state in ("waiting", "stalled")
            and w.request_retry()
        ]
        return {"retrying": retried, "count": len(retried)}

    async def refresh(self, name: str) -> dict[str, Any]:
        cleared = await self._write(self.worker(name).clear_failures())
        return {"tenant": name, "cleared": cleared}

    async def set_paused(self, name: str, paused: bool) -> dict[str, Any]:
        worker = self.worker(name)
        await self._write(worker.set_paused(paused))
        return {"tenant": name, "paused": paused, "queue": worker.queue_state}

    async def skip(self, name: str) -> dict[str, Any]:
        worker = self.worker(name)
        try:
            parked = await self._write(worker.skip())
        except InFlight:
            raise Conflict(
                f"an attempt for {name} is in flight; skip again once it has finished"
            ) from None
        if parked is None:
            raise Conflict(f"{name} has no webhook waiting to skip")
        log.warning("skipped", tenant=name, sequence=parked.sequence, id=parked.id)
        return {"tenant": name, "parked": {"id": parked.id, "sequence": parked.sequence}}

    async def requeue(self, name: str, webhook_id: str) -> dict[str, Any]:
        worker = self.worker(name)
        webhook = await self._write(worker.requeue(webhook_id))
        if webhook is None:
            raise NotFound(f"{name} has no parked webhook with id {webhook_id!r}")
        log.info("requeued", tenant=name, sequence=webhook.sequence, id=webhook.id)
        return {"tenant": name, "id": webhook.id, "sequence": webhook.sequence}

    async def parked(self, name: str) -> list[dict[str, Any]]:
        self.worker(name)
        try:
            rows = await self.store.list_parked(name)
        except StoreError as exc:  # the database out of reach: 503, as every other read
            raise Unavailable(str(exc)) from None
        return [
            {
                **status.webhook(p.webhook),
                "parked_at": status.iso(p.parked_at),
            }
            for p in rows
        ]

    async def peek(self, name: str, limit: int) -> list[dict[str, Any]]:
        worker = self.worker(name)
        head = worker.row.acked_sequence
        try:
            if self.cluster is not None and not self.cluster.holds(name):
                # Delivered by another instance: where its queue starts is the database's.
                records = await self.store.load([name])
                head = records[0].row.acked_sequence if records else 0
            rows = await self.store.read_queue(name, head, limit)
        except StoreError as exc:
            raise Unavailable(str(exc)) from None
        return [status.webhook(w) for w in rows]

    async def discard(self, name: str) -> int:
        dropped: int = await self._write(self.worker(name).discard())
        return dropped

    # -- history: lookup, listing, replay, pruning (issue 13) ---------------------------------

    async def lookup(self, name: str, webhook_id: str) -> dict[str, Any]:
        """Where webhook `webhook_id` of tenant `name` is now, as the API shows it: queued
        (its position, the head's attempts and next attempt), in_flight (an attempt is
        sending it now, here), parked, delivered, discarded or expired; 404 when the id was
        never given out (`unknown_webhook`) or is not remembered (`forgotten`)."""
        worker = self.worker(name)
        try:
            found = await self.store.find_webhook(name, webhook_id)
            if (
                found.webhook is not None
                and found.place == "queued"
                and found.webhook.sequence <= worker.row.acked_sequence
                and (self.cluster is None or self.cluster.holds(name))
            ):
                # Delivered (or parked) between the read and now: where it is now.
                found = await self.store.find_webhook(name, webhook_id)
        except StoreError as exc:
            raise Unavailable(str(exc)) from None
        if found.place == "unknown":
            raise UnknownWebhook(
                f"{name} never had a webhook with id {webhook_id!r}: a generated id names a "
                "sequence the tenant has not reached, and a producer id was never seen (the "
                "tenant has forgotten none)"
            )
        if found.place == "forgotten":
            window = views.span(self.config.daemon.idempotency_window)
            since = status.iso(found.forgotten_before)
            raise ForgottenWebhook(
                f"{name} does not remember a webhook with id {webhook_id!r}: it was never "
                f"seen, or accepted before {since} and forgotten after idempotency_window "
                f"({window}), no longer queued, parked or in the history"
            )
        answer: dict[str, Any] = {"tenant": name, "id": webhook_id}
        if found.place == "queued":
            assert found.webhook is not None
            answer.update(await self._queued_answer(name, worker, found.webhook))
        elif found.place == "parked":
            assert found.webhook is not None
            answer.update(
                state="parked",
                **_webhook_fields(found.webhook),
                parked_at=status.iso(found.parked_at),
            )
        elif found.place == "history":
            assert found.record is not None
            answer.update(_record_state(found.record))
        else:  # expired
            answer.update(
                state="expired",
                sequence=found.sequence,
                detail=f"delivered, but its record is older than {name}'s history_retention "
                f"({views.span(self._retention(name))}) and was pruned",
            )
        answer["failures"] = [status.failure(f) for f in found.failures]
        return answer

    async def _queued_answer(
        self, name: str, worker: TenantWorker, webhook: Webhook
    ) -> dict[str, Any]:
        held_here = self.cluster is None or self.cluster.holds(name)
        row = worker.row
        if not held_here:  # another instance (or none) delivers it: its state as stored
            try:
                records = await self.store.load([name])
            except StoreError as exc:
                raise Unavailable(str(exc)) from None
            row = records[0].row if records else TenantRow()
        position = max(1, webhook.sequence - row.acked_sequence)
        config = worker.config
        head = 1 if config is None or not config.batching else config.delivery.batch_size
        fields = _webhook_fields(webhook)
        flight = worker.in_flight if held_here else None
        if flight is not None and flight[0] <= webhook.sequence <= flight[1]:
            return {"state": "in_flight", **fields, "attempt": row.attempts + 1}
        at_head = position <= head
        shown = status.tenant(worker, self.clock.now()) if held_here else None
        next_at = (
            shown["next_attempt_at"]
            if shown is not None
            else status.iso(row.next_attempt_at)
            if row.attempts
            else None
        )
        return {
            "state": "queued",
            **fields,
            "position": position,
            "attempts": row.attempts if at_head else 0,
            "next_attempt_at": next_at if at_head else None,
            "queue": shown["queue"] if shown is not None else None,
        }

    def _retention(self, name: str) -> float:
        tenant = self.config.tenants.get(name)
        options = tenant.delivery if tenant is not None else self.config.delivery
        return options.history_retention

    async def history(self, name: str, query: HistoryQuery) -> dict[str, Any]:
        """One page of the tenant's history, and the cursor of the next (None: the last)."""
        self.worker(name)
        try:
            # One more than asked: whether a next page exists, without an empty last page.
            records = await self.store.history(name, replace(query, limit=query.limit + 1))
        except StoreError as exc:
            raise Unavailable(str(exc)) from None
        more = len(records) > query.limit
        records = records[: query.limit]
        return {
            "tenant": name,
            "order": "oldest" if query.oldest_first else "newest",
            "records": [_record(r) for r in records],
            "next_cursor": records[-1].sequence if more and records else None,
        }

    async def replay(
        self,
        name: str,
        selection: ReplaySelection,
        *,
        dry_run: bool = False,
        replay_id: str | None = None,
    ) -> dict[str, Any]:
        """Put the delivered webhooks `selection` matches back at the tail (all or none)."""
        self.worker(name)
        if not self.accepting:
            raise Unavailable("webhookd is shutting down; send again shortly")
        limit = self.config.daemon.replay_max
        try:
            result = await self.store.replay(
                name,
                selection,
                self.clock.now(),
                limit=limit,
                dry_run=dry_run,
                replay_id=replay_id,
            )
        except ReplayTooLarge as exc:
            raise ReplayRefused(_how_to_split(exc)) from None
        except ReplayWithoutPayloads as exc:
            raise PayloadsNotKept(
                f"nothing was replayed: {exc} (history_payloads = false when they were "
                "delivered); narrow the range or the event to webhooks whose data was kept"
            ) from None
        except StoreError as exc:
            raise Unavailable(f"nothing was replayed: {exc}") from None
        if not dry_run and not result.repeated and result.count:
            self.metrics.replayed(name, result.count)
            log.info(
                "replayed",
                tenant=name,
                count=result.count,
                first_sequence=result.first_sequence,
                last_sequence=result.last_sequence,
                replay_id=replay_id,
            )
        return {
            "tenant": name,
            "count": result.count,
            "first_sequence": result.first_sequence,
            "last_sequence": result.last_sequence,
            "dry_run": result.dry_run,
            "repeated": result.repeated,
            "replay_id": replay_id,
        }

    async def history_size(self) -> HistorySize:
        """The history's size now (status totals, metrics); the last known on a store error."""
        try:
            self.history_seen = await self.store.history_size()
        except StoreError as exc:
            log.debug("history_size_unknown", error=str(exc))
        return self.history_seen

    async def prune_step(self) -> PruneResult:
        """One pruning step with each tenant's retention (the tenants no longer configured
        follow [delivery]'s)."""
        daemon = self.config.daemon
        result = await self.store.prune_history(
            self.clock.now(),
            retention=self._retentions(),
            default_retention=self.config.delivery.history_retention,
            max_bytes=daemon.history_max_bytes,
            idempotency_window=daemon.idempotency_window,
            step=PRUNE_STEP,
        )
        self.metrics.pruned(result)
        return result

    def _retentions(self) -> Mapping[str, float]:
        """Each configured tenant's history retention: worked out once per configuration
        (a Config is frozen; a change makes another), not at every pruning step (10,000
        tenants: 2 ms a step)."""
        config = self.config
        if self._retentions_of is not config:
            self._retentions_made = {
                n: t.delivery.history_retention for n, t in config.tenants.items()
            }
            self._retentions_of = config
        return self._retentions_made

    async def _prune_forever(self) -> None:
        """Pruning in the background: a step, then another while `more` remain, else a
        pause; each step a short transaction, so that ingest and deliveries interleave.
        Between two steps the writer is left free for as long as the step took (at least
        PRUNE_BREATHER_S): the writes that queued behind one step commit before the next,
        rather than wait behind step after step while a million records go."""
        while True:
            began = time.monotonic()  # the step's real duration, whatever the clock says
            try:
                result = await self.prune_step()
            except StoreError as exc:
                log.warning("prune_failed", error=str(exc), retry_s=self.prune_interval)
                await asyncio.sleep(self.prune_interval)
                continue
            except Exception:
                log.exception("prune_failed")
                await asyncio.sleep(self.prune_interval)
                continue
            if result.by_age or result.by_size or result.ids:
                log.debug(
                    "pruned",
                    by_age=result.by_age,
                    by_size=result.by_size,
                    failures=result.failures,
                    ids=result.ids,
                    more=result.more,
                )
            if result.more:
                took = time.monotonic() - began
                await asyncio.sleep(min(max(PRUNE_BREATHER_S, took), 1.0))
            else:
                await asyncio.sleep(self.prune_interval)

    async def _write(self, operation: Any) -> Any:
        try:
            return await operation
        except StoreError as exc:
            raise Unavailable(str(exc)) from None

    async def health(self) -> str | None:
        """None while the database answers (and, on PostgreSQL, the leases are renewed);
        else what is wrong, in a sentence: /healthz's detail, and STATUS= until the next
        check."""
        try:
            await asyncio.wait_for(self.store.ping(), HEALTH_TIMEOUT_S)
        except TimeoutError:
            problem: str | None = f"the database does not answer within {HEALTH_TIMEOUT_S:g} s"
        except StoreError as exc:
            problem = str(exc)
        except Exception as exc:  # any failure to answer is "unhealthy", whatever its kind
            problem = f"the database check failed ({logs.one_line(exc)})"
        else:
            problem = self.cluster.unreachable if self.cluster is not None else None
        self.problem = problem
        return problem

    async def healthy(self) -> bool:
        return await self.health() is None

    async def alive(self) -> bool:
        """Whether the systemd watchdog is fed: while the event loop and the database
        answer. On PostgreSQL, also while the database is away: the daemon waits for it by
        itself (ingest answers 503, deliveries pause), and a restart could not bring it
        back, only fail to start; STATUS= says what is wrong meanwhile."""
        return await self.health() is None or self.cluster is not None


class Observed(TenantWorker):
    """A tenant another instance delivers, as stored: what its status shows from here. Its
    head is not read into memory, so how long it has waited comes with it."""

    def __init__(
        self, record: TenantRecord, config: TenantConfig | None, head_at: float | None, **kw: Any
    ) -> None:
        super().__init__(record, config, **kw)
        self.head_at = head_at

    @property
    def oldest_waiting_at(self) -> float | None:
        return self.head_at if self.waiting else None


def _webhook_fields(webhook: Webhook) -> dict[str, Any]:
    shown = status.webhook(webhook)
    del shown["id"]
    return shown


def _record(record: HistoryRecord) -> dict[str, Any]:
    """A history record as the API shows it (listing)."""
    return {
        "sequence": record.sequence,
        "id": record.id,
        "event": record.event,
        "timestamp": int(record.accepted_at),
        "accepted_at": status.iso(record.accepted_at),
        "outcome": record.outcome,
        "finished_at": status.iso(record.finished_at),
        "attempts": record.attempts,
        "status": record.status,
        "duration_ms": record.duration_ms,
        "next_sequence": record.next_sequence,
        "data": None if record.data is None else orjson.Fragment(record.data),
    }


def _record_state(record: HistoryRecord) -> dict[str, Any]:
    """A lookup's answer from the webhook's history record."""
    shown = _record(record)
    del shown["id"]
    outcome = shown.pop("outcome")
    finished = shown.pop("finished_at")
    state: dict[str, Any] = {"state": outcome}
    if outcome == "delivered":
        state["delivered_at"] = finished
    elif outcome == "parked":
        state["parked_at"] = finished
    else:
        state[f"{outcome}_at"] = finished
    return {**state, **shown}


def _how_to_split(exc: ReplayTooLarge) -> str:
    first, last, limit = exc.first_sequence, exc.last_sequence, exc.limit
    parts = -(-(last - first + 1) // limit)
    return (
        f"nothing was replayed: it matches {exc.count} webhooks (sequences {first} to "
        f"{last}), more than replay_max ({limit}). Split it by sequence into ranges of at most "
        f"{limit} sequences: from_sequence {first} to_sequence {first + limit - 1}, then "
        f"from_sequence {first + limit} and on, the last ending at to_sequence {last} "
        f"({parts} replays, each with the same event filter)"
    )


MASK = "***"  # how GET shows a secret
VIEW_ONLY = ("tenant", "source")  # fields of a GET answer that are not settings


def _from_view(
    raw: dict[str, Any], existing: TenantConfig | None, defaults: config_mod.DeliveryOptions
) -> dict[str, Any]:
    """A tenant table as PUT, which may be a GET answer edited: masked secrets keep the stored
    ones, and the answer's read-only fields go (`delivery`, the effective settings, only
    when unchanged: an edit there would otherwise be silently lost)."""
    raw = {key: value for key, value in raw.items() if key not in VIEW_ONLY}
    shown = raw.pop("delivery", None)
    if shown is not None:
        effective = existing.delivery if existing is not None else defaults
        if not isinstance(shown, dict) or any(
            key not in raw
            and (key not in config_mod.DELIVERY_KEYS or value != _plain(getattr(effective, key)))
            for key, value in shown.items()
        ):
            raise InvalidTenant(
                "delivery: shows the effective delivery settings and is read-only; to change "
                'one, set it at the top level (as "timeout": 5.0)'
            )
    for key in ("secret", "signing_secret"):
        if raw.get(key) != MASK:
            continue
        if existing is None:
            kept = None
        elif key == "secret":
            kept = existing.secret if existing.secret_ref.kind == "secret" else None
        else:
            kept = existing.signing_secret
        if not kept:
            raise InvalidTenant(
                f'{key}: "{MASK}" keeps the stored secret, and there is none to keep; send '
                "the secret itself"
            )
        raw[key] = kept.reveal()
    return raw


def _plain(value: Any) -> Any:
    """A setting as JSON shows it (tuples are lists)."""
    return list(value) if isinstance(value, tuple) else value
