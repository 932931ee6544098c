"""A small CONNECT proxy on 127.0.0.1 for tests: records what it was asked, relays tunnels.

It records each CONNECT target and the Proxy-Authorization that came with it, and answers as
told: `refuse = 407` (or 403, 502...) answers that status instead of opening the tunnel,
`close = True` closes the connection without answering, `close_tunnel = True` answers 200
and then closes, `silent = True` never answers, `password` (with `user`) makes it
answer 407 to any other credentials. Anything but CONNECT is answered 405: a proxy in front
of webhookd must only ever see tunnels.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field
from typing import Any

from tests.conftest import stop_server

REASONS = {403: "Forbidden", 407: "Proxy Authentication Required", 502: "Bad Gateway"}


@dataclass
class Proxy:
    user: str = ""
    password: str = ""
    refuse: int = 0
    close: bool = False
    close_tunnel: bool = False
    silent: bool = False
    port: int = 0
    requests: list[str] = field(default_factory=list)  # request lines, as sent
    targets: list[str] = field(default_factory=list)  # CONNECT targets, tunnel opened or not
    authorizations: list[str | None] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"http://{user}127.0.0.1:{self.port}"

    @property
    def credentials(self) -> list[str]:
        """The user:password pairs sent, decoded."""
        return [
            base64.b64decode(a.removeprefix("Basic ")).decode()
            for a in self.authorizations
            if a is not None
        ]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await stop_server(self._server, self._tasks)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = head.split("\r\n")
        self.requests.append(lines[0])
        method, target, _ = lines[0].split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        self.targets.append(target)
        authorization = headers.get("proxy-authorization")
        self.authorizations.append(authorization)
        if self.close:
            return
        if self.silent:
            await reader.read()  # until the client gives up
            return
        if self.close_tunnel:
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
            return
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        status = self.refuse
        if not status and self.password and authorization != f"Basic {expected}":
            status = 407
        if status:
            writer.write(
                f"HTTP/1.1 {status} {REASONS.get(status, 'Refused')}\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )
            await writer.drain()
            return
        host, _, port = target.rpartition(":")
        try:
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await writer.drain()
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
