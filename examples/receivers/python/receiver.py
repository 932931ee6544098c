"""A webhookd receiver to copy: checks the secret (and the signature, if the tenant signs),
answers 200 at once, and processes each webhook once, in order, in a worker behind a queue.

    pip install aiohttp
    WEBHOOK_SECRET=s3cr3t python receiver.py

Environment:
    WEBHOOK_SECRET          the tenant's shared secret (required)
    WEBHOOK_SIGNING_SECRET  the tenant's signing_secret ("whsec_..."), if it has one
    LISTEN_HOST, PORT       where to listen (default 127.0.0.1 and 8000)
    WEBHOOK_STATE_FILE      a file keeping the last processed sequence across restarts
    WEBHOOK_OUTPUT          a file to append a JSON line to per processed webhook (default:
                            standard output); replace `Worker.process` with your own work
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import json
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

Webhook = dict[str, Any]
TOLERANCE = 5 * 60  # seconds a signature's timestamp may be off, as Standard Webhooks says


def same(given: str, expected: str) -> bool:
    """Constant-time equality, so response times do not leak how much of a guess was right.
    ("surrogatepass": any string, even a header of bytes that are not UTF-8, encodes.)"""
    return hmac.compare_digest(
        given.encode(errors="surrogatepass"), expected.encode(errors="surrogatepass")
    )


def signature_ok(key: bytes, headers: Mapping[str, str], body: bytes) -> bool:
    """Standard Webhooks: webhook-signature holds one or more (space-separated, while a
    secret rotates) "v1,<base64 HMAC-SHA256(key, '<webhook-id>.<webhook-timestamp>.<body>')>"."""
    timestamp = headers.get("webhook-timestamp", "")
    try:
        fresh = abs(time.time() - int(timestamp)) <= TOLERANCE
    except ValueError:
        fresh = False
    if not fresh:
        return False  # a replay of an old request (or a clock far off)
    # aiohttp decodes header bytes as UTF-8 with "surrogateescape": encode them back alike.
    signed = f"{headers.get('webhook-id', '')}.{timestamp}.".encode(errors="surrogateescape")
    signed += body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        version == "v1" and same(signature, expected)
        for version, _, signature in (
            s.partition(",") for s in headers.get("webhook-signature", "").split()
        )
    )


def parse(body: bytes) -> list[Webhook] | None:
    """One webhook object, or (batched) a JSON array of them, oldest first; None if neither."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    webhooks = document if isinstance(document, list) else [document]
    if webhooks and all(isinstance(w, dict) and type(w.get("sequence")) is int for w in webhooks):
        return webhooks
    return None


class Worker:
    """Takes batches off a queue in a thread of its own; processes each webhook in order and
    skips any sequence at or below the last one processed (webhookd sends at least once, so a
    webhook may come again after a timeout or a crash on either side)."""

    def __init__(self, state_file: Path | None, out: TextIO) -> None:
        self.queue: queue.Queue[list[Webhook] | None] = queue.Queue()
        self.state_file = state_file
        self.out = out
        self.last = int(state_file.read_text()) if state_file and state_file.exists() else 0
        self.thread = threading.Thread(target=self.run, name="webhook-worker", daemon=True)

    def run(self) -> None:
        while (webhooks := self.queue.get()) is not None:
            for webhook in webhooks:
                sequence = webhook["sequence"]
                if sequence <= self.last:
                    continue  # already processed: a re-send
                if self.last and sequence > self.last + 1:
                    # webhookd's only gaps are webhooks an operator parked (never delivered).
                    print(f"gap: {self.last + 1}-{sequence - 1} not received", file=sys.stderr)
                self.process_until_done(webhook)
                self.save(sequence)

    def process_until_done(self, webhook: Webhook) -> None:
        # The 200 has gone, so webhookd will not send this again: retry here, holding later
        # webhooks behind it to keep the order.
        delay = 1.0
        while True:
            try:
                self.process(webhook)
                return
            except Exception:
                traceback.print_exc()
                time.sleep(delay)
                delay = min(delay * 2, 60.0)

    def process(self, webhook: Webhook) -> None:
        """Your work goes here. If it can crash after acting but before `save`, the webhook is
        processed again at restart: make it idempotent or save in the same transaction."""
        done = {key: webhook.get(key) for key in ("sequence", "id", "event", "timestamp", "data")}
        print(json.dumps(done), file=self.out, flush=True)  # never print webhook["secret"]

    def save(self, sequence: int) -> None:
        self.last = sequence
        if self.state_file:
            temporary = self.state_file.with_name(self.state_file.name + ".tmp")
            temporary.write_text(str(sequence))
            os.replace(temporary, self.state_file)  # atomic: a crash leaves old or new, whole


def create_app(secret: str, signing_key: bytes | None, worker: Worker) -> web.Application:
    def refuse(status: int, error: str, detail: str) -> web.Response:
        return web.json_response({"error": error, "detail": detail}, status=status)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        # A tenant with authorization_header = false sends no header: the secret in each
        # webhook (checked below) is then the only one.
        header = request.headers.get("Authorization")
        if header is not None and not same(header, f"Bearer {secret}"):
            return refuse(401, "unauthorized", "The bearer secret is wrong.")
        if signing_key is not None and not signature_ok(signing_key, request.headers, body):
            return refuse(401, "bad_signature", "The webhook-signature does not verify.")
        webhooks = parse(body)
        if webhooks is None:
            return refuse(400, "bad_body", "The body is not a webhook or an array of them.")
        secrets = [w.get("secret") for w in webhooks]
        if not all(isinstance(given, str) and same(given, secret) for given in secrets):
            return refuse(401, "unauthorized", "A webhook carries the wrong secret.")
        # Answer at once (webhookd waits 5 s for a batch, 10 s for one, by default); work later.
        # This queue lives in memory: webhooks accepted but not yet processed are lost if the
        # process dies. In production, put them in a durable queue (a database table, Redis,
        # SQS...) here, before answering, and run the worker in a process of its own.
        worker.queue.put(webhooks)
        return web.Response(text="ok")

    async def start_worker(app: web.Application) -> None:
        worker.thread.start()

    async def stop_worker(app: web.Application) -> None:
        worker.queue.put(None)  # finish what was accepted, then stop
        await asyncio.to_thread(worker.thread.join, 30)

    # Batches can be large: up to batch_size (at most 1000) webhooks in one body.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/{path:.*}", receive)
    app.on_startup.append(start_worker)
    app.on_cleanup.append(stop_worker)
    return app


def main() -> None:
    secret = os.environ.get("WEBHOOK_SECRET", "")
    if not secret:
        sys.exit("set WEBHOOK_SECRET to the tenant's shared secret")
    signing_key = None
    if signing_secret := os.environ.get("WEBHOOK_SIGNING_SECRET"):
        try:  # fail now rather than answer 401 to every request
            signing_key = base64.b64decode(signing_secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            sys.exit("WEBHOOK_SIGNING_SECRET is not whsec_<base64>")
    state = os.environ.get("WEBHOOK_STATE_FILE")
    output = os.environ.get("WEBHOOK_OUTPUT")
    with (
        open(output, "a", encoding="utf-8") if output else contextlib.nullcontext(sys.stdout) as out
    ):
        worker = Worker(Path(state) if state else None, out)
        web.run_app(
            create_app(secret, signing_key, worker),
            host=os.environ.get("LISTEN_HOST", "127.0.0.1"),
            port=int(os.environ.get("PORT", "8000")),
            print=functools.partial(print, file=sys.stderr),
        )


if __name__ == "__main__":
    main()
