"""Ingest review: tests for defects found in the ingest path.

Each test failed on the code as reviewed (d1cfcee) and passes since the commit after it;
each names what a producer does to trigger the defect and the promise (SPEC.md /
README.md) it breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.conftest import Daemon, Process, Receiver, StartDaemon, tenant, wait_for, write_config

EVENT = "CHECK_COMPLETED"
INGEST = "/v1/tenants/acme/webhooks"


def popen(process: Process) -> subprocess.Popen[bytes]:
    assert process.proc is not None, "the daemon was never started"
    return process.proc


async def exited_within(process: Process, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if popen(process).poll() is not None:
            return True
        await asyncio.sleep(0.05)
    return popen(process).poll() is not None


async def stalled_upload(process: Process) -> asyncio.StreamWriter:
    """A producer (or a proxy in front of it) that sent the head and part of an ingest body,
    then stalls: its Content-Length promises more than has arrived so far."""
    _reader, writer = await asyncio.open_connection(
        process.config.daemon.listen_host, process.config.daemon.listen_port
    )
    writer.write(
        f"POST {INGEST} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n".encode()
        + b'[{"event": "CHECK_COMPLETED", "data": {"part": '
    )
    await writer.drain()
    return writer


async def ingest_over_http(process: Process, items: Any) -> dict[str, Any]:
    """A normal ingest on its own connection (sent after the stalled one, so by its answer
    the daemon has begun reading the stalled request's body)."""
    reader, writer = await asyncio.open_connection(
        process.config.daemon.listen_host, process.config.daemon.listen_port
    )
    body = json.dumps(items).encode()
    writer.write(
        f"POST {INGEST} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202"), raw[:300]
    answer: dict[str, Any] = json.loads(payload)
    return answer


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


# -- 1. a stalled ingest upload holds SIGTERM for up to 60 s -------------------------------------


async def test_sigterm_exits_promptly_although_a_producer_is_mid_upload(
    tmp_path: Path, receiver: Receiver, process_factory: Callable[..., Process]
) -> None:
    """A producer (or a proxy, or a client that lied in Content-Length) is part-way through an
    ingest body when systemd sends SIGTERM. `Service.stop()` closes the API with
    `AppRunner.cleanup()`, which uses aiohttp's default `shutdown_timeout` of 60 s and waits
    that long for the handler, which itself waits up to the 60 s body timeout for a body
    that will only be refused with 503 anyway. The daemon does not exit for about 60 s,
    past the unit's `TimeoutStopSec=30s`, so systemd SIGKILLs it.

    Breaks README "On `SIGTERM` the daemon answers ingest with 503, starts no new attempts,
    gives in-flight deliveries `shutdown_grace` seconds (`TimeoutStopSec=30s` leaves room),
    records their outcomes and exits 0", and the docstring of `Service.stop`: "Ordered,
    bounded shutdown".
    """
    grace = 0.5
    config = write_config(
        tmp_path, {"acme": tenant(receiver.url("/acme"))}, daemon={"shutdown_grace": grace}
    )
    daemon = process_factory(config)
    await asyncio.to_thread(daemon.start)
    stalled = await stalled_upload(daemon)
    try:
        await ingest_over_http(daemon, {"event": EVENT})
        popen(daemon).send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Nothing is in flight: the grace is not even needed. 10 s is far more than any
        # clean stop takes here, and well inside TimeoutStopSec=30s.
        exited = await exited_within(daemon, 10.0)
        took = time.monotonic() - signalled
        assert exited, (
            f"still running {took:.1f} s after SIGTERM (grace {grace} s): a stalled ingest "
            "upload holds the shutdown"
        )
        assert popen(daemon).returncode == 0, daemon.log()
    finally:
        await close(stalled)


async def test_second_sigterm_stops_at_once_although_a_producer_is_mid_upload(
    tmp_path: Path, receiver: Receiver, process_factory: Callable[..., Process]
) -> None:
    """The same stalled ingest upload; the operator sends SIGTERM twice. `Service.abort()`
    only cuts the delivery grace short; the API's `AppRunner.cleanup()` still waits up to
    aiohttp's default 60 s `shutdown_timeout` for the stalled handler.

    Breaks README "a second signal stops at once (whatever was in flight stays queued and is
    sent again)".
    """
    config = write_config(
        tmp_path, {"acme": tenant(receiver.url("/acme"))}, daemon={"shutdown_grace": 10.0}
    )
    daemon = process_factory(config)
    await asyncio.to_thread(daemon.start)
    stalled = await stalled_upload(daemon)
    try:
        [queued] = (await ingest_over_http(daemon, {"event": EVENT}))["webhooks"]
        assert queued["status"] == "queued"
        popen(daemon).send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        popen(daemon).send_signal(signal.SIGTERM)
        second = time.monotonic()
        exited = await exited_within(daemon, 3.0)
        assert exited, (
            f"still running {time.monotonic() - second:.1f} s after a second SIGTERM: a "
            "stalled ingest upload holds the shutdown"
        )
        assert popen(daemon).returncode == 0, daemon.log()
    finally:
        await close(stalled)


# -- 2. decimal numbers in data are rounded to doubles -------------------------------------------


async def test_data_decimals_are_delivered_exactly_as_sent(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """A producer sends amounts and rates with more significant digits than a double holds
    (a NUMERIC(30,18) column, an exchange rate), as JSON numbers. Both parsing paths turn
    every non-integer number into a Python float (orjson; `json.loads(parse_float=_finite)`
    on the exact path), so the receiver gets a rounded value: 1234567890.123456789012345678
    arrives as 1234567890.1234567, 3.14159265358979323 as 3.141592653589793. Neither refused
    nor kept: a third outcome the README does not offer.

    Breaks README "`data` is delivered exactly as sent, integers beyond 64 bits included"
    (the only numbers refused are "NaN or a number beyond a double"; these are within range).
    """
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    sent = {
        # 19+ digits in a row: this body takes the exact (standard library) path.
        "exact path": b'{"event": "CHECK_COMPLETED", "data": '
        b'{"amount": 1234567890.123456789012345678}}',
        # Fewer: the orjson path.
        "fast path": b'{"event": "CHECK_COMPLETED", "data": {"rate": 3.14159265358979323}}',
    }
    for body in sent.values():
        status, answer = await daemon.request(
            "POST", INGEST, data=body, headers={"Content-Type": "application/json"}
        )
        assert status == 202, answer
    await wait_for(lambda: len(receiver.at("/acme", ok_only=True)) == 2, timeout=5)
    delivered = [
        json.loads(r.body, parse_float=Decimal)["data"] for r in receiver.at("/acme", ok_only=True)
    ]
    expected = [json.loads(b, parse_float=Decimal)["data"] for b in sent.values()]
    assert delivered == expected, (
        "a receiver that parses numbers exactly (Decimal, BigDecimal) sees other values: "
        f"sent {expected}, delivered {delivered}"
    )


# -- 3. a generated id sent back by the producer is queued a second time -------------------------


async def paused(start_daemon: StartDaemon, receiver: Receiver) -> Daemon:
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/acme"))})
    status, _ = await daemon.request("POST", "/v1/tenants/acme/pause")
    assert status == 200
    return daemon


async def test_an_accepted_generated_id_sent_again_is_a_duplicate(
    receiver: Receiver, start_daemon: StartDaemon
) -> None:
    """A producer ingests an event without an `id`, keeps the id the 202 gave it, and later
    resends the event with that id (its retry after an uncertain outcome, or a replay tool
    re-ingesting what peek showed). Only producer-given ids are written to `webhook_ids`
    (`Enqueue.apply`), so the generated id is unknown to the duplicate check: the event is
    queued again with a new sequence, and the tenant receives two webhooks with one `id`.

    Breaks SPEC §3 "`id`: unique per tenant" and §6 "`duplicate` (same tenant and `id`
    already accepted: not queued again; `sequence` is the one first given ...)"; README
    "`duplicate` (this `id` was accepted before: `sequence` is the first one given)".
    """
    daemon = await paused(start_daemon, receiver)
    [first] = (await daemon.ingest("acme", {"event": EVENT, "data": {"n": 1}}))["webhooks"]
    assert (first["sequence"], first["status"]) == (1, "queued")
    again = await daemon.ingest("acme", {"event": EVENT, "id": first["id"], "data": {"n": 1}})
    assert again["webhooks"] == [{"id": first["id"], "sequence": 1, "status": "duplicate"}], (
        f"the id {first['id']} the daemon generated and answered was accepted before; the "
        f"resend was queued again: {again['webhooks']}"
    )
    assert (await daemon.status("acme"))["waiting"] == 1
