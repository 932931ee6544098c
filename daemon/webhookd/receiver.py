"""`webhookd receiver`: a development endpoint that prints what it gets and checks it.

It checks the shared secret (header and body) and, given `--signing-secret`, the Standard
Webhooks signature; it tracks sequences per path and says when one repeats (a re-send) or
skips (a gap). `--fail-rate` and `--delay` make it fail or stall on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import random
import sys
import time
from typing import Any

from aiohttp import web

from webhookd.config import parse_listen
from webhookd.terminal import visible
from webhookd.views import counted


def verify_signature(signing_secret: str, headers: Any, body: bytes) -> bool:
    """Standard Webhooks verification, written from the spec rather than from our sender."""
    try:
        message_id = headers["webhook-id"]
        timestamp = headers["webhook-timestamp"]
        signatures = headers["webhook-signature"].split()
        key = base64.b64decode(signing_secret.removeprefix("whsec_"))
    except (KeyError, ValueError):
        return False
    payload = message_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, payload, hashlib.sha256).digest()).decode()
    return any(
        version == "v1" and hmac.compare_digest(value, expected)
        for version, _, value in (s.partition(",") for s in signatures)
    )


class Receiver:
    def __init__(
        self,
        *,
        secret: str = "",
        signing_secret: str = "",
        fail_rate: float = 0.0,
        delay: float = 0.0,
        quiet: bool = False,
        out: Any = None,
    ) -> None:
        self.secret = secret
        self.signing_secret = signing_secret
        self.fail_rate = fail_rate
        self.delay = delay
        self.quiet = quiet
        self.out = out or sys.stdout
        self.last_sequence: dict[str, int] = {}
        self.received = 0
        self._window_start = time.monotonic()
        self._window_count = 0

    def say(self, text: str) -> None:
        # Paths, event names, ids and data are whatever was posted here: escaped for the screen.
        print(visible(text), file=self.out, flush=True)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{path:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.path
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.secret and request.headers.get("Authorization") != f"Bearer {self.secret}":
            self.say(f"{path}: 401 wrong or missing Authorization header")
            return web.Response(status=401, text="bad authorization")
        if self.signing_secret and not verify_signature(self.signing_secret, request.headers, body):
            self.say(f"{path}: 401 bad webhook-signature")
            return web.Response(status=401, text="bad signature")
        try:
            document = json.loads(body)
        except ValueError:
            self.say(f"{path}: 400 body is not JSON")
            return web.Response(status=400, text="not json")
        webhooks = document if isinstance(document, list) else [document]
        if self.secret and any(w.get("secret") != self.secret for w in webhooks):
            self.say(f"{path}: 401 a webhook carries the wrong secret")
            return web.Response(status=401, text="bad secret")
        if self.fail_rate and random.random() < self.fail_rate:
            self.say(f"{path}: 503 failing on purpose ({len(webhooks)} webhooks)")
            return web.Response(status=503, text="failing on purpose")
        self._record(path, webhooks)
        return web.Response(text="ok")

    def _record(self, path: str, webhooks: list[dict[str, Any]]) -> None:
        sequences = [w.get("sequence") for w in webhooks]
        notes = []
        last = self.last_sequence.get(path)
        first = sequences[0] if sequences else None
        if isinstance(first, int) and last is not None:
            if first <= last:
                notes.append(f"re-sent from {first} (already had up to {last})")
            elif first > last + 1:
                notes.append(f"gap: {last + 1}-{first - 1} missing (parked?)")
        numbers = [s for s in sequences if isinstance(s, int)]
        if numbers:
            self.last_sequence[path] = max(last or 0, *numbers)
        self.received += len(webhooks)
        if self.quiet:
            self._window_count += len(webhooks)
            now = time.monotonic()
            if now - self._window_start >= 1.0:
                rate = self._window_count / (now - self._window_start)
                self.say(f"{self.received} received, {rate:.0f}/s")
                self._window_start, self._window_count = now, 0
            return
        events = sorted({str(w.get("event")) for w in webhooks})
        span = f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else str(first)
        line = f"{path}: {counted(len(webhooks), 'webhook')}, sequence {span}, {', '.join(events)}"
        if len(webhooks) == 1:
            line += f", id {webhooks[0].get('id')}, data {json.dumps(webhooks[0].get('data'))}"
        self.say(line + "".join(f"  [{n}]" for n in notes))


def main(args: argparse.Namespace) -> int:
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        print(f"error: --listen: {exc}", file=sys.stderr)
        return 2
    if not 0.0 <= args.fail_rate <= 1.0:
        print("error: --fail-rate must be from 0 to 1", file=sys.stderr)
        return 2
    receiver = Receiver(
        secret=args.secret,
        signing_secret=args.signing_secret,
        fail_rate=args.fail_rate,
        delay=args.delay,
        quiet=args.quiet,
    )
    checks = ["secret" if args.secret else "", "signature" if args.signing_secret else ""]
    checking = " and ".join(c for c in checks if c) or "nothing"
    print(f"webhookd receiver on http://{args.listen}/ (checking {checking})", flush=True)
    import uvloop

    web.run_app(
        receiver.app(),
        host=host,
        port=port,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )
    return 0
