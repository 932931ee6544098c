"""sd_notify over $NOTIFY_SOCKET: readiness, reload, stop, watchdog, status.

A few lines with a datagram socket rather than a dependency. Outside systemd (no
NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable

from webhookd import logs

log = logs.get_logger("webhookd.systemd")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address: str | bytes | None = None
        if address:
            # A leading "@" names a socket in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_environment(cls) -> Notifier:
        address = os.environ.get("NOTIFY_SOCKET")
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watchdog = int(usec) if usec.isdigit() and (not pid or pid == str(os.getpid())) else None
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> None:
        if self._address is None:
            return
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as exc:
            log.warning("notify_failed", error=str(exc))

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    async def watchdog_loop(
        self,
        status: Callable[[], str],
        healthy: Callable[[], Awaitable[bool]] | None = None,
        status_every: float = 10.0,
    ) -> None:
        """Ping the watchdog at half its period while `healthy` says so (see
        Service.alive), with the STATUS= line as the check left it.

        Running on the event loop is the point: a blocked loop sends nothing, and systemd
        restarts us. Without a watchdog, only the STATUS= line is refreshed.
        """
        if self._address is None:
            return
        interval = self.watchdog_usec / 2e6 if self.watchdog_usec else status_every
        while True:
            await asyncio.sleep(interval)
            fed = healthy is None or await healthy()  # first: the status line tells of it
            fields = [f"STATUS={status()}"]
            if self.watchdog_usec and fed:
                fields.insert(0, "WATCHDOG=1")
            self.notify(*fields)
