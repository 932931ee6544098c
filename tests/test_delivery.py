"""Delivery semantics against a real receiver: order, batching, backoff, timeouts."""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import functools
import hashlib
import hmac
import itertools
import time
from collections.abc import MutableMapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from tests.conftest import (
    Behaviour,
    Daemon,
    Received,
    Receiver,
    StartDaemon,
    free_port,
    load_tenant,
    tenant,
    wait_for,
    webhook,
    write_config,
)
from tests.test_faults import RawEndpoint
from webhookd import config as config_mod
from webhookd.config import Secret
from webhookd.scheduler import Clock
from webhookd.sender import UNSENDABLE_ID, Sender


async def test_unbatched_delivers_one_at_a_time_in_order(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    for n in range(20):
        await daemon.ingest("acme", {"event": "CHECK_COMPLETED", "data": {"n": n}})
    await wait_for(lambda: len(receiver.at("/acme")) == 20)
    bodies = [r.json for r in receiver.at("/acme")]
    assert all(isinstance(b, dict) for b in bodies)
    assert [b["sequence"] for b in bodies] == list(range(1, 21))
    assert [b["data"]["n"] for b in bodies] == list(range(20))
    first = receiver.at("/acme")[0]
    assert first.headers["Authorization"] == "Bearer s3cr3t"
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"].startswith("webhookd/")
    assert set(bodies[0]) == {"id", "sequence", "event", "secret", "timestamp", "data"}
    assert bodies[0]["secret"] == "s3cr3t"


async def test_batched_full_batches_go_at_once_rest_after_window(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        tenants={
            "acme": tenant(receiver.url("/acme"), batching=True, batch_size=10, batch_window=0.5)
        }
    )
    items = [{"event": "CHECK_COMPLETED", "data": {"n": n}} for n in range(25)]
    await daemon.ingest("acme", items)
    await wait_for(lambda: len(receiver.at("/acme")) == 2, timeout=0.4)
    sizes = [len(r.webhooks) for r in receiver.at("/acme")]
    assert sizes == [10, 10]
    await wait_for(lambda: len(receiver.at("/acme")) == 3, timeout=3)
    assert [len(r.webhooks) for r in receiver.at("/acme")] == [10, 10, 5]
    assert receiver.sequences("/acme") == list(range(1, 26))


async def test_failure_keeps_head_and_backs_off(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.script("/acme", 500, 500, 500)
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), retry_base=0.1)})
    await daemon.ingest("acme", [{"event": "CHECK_COMPLETED"}, {"event": "CHECK_COMPLETED"}])
    await wait_for(lambda: len(receiver.sequences("/acme")) == 2, timeout=5)
    times = [r.at for r in receiver.at("/acme")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.1, 0.2, 0.4 after failures 1..3, then the success of 1 is followed at once by 2
    for gap, expected in zip(gaps[:3], [0.1, 0.2, 0.4], strict=True):
        assert expected * 0.9 <= gap < expected + 0.25, gaps
    assert [w["sequence"] for r in receiver.at("/acme") for w in r.webhooks] == [1, 1, 1, 1, 2]
    # The receiver logs its 200 before the daemon has recorded it.
    await wait_for(lambda: daemon.service.workers["acme"].waiting == 0, timeout=2)
    status = await daemon.status("acme")
    assert status["queue"] == "empty"
    assert status["attempts"] == 0
    assert [f["attempt"] for f in status["recent_failures"]] == [3, 2, 1]


async def test_hanging_endpoint_times_out_and_does_not_delay_others(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    receiver.always("/slow", hang)
    daemon = await start_daemon(
        tenants={
            "slow": tenant(receiver.url("/slow"), timeout=0.3, retry_base=5),
            "live": tenant(receiver.url("/live")),
        }
    )
    await daemon.ingest("slow", {"event": "CHECK_COMPLETED"})
    for _ in range(5):
        await daemon.ingest("live", {"event": "CHECK_COMPLETED"})
    await wait_for(lambda: len(receiver.at("/live")) == 5, timeout=1)
    await wait_for(lambda: daemon.service.workers["slow"].row.attempts == 1, timeout=2)
    status = await daemon.status("slow")
    assert status["queue"] == "stalled"
    assert status["recent_failures"][0]["error"] == "timeout after 0.3 s"


# -- helpers -------------------------------------------------------------------------------------


def lower_headers(received: Received) -> dict[str, str]:
    return {key.lower(): value for key, value in received.headers.items()}


def verify_standard_webhooks(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """An independent Standard Webhooks check, written from the published description."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body.decode()}"
    digest = hmac.new(key, signed.encode(), hashlib.sha256).digest()
    expected = base64.b64encode(digest).decode()
    # The header may carry several space-separated signatures; one valid v1 is enough.
    return any(
        version == "v1" and hmac.compare_digest(signature, expected)
        for version, _, signature in (
            part.partition(",") for part in headers["webhook-signature"].split()
        )
    )


class Listener:
    """A bare TCP listener that only counts connections: proves nothing ever came."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/moved"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def gaps(requests: list[Received]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(requests)]


def delays(logs: list[MutableMapping[str, Any]]) -> list[float]:
    """The scheduled waits, exactly as the scheduler logged them (immune to machine load)."""
    return [e["delay_s"] for e in logs if e["event"] == "delivery_failed"]


async def wait_attempts(daemon: Daemon, name: str, attempts: int, timeout: float = 3) -> None:
    await wait_for(lambda: daemon.service.workers[name].row.attempts == attempts, timeout)


class SteppedClock(Clock):
    """The wall clock as the host sees it, which an NTP step or a VM resume can move."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


STEP_BACK_S = 3600.0


# -- batching ------------------------------------------------------------------------------------


async def test_batched_bodies_are_arrays_of_consecutive_sequences(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        tenants={
            "acme": tenant(receiver.url("/acme"), batching=True, batch_size=4, batch_window=0.1)
        }
    )
    await daemon.ingest("acme", {"event": "CHECK_COMPLETED", "data": {"n": 0}})
    await wait_for(lambda: len(receiver.at("/acme")) == 1, timeout=2)
    single = receiver.at("/acme")[0]
    assert single.body.startswith(b"[")
    assert isinstance(single.json, list)
    assert [w["sequence"] for w in single.json] == [1]

    await daemon.ingest(
        "acme", [{"event": "CHECK_COMPLETED", "data": {"n": n}} for n in range(1, 11)]
    )
    await wait_for(lambda: len(receiver.sequences("/acme")) == 11, timeout=3)
    batches = [r.json for r in receiver.at("/acme")]
    assert all(isinstance(b, list) for b in batches)
    assert [len(b) for b in batches] == [1, 4, 4, 2]
    for batch in batches:
        sequences = [w["sequence"] for w in batch]
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
        assert set(batch[0]) == {"id", "sequence", "event", "secret", "timestamp", "data"}
    assert receiver.sequences("/acme") == list(range(1, 12))
    assert [w["data"]["n"] for b in batches for w in b] == list(range(11))


async def test_failed_batch_is_resent_as_head_with_newer_ones(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.script("/acme", 500)
    daemon = await start_daemon(
        tenants={
            "acme": tenant(
                receiver.url("/acme"),
                batching=True,
                batch_size=5,
                batch_window=0.0,
                retry_base=0.5,
            )
        }
    )
    await daemon.ingest("acme", [{"event": "CHECK_COMPLETED", "data": {"n": n}} for n in range(3)])
    await wait_for(lambda: len(receiver.at("/acme")) == 1, timeout=2)
    # In backoff now: four more join the queue behind the failed three.
    await daemon.ingest(
        "acme", [{"event": "CHECK_COMPLETED", "data": {"n": n}} for n in range(3, 7)]
    )
    await wait_for(lambda: len(receiver.sequences("/acme")) == 7, timeout=3)
    requests = receiver.at("/acme")
    assert [r.status for r in requests] == [500, 200, 200]
    assert [[w["sequence"] for w in r.webhooks] for r in requests] == [
        [1, 2, 3],
        [1, 2, 3, 4, 5],
        [6, 7],
    ]
    # The same webhooks, not copies: same ids, data and timestamps.
    assert requests[1].webhooks[:3] == requests[0].webhooks
    assert gaps(requests)[0] >= 0.45


async def test_partial_batch_window_counts_from_the_oldest_webhook(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    window = 1.0
    daemon = await start_daemon(
        tenants={
            "acme": tenant(receiver.url("/acme"), batching=True, batch_size=10, batch_window=window)
        }
    )
    first_ingest = time.monotonic()
    await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
    await asyncio.sleep(window / 2)  # let half the window pass: nothing may go yet
    assert receiver.at("/acme") == []
    await daemon.ingest("acme", [{"event": "CHECK_COMPLETED"}, {"event": "CHECK_COMPLETED"}])
    await wait_for(lambda: len(receiver.at("/acme")) == 1, timeout=3)
    batch = receiver.at("/acme")[0]
    assert [w["sequence"] for w in batch.webhooks] == [1, 2, 3]
    waited = batch.at - first_ingest
    # Due at window after the first webhook, not window after the newest (1.5 s).
    assert window * 0.95 <= waited < window * 1.35, waited


async def test_a_backward_wall_clock_step_does_not_stretch_a_batch_window(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """docs/delivery.md#batching: a batch "is sent as soon as `batch_size` webhooks are waiting,
    or once the oldest waiting webhook has waited `batch_window` seconds".

    Measured on the wall clock (`accepted_at + batch_window − clock.now()`), a step back of
    an hour while a partial batch waits out a 0.5 s window would hold the batch for an hour
    and a half second: the oldest webhook long past its window, yet nothing sent.
    """
    clock = SteppedClock()
    daemon = await start_daemon(
        clock=clock,
        tenants={
            "acme": tenant(receiver.url("/acme"), batching=True, batch_size=10, batch_window=0.5)
        },
    )
    ingested = time.monotonic()
    await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
    clock.offset -= STEP_BACK_S
    await wait_for(lambda: len(receiver.at("/acme")) == 1, timeout=3)
    waited = receiver.at("/acme")[0].at - ingested
    assert 0.45 <= waited < 1.5, waited


# -- backoff -------------------------------------------------------------------------------------


def answer_with_retry_after(status: int, seconds: str) -> Behaviour:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Retry-After": seconds})

    return answer


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_delays_at_least_that_long(
    status: int, receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.script("/acme", answer_with_retry_after(status, "1"))
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), retry_base=0.01)})
    with capture_logs() as logs:
        await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
        await wait_for(lambda: len(receiver.at("/acme", ok_only=True)) == 1, timeout=3)
    requests = receiver.at("/acme")
    assert [r.status for r in requests] == [status, 200]
    assert delays(logs) == [1.0]
    assert 1.0 <= gaps(requests)[0] < 1.8, gaps(requests)


async def test_retry_after_is_capped_by_retry_after_doublings(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.script("/acme", answer_with_retry_after(503, "3600"))
    daemon = await start_daemon(
        tenants={
            "acme": tenant(
                receiver.url("/acme"),
                retry_base=0.01,
                retry_doublings=3,
                retry_after_doublings=0.3,
            )
        }
    )
    with capture_logs() as logs:
        await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
        await wait_for(lambda: len(receiver.at("/acme", ok_only=True)) == 1, timeout=3)
    assert delays(logs) == [0.3]
    gap = gaps(receiver.at("/acme"))[0]
    assert 0.29 <= gap < 1.0, gap


async def test_retry_after_is_ignored_on_500(receiver: Receiver, start_daemon: StartDaemon) -> None:
    receiver.script("/acme", answer_with_retry_after(500, "5"))
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), retry_base=0.05)})
    with capture_logs() as logs:
        await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
        await wait_for(lambda: len(receiver.at("/acme", ok_only=True)) == 1, timeout=3)
    assert delays(logs) == [0.05]
    requests = receiver.at("/acme")
    assert [r.status for r in requests] == [500, 200]
    assert 0.045 <= gaps(requests)[0] < 1.0, gaps(requests)


async def test_backoff_doubles_then_levels_at_retry_after_doublings(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.script("/acme", 500, 500, 500, 500)
    daemon = await start_daemon(
        tenants={
            "acme": tenant(
                receiver.url("/acme"),
                retry_base=0.05,
                retry_doublings=2,
                retry_after_doublings=0.3,
            )
        }
    )
    with capture_logs() as logs:
        await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
        await wait_for(lambda: len(receiver.at("/acme", ok_only=True)) == 1, timeout=3)
    # 0.05 × 2^(n−1) while n ≤ 2, then 0.3 (a continued doubling would give 0.2, 0.4).
    expected = [0.05, 0.1, 0.3, 0.3]
    assert delays(logs) == expected
    observed = gaps(receiver.at("/acme"))
    assert len(observed) == 4, observed
    for gap, wait in zip(observed, expected, strict=True):
        assert wait * 0.95 <= gap < wait + 0.4, observed
    # The receiver logs its 200 before the daemon has recorded it.
    await wait_for(lambda: daemon.service.workers["acme"].waiting == 0, timeout=2)
    status = await daemon.status("acme")
    assert [f["attempt"] for f in status["recent_failures"]] == [4, 3, 2, 1]
    assert status["attempts"] == 0


async def test_a_backward_wall_clock_step_does_not_stretch_a_backoff(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """docs/delivery.md#retries-and-backoff: "After a failure the next attempt is at `retry_base ×
    2^(attempts−1)` while `attempts ≤ retry_doublings`, else `retry_after_doublings` seconds later."

    The worker sleeps on the event loop's monotonic timer. Were what is left of the backoff
    measured against the wall clock (`next_attempt_at − clock.now()`), a step back of the
    host's clock by an hour during a 0.3 s backoff (NTP correction, VM resumed from a
    snapshot) would wake the worker after 0.3 s to find the stored wall-clock time an hour
    ahead, and it would sleep again: the retry an hour late instead of 0.3 s later.
    """
    clock = SteppedClock()
    receiver.script("/acme", 500)
    daemon = await start_daemon(
        clock=clock, tenants={"acme": tenant(receiver.url("/acme"), retry_base=0.3)}
    )
    worker = daemon.service.workers["acme"]
    await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
    await wait_for(lambda: worker.row.attempts == 1, timeout=3)
    failed_at = receiver.at("/acme")[0].at

    clock.offset -= STEP_BACK_S
    await wait_for(lambda: len(receiver.at("/acme")) == 2, timeout=3)
    gap = receiver.at("/acme")[1].at - failed_at
    assert 0.28 <= gap < 1.5, gap
    assert receiver.at("/acme")[1].status == 200


# -- what counts as success ----------------------------------------------------------------------


async def test_success_statuses_widen_success_201_fails_by_default(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.always("/wide", 204)
    receiver.script("/narrow", 201)
    daemon = await start_daemon(
        tenants={
            "wide": tenant(receiver.url("/wide"), success_statuses=[200, 204], retry_base=5),
            "narrow": tenant(receiver.url("/narrow"), retry_base=0.05),
        }
    )
    await daemon.ingest("wide", [{"event": "CHECK_COMPLETED"}, {"event": "CHECK_COMPLETED"}])
    await daemon.ingest("narrow", {"event": "CHECK_COMPLETED"})
    await wait_for(lambda: len(receiver.at("/wide")) == 2, timeout=2)
    await wait_for(lambda: len(receiver.at("/narrow")) == 2, timeout=2)
    assert [r.webhooks[0]["sequence"] for r in receiver.at("/wide")] == [1, 2]
    wide = await daemon.status("wide")
    assert wide["recent_failures"] == []
    await wait_for(lambda: daemon.service.workers["wide"].waiting == 0, timeout=2)
    assert (await daemon.status("wide"))["queue"] == "empty"

    assert [r.status for r in receiver.at("/narrow")] == [201, 200]
    assert [r.webhooks[0]["sequence"] for r in receiver.at("/narrow")] == [1, 1]
    narrow = await daemon.status("narrow")
    assert [(f["status"], f["error"]) for f in narrow["recent_failures"]] == [(201, "HTTP 201")]


async def test_redirect_is_a_failure_and_never_followed(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    elsewhere = Listener()
    location = await elsewhere.start()

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": location})

    receiver.script("/acme", redirect)
    try:
        daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), retry_base=0.2)})
        await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
        await wait_for(lambda: len(receiver.at("/acme", ok_only=True)) == 1, timeout=3)
        assert [r.status for r in receiver.at("/acme")] == [302, 200]
        failure = (await daemon.status("acme"))["recent_failures"][0]
        assert failure["status"] == 302
        assert failure["error"] == f"redirect to {location} not followed (HTTP 302)"
        assert elsewhere.connections == 0
    finally:
        await elsewhere.close()


async def test_a_redirect_location_is_quoted_as_the_endpoint_wrote_it(
    start_daemon: StartDaemon,
) -> None:
    """UTF-8 bytes are read as UTF-8 (what the endpoint meant); other bytes as Latin-1."""
    answers = {
        "utf8": "https://example.com/straße/\u202e".encode(),
        "latin1": b"https://example.com/caf\xe9",
    }
    endpoints = {}
    for name, location in answers.items():

        async def redirect(writer: asyncio.StreamWriter, location: bytes = location) -> None:
            writer.write(
                b"HTTP/1.1 301 Moved\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % location
            )
            await writer.drain()

        endpoints[name] = RawEndpoint(redirect)
    try:
        tenants = {name: tenant(await e.start(), retry_base=30.0) for name, e in endpoints.items()}
        daemon = await start_daemon(tenants=tenants)
        for name in answers:
            await daemon.ingest(name, {"event": "CHECK_COMPLETED"})

        def first_error(name: str) -> str | None:
            failures = daemon.service.tenant_status(name)["recent_failures"]
            return failures[0]["error"] if failures else None

        errors = {name: await wait_for(functools.partial(first_error, name)) for name in answers}
        assert errors == {
            "utf8": "redirect to https://example.com/straße/\u202e not followed (HTTP 301)",
            "latin1": "redirect to https://example.com/café not followed (HTTP 301)",
        }
    finally:
        for endpoint in endpoints.values():
            await endpoint.close()


# -- headers and signatures ----------------------------------------------------------------------


async def test_authorization_header_false_omits_it_but_keeps_body_secret(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/acme"), authorization_header=False)}
    )
    await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
    await wait_for(lambda: len(receiver.at("/acme")) == 1, timeout=2)
    received = receiver.at("/acme")[0]
    assert "authorization" not in lower_headers(received)
    assert received.json["secret"] == "s3cr3t"


@pytest.mark.parametrize("secret", ["s3cr3t ", "s3cr3t\t"], ids=["trailing-space", "trailing-tab"])
async def test_the_authorization_header_a_receiver_reads_is_bearer_and_the_body_secret(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon, secret: str
) -> None:
    """docs/wire-format.md: "the secret travels twice: as the field `secret` in every webhook
    object, and as `Authorization: Bearer <secret>`"; docs/wire-format.md#headers: `Authorization`
    is `Bearer <secret>`.

    HTTP parsers drop a field value's surrounding whitespace (RFC 9110 §5.5), so for a
    secret ending in a space or a tab (`secret = "s3cr3t "`, or `secret_env` from a shell
    `export`) the receiver would read `Bearer s3cr3t` while the body says `"s3cr3t "`: a
    receiver checking the header against the secret would refuse every delivery and the
    tenant would stall for good. The configuration refuses such a secret, naming the key;
    were one taken, what the receiver reads must still match the body."""
    path = write_config(tmp_path, {"acme": tenant(receiver.url("/acme"), secret=secret)})
    try:
        config_mod.load(path)
    except config_mod.ConfigError as exc:
        assert "tenants.acme.secret" in str(exc)
        return
    daemon = await start_daemon(path)
    await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
    await wait_for(lambda: len(receiver.at("/acme")) == 1, timeout=5)
    received = receiver.at("/acme")[0]
    assert received.json["secret"] == secret
    assert received.headers["Authorization"] == f"Bearer {received.json['secret']}"


SIGNING_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


async def test_standard_webhooks_signature_unbatched(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/acme"), signing_secret=SIGNING_SECRET)}
    )
    await daemon.ingest(
        "acme", [{"event": "CHECK_COMPLETED", "id": "evt-1"}, {"event": "TASK_CREATED"}]
    )
    await wait_for(lambda: len(receiver.at("/acme")) == 2, timeout=2)
    for received in receiver.at("/acme"):
        headers = lower_headers(received)
        assert headers["webhook-id"] == received.json["id"]
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 10
        assert verify_standard_webhooks(SIGNING_SECRET, headers, received.body)
        # The check is not vacuous: another key, or another body, does not verify.
        other = "whsec_" + base64.b64encode(bytes(32)).decode()
        assert not verify_standard_webhooks(other, headers, received.body)
        assert not verify_standard_webhooks(SIGNING_SECRET, headers, received.body + b" ")
    assert lower_headers(receiver.at("/acme")[0])["webhook-id"] == "evt-1"


async def test_standard_webhooks_signature_batched(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        tenants={
            "acme": tenant(
                receiver.url("/acme"),
                signing_secret=SIGNING_SECRET,
                batching=True,
                batch_size=3,
                batch_window=0.1,
            )
        }
    )
    await daemon.ingest("acme", [{"event": "CHECK_COMPLETED"} for _ in range(5)])
    await wait_for(lambda: len(receiver.sequences("/acme")) == 5, timeout=2)
    ids = []
    for received in receiver.at("/acme"):
        headers = lower_headers(received)
        ids.append(headers["webhook-id"])
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 10
        assert verify_standard_webhooks(SIGNING_SECRET, headers, received.body)
    assert ids == ["acme.1-3", "acme.4-5"]


async def test_rotated_secret_applies_to_the_queued_webhook(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.script("/acme", 500)
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), retry_base=30)})
    await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
    await wait_attempts(daemon, "acme", 1)
    first = receiver.at("/acme")[0]
    assert first.headers["Authorization"] == "Bearer s3cr3t"
    cfg = daemon.service.config.tenants["acme"]
    daemon.service.set_tenant(dataclasses.replace(cfg, secret=Secret("new")))
    status, _ = await daemon.request("POST", "/v1/tenants/acme/retry")
    assert status == 200
    await wait_for(lambda: len(receiver.at("/acme")) == 2, timeout=2)
    resent = receiver.at("/acme")[1]
    assert resent.status == 200
    assert resent.json["sequence"] == 1
    assert resent.json["id"] == first.json["id"]
    assert resent.json["secret"] == "new"
    assert resent.headers["Authorization"] == "Bearer new"


async def test_a_webhook_id_with_a_line_break_cannot_add_a_header(
    tmp_path: Path, receiver: Receiver
) -> None:
    """With signing on, `webhook-id` is the producer's own id (ingest takes any string of
    1 to 255 characters without control characters). CR LF in an id written into the head
    as it is would add headers (or end the head) of the request the tenant's endpoint
    receives; aiohttp's client, which http1 replaced, refused header values with CR or LF."""
    sender = Sender(allow_private=True)
    acme = load_tenant(tmp_path, receiver.url("/acme"), signing_secret=SIGNING_SECRET)
    try:
        outcome = await sender.send(acme, [webhook("evt-1\r\nX-Injected: by the producer")])
    finally:
        await sender.close()
    assert [r.headers.get("X-Injected") for r in receiver.requests] in ([], [None])
    # Ingest refuses such ids; one queued before it did is a failed attempt, never sent.
    assert (outcome.ok, outcome.error) == (False, UNSENDABLE_ID)
    assert receiver.requests == []


async def test_webhook_timestamp_is_the_send_time_not_the_time_before_waiting_for_a_slot(
    tmp_path: Path, receiver: Receiver
) -> None:
    """docs/wire-format.md#signing: `webhook-timestamp` is the send time. A request signed (and
    stamped) before waiting for one of max_connections slots would carry a timestamp as old as that
    wait. When more tenants are busy than there are slots (an operator's max_connections below the
    tenant count, slow or hanging endpoints each holding a slot up to their 5-10 s timeout),
    the wait grows with the queue of tenants; receivers using the Standard Webhooks
    libraries refuse a timestamp more than 5 minutes old, answer 401, and the retry would
    be stamped before the same wait again."""
    sender = Sender(max_connections=1, allow_private=True)
    slow_started, release = asyncio.Event(), asyncio.Event()
    arrivals: list[tuple[float, dict[str, str]]] = []

    async def hold(request: web.Request) -> web.Response:
        slow_started.set()
        await release.wait()
        return web.Response(text="ok")

    async def record(request: web.Request) -> web.Response:
        arrivals.append((time.time(), dict(request.headers)))
        return web.Response(text="ok")

    receiver.always("/slow", hold)
    receiver.always("/signed", record)
    slow = load_tenant(tmp_path, receiver.url("/slow"))
    signed = load_tenant(tmp_path, receiver.url("/signed"), signing_secret=SIGNING_SECRET)
    try:
        holding = asyncio.create_task(sender.send(slow, [webhook("slow-1")]))
        await asyncio.wait_for(slow_started.wait(), 2.0)  # the only slot is taken
        built = time.time()
        waiting = asyncio.create_task(sender.send(signed, [webhook("signed-1")]))
        # The slot stays busy for two seconds (a short stand-in for a long queue of tenants):
        # the time passing is what is under test.
        await wait_for(lambda: time.time() >= built + 2, 5.0)
        release.set()
        outcomes = await asyncio.wait_for(asyncio.gather(holding, waiting), 2.0)
    finally:
        release.set()
        await sender.close()
    assert [outcome.ok for outcome in outcomes] == [True, True]
    [(arrived, headers)] = arrivals
    assert arrived - int(headers["webhook-timestamp"]) < 2, (arrived, headers)


# -- failures, retries, control ------------------------------------------------------------------


async def test_dead_endpoint_is_connection_refused_and_does_not_delay_others(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hooks"
    daemon = await start_daemon(
        tenants={"dead": tenant(dead, retry_base=5), "live": tenant(receiver.url("/live"))}
    )
    await daemon.ingest("dead", [{"event": "CHECK_COMPLETED"} for _ in range(3)])
    for _ in range(5):
        await daemon.ingest("live", {"event": "CHECK_COMPLETED"})
    await wait_for(lambda: len(receiver.at("/live")) == 5, timeout=1)
    assert receiver.sequences("/live") == [1, 2, 3, 4, 5]
    await wait_attempts(daemon, "dead", 1)
    status = await daemon.status("dead")
    assert status["queue"] == "stalled"
    assert status["waiting"] == 3
    failure = status["recent_failures"][0]
    assert failure["error"] == "connection refused"
    assert failure["status"] is None
    assert (failure["first_sequence"], failure["count"]) == (1, 1)


async def test_retry_during_backoff_attempts_now_and_keeps_attempts(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    receiver.script("/acme", 500, 500)
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), retry_base=30)})
    await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
    await wait_attempts(daemon, "acme", 1)
    before = await daemon.status("acme")
    assert before["queue"] == "stalled"
    assert before["next_attempt_at"] is not None

    status, body = await daemon.request("POST", "/v1/tenants/acme/retry")
    answered = time.monotonic()
    assert status == 200
    assert body["retrying"] is True
    await wait_for(lambda: len(receiver.at("/acme")) == 2, timeout=2)
    # docs/delivery.md#retries-and-backoff: the next attempt starts within 100 ms of the retry call.
    assert receiver.at("/acme")[1].at - answered < 0.1

    await wait_attempts(daemon, "acme", 2)
    after = await daemon.status("acme")
    assert [f["attempt"] for f in after["recent_failures"]] == [2, 1]
    # The second failure backs off as attempt 2: 30 × 2 = 60 s, not 30 s again.
    next_at = datetime.fromisoformat(after["next_attempt_at"]).timestamp()
    assert 55 <= next_at - time.time() <= 62


async def test_retry_during_an_attempt_makes_the_next_start_at_once(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def held_then_500(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.Response(status=500)

    receiver.script("/acme", held_then_500)
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), retry_base=30)})
    await daemon.ingest("acme", {"event": "CHECK_COMPLETED"})
    await wait_for(started.is_set, timeout=2)
    status, body = await daemon.request("POST", "/v1/tenants/acme/retry")
    assert status == 200
    assert body["retrying"] is True
    released = time.monotonic()
    release.set()
    await wait_for(lambda: len(receiver.at("/acme")) == 2, timeout=2)
    requests = receiver.at("/acme")
    assert [r.status for r in requests] == [500, 200]
    assert requests[1].at - released < 0.5
    status_after = await daemon.status("acme")
    assert [f["attempt"] for f in status_after["recent_failures"]] == [1]


async def test_disabled_tenant_answers_disabled_and_sends_nothing(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"), enabled=False)})
    body = await daemon.ingest(
        "acme", [{"event": "CHECK_COMPLETED", "id": "mine"}, {"event": "TASK_CREATED"}]
    )
    assert body == {
        "webhooks": [
            {"id": "mine", "sequence": None, "status": "disabled"},
            {"id": None, "sequence": None, "status": "disabled"},
        ]
    }
    await asyncio.sleep(0.3)  # let time pass: nothing may be sent
    assert receiver.requests == []
    status = await daemon.status("acme")
    assert (status["queue"], status["waiting"], status["enabled"]) == ("disabled", 0, False)


async def test_paused_tenant_queues_and_sends_after_resume(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    status, body = await daemon.request("POST", "/v1/tenants/acme/pause")
    assert (status, body["paused"]) == (200, True)
    answer = await daemon.ingest("acme", [{"event": "CHECK_COMPLETED"} for _ in range(3)])
    assert [w["status"] for w in answer["webhooks"]] == ["queued"] * 3
    await asyncio.sleep(0.3)  # let time pass: nothing may be sent
    assert receiver.requests == []
    paused = await daemon.status("acme")
    assert (paused["queue"], paused["waiting"], paused["paused"]) == ("paused", 3, True)

    status, body = await daemon.request("POST", "/v1/tenants/acme/resume")
    assert (status, body["paused"]) == (200, False)
    await wait_for(lambda: len(receiver.at("/acme")) == 3, timeout=2)
    assert receiver.sequences("/acme") == [1, 2, 3]


async def test_many_tenants_in_order_with_one_request_in_flight_each(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    names = [f"t{i:02d}" for i in range(50)]
    in_flight: collections.Counter[str] = collections.Counter()
    most: collections.Counter[str] = collections.Counter()

    async def track(request: web.Request) -> web.Response:
        in_flight[request.path] += 1
        most[request.path] = max(most[request.path], in_flight[request.path])
        try:
            await asyncio.sleep(0.002)  # widen the window in which an overlap would show
        finally:
            in_flight[request.path] -= 1
        return web.Response(text="ok")

    for name in names:
        receiver.always(f"/{name}", track)
    daemon = await start_daemon(tenants={name: tenant(receiver.url(f"/{name}")) for name in names})

    async def produce(name: str) -> None:
        for chunk in range(4):
            items = [
                {"event": "CHECK_COMPLETED", "data": {"n": n}}
                for n in range(chunk * 5, chunk * 5 + 5)
            ]
            await daemon.ingest(name, items)

    await asyncio.gather(*(produce(name) for name in names))
    await wait_for(lambda: len(receiver.requests) == 1000, timeout=15)
    for name in names:
        received = receiver.at(f"/{name}")
        assert [r.json["sequence"] for r in received] == list(range(1, 21)), name
        assert [r.json["data"]["n"] for r in received] == list(range(20)), name
    assert set(most) == {f"/{name}" for name in names}
    assert max(most.values()) == 1, most


async def test_max_connections_caps_requests_across_tenants_and_waiting_is_not_a_timeout(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    # docs/configuration.md#max_connections: "outgoing, all tenants together". Four tenants, two
    # connections, each answer takes 0.3 s and the timeout is 0.5 s: the two that wait for
    # a connection must not have that wait counted against their endpoint.
    active = {"now": 0, "most": 0}

    async def slow_ok(request: web.Request) -> web.Response:
        active["now"] += 1
        active["most"] = max(active["most"], active["now"])
        try:
            await asyncio.sleep(0.3)
        finally:
            active["now"] -= 1
        return web.Response(text="ok")

    names = [f"t{n}" for n in range(4)]
    for name in names:
        receiver.always(f"/{name}", slow_ok)
    daemon = await start_daemon(
        tenants={name: tenant(receiver.url(f"/{name}"), timeout=0.5) for name in names},
        daemon={"max_connections": 2},
    )
    for name in names:
        await daemon.ingest(name, {"event": "CHECK_COMPLETED"})
    await wait_for(lambda: len(receiver.requests) == 4, timeout=5)
    assert active["most"] == 2
    assert all(r.status == 200 for r in receiver.requests)
    workers = daemon.service.workers
    await wait_for(lambda: all(workers[name].waiting == 0 for name in names), timeout=2)
    for name in names:
        assert (await daemon.status(name))["recent_failures"] == []
