"""The process wiring: a service and the HTTP API it answers through; readiness, signals.

The service knows nothing of HTTP: its API is built and served here, for `webhookd run`
and for the tests' in-process daemons alike. Start-up opens the service (database, a worker
per tenant), then listens, and only then is ingest accepted and readiness told to systemd.
Shutdown is ordered and bounded: stop ingest (503) -> let in-flight attempts finish up to
`shutdown_grace` and record their outcomes -> close the API (open requests get
HTTP_SHUTDOWN_S) -> close the client, commit what is pending and close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from webhookd import listener, logs, systemd
from webhookd.api import create_app, preflight
from webhookd.service import Service

log = logs.get_logger("webhookd.serve")

# How long open API requests get when the daemon stops (after the delivery grace).
HTTP_SHUTDOWN_S = 1.0


class StartError(Exception):
    """The daemon cannot start; the message says why and what to do, in one sentence."""


class Server:
    """A service behind its HTTP API: what `webhookd run` runs, in-process in the tests."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._runner: listener.Runner | None = None
        self.connections: listener.Guard | None = None  # the API's clients, once listening
        self.addresses: list[Any] = []

    async def start(self) -> None:
        """Open the service, listen, then accept ingest. A start that raises leaves what it
        began for `stop` to close."""
        service = self.service
        await service.start()
        app = create_app(service)
        daemon = service.config.daemon
        limits = listener.Limits(
            max_connections=listener.connection_cap(
                daemon.api_max_connections, daemon.max_connections
            ),
            header_timeout=daemon.api_header_timeout,
            idle_timeout=daemon.api_idle_timeout,
            max_body_bytes=daemon.max_body_bytes,
        )
        if limits.max_connections < daemon.api_max_connections:
            log.warning(
                "api_connections_capped",
                limit=limits.max_connections,
                api_max_connections=daemon.api_max_connections,
                detail="the open-files limit less max_connections leaves no more; raise "
                "LimitNOFILE= (ulimit -Hn) to allow more API clients",
            )
        self.connections = listener.Guard(limits, preflight(app))
        service.metrics.watch_connections(self.connections)
        # auto_decompress off: a compressed body is refused by the API with a JSON 415,
        # rather than by the HTTP parser in plain text (and no decompression bombs).
        # shutdown_timeout: at stop, requests still open get this long (aiohttp's default is
        # 60 s, past systemd's TimeoutStopSec). Ingest is refused by then; a commit in
        # progress takes milliseconds; a producer stalled mid-upload is cut off.
        self._runner = listener.Runner(
            app,
            guard=self.connections,
            access_log=None,
            handle_signals=False,
            auto_decompress=False,
            shutdown_timeout=HTTP_SHUTDOWN_S,
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, daemon.listen_host, daemon.listen_port, backlog=limits.backlog
        )
        try:
            await site.start()
        except OSError as exc:
            raise StartError(_cannot_listen(daemon.listen, service.config.path, exc)) from None
        self.addresses = list(self._runner.addresses)
        service.serving([_address(a) for a in self.addresses])

    async def stop(self) -> None:
        """Ordered, bounded shutdown (see the module's docstring). Idempotent."""
        await self.service.drain()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.service.close()

    async def run(
        self,
        shutdown: asyncio.Event,
        reload: asyncio.Event | None = None,
        ready: Callable[[], None] | None = None,
    ) -> None:
        """Serve until `shutdown` is set, reloading whenever `reload` is set. `ready` is
        called once the daemon listens and reloads are being watched for."""
        service = self.service
        try:
            await self.start()
        except BaseException:
            await self.stop()  # what did start: workers, the database's threads, the listener
            raise
        # What start-up built (configuration, workers, modules) lives as long as the
        # process: keep the collector from walking it again and again.
        gc.freeze()
        notifier = systemd.Notifier.from_environment()
        notifier.ready(service.status_line())
        tasks = [asyncio.create_task(notifier.watchdog_loop(service.status_line, service.alive))]
        if reload is not None:
            tasks.append(asyncio.create_task(_reload_loop(service, reload, notifier)))
        if ready is not None:
            ready()
        try:
            await shutdown.wait()
        finally:
            notifier.stopping()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.stop()


async def _reload_loop(service: Service, reload: asyncio.Event, notifier: systemd.Notifier) -> None:
    while True:
        await reload.wait()
        reload.clear()
        notifier.reloading()
        try:
            await service.reload()
        finally:
            notifier.ready(service.status_line())


def install_signals(shutdown: asyncio.Event, reload: asyncio.Event, service: Service) -> None:
    """Signal handlers only set events: neither the store nor the loop is safe to touch there.

    The first SIGTERM/SIGINT starts a graceful stop; a second one aborts in-flight attempts.
    """
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if shutdown.is_set():
            service.abort()
        shutdown.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    loop.add_signal_handler(signal.SIGHUP, reload.set)


def _cannot_listen(listen: str, config: Path, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{listen} is already in use (another webhookd, or another program); stop it, "
            f"or set listen in [daemon] of {config} to a free address"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"{listen} is not an address of this machine; set listen in [daemon] of {config} "
            "to one of its addresses (127.0.0.1:8787 for this machine only)"
        )
    if exc.errno == errno.EACCES:
        return (
            f"listening on {listen} is not permitted (ports below 1024 need privileges); "
            f"set listen in [daemon] of {config} to a port above 1023"
        )
    return f"cannot listen on {listen}: {exc.strerror or exc}"


def _address(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)
