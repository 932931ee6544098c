"""The receivers a customer can copy (examples/receivers/), run as a customer runs them.

Each example is started as a child process and fed by a real `webhookd run`: it must process
every webhook once, in order, batched or not, signed or not; ignore a sequence it already
processed, even across its own restart; and refuse a wrong secret or signature with 401.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT, Process, free_port, tenant, wait_for, write_config
from tests.test_e2e import EVENT, Api, start
from webhookd.sender import sign

EXAMPLES = ROOT / "examples" / "receivers"
LANGUAGES = ["python", "node"]
# Not ASCII: the Authorization header arrives as UTF-8 bytes, which each example must match.
SECRET = "s3cr3t-ü"
SIGNING_SECRET = "whsec_" + base64.b64encode(b"a signing key of 32 bytes, here.").decode()


def command(language: str) -> list[str]:
    if language == "python":
        return [sys.executable, str(EXAMPLES / "python" / "receiver.py")]
    node = shutil.which("node")
    if node is None:
        pytest.fail("`node` is not on PATH: install Debian's nodejs (.ci/run does)")
    return [node, str(EXAMPLES / "node" / "receiver.js")]


class Example:
    """One example receiver as a child process; what it processed, read from its output file."""

    def __init__(self, language: str, directory: Path, signing_secret: str | None) -> None:
        self.language = language
        self.directory = directory
        self.signing_secret = signing_secret
        self.port = free_port()
        self.output = directory / "processed.jsonl"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks"

    def log(self) -> str:
        path = self.directory / "receiver.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "WEBHOOK_SECRET": SECRET,
            "PORT": str(self.port),
            "WEBHOOK_OUTPUT": str(self.output),
            "WEBHOOK_STATE_FILE": str(self.directory / "last-sequence"),
        }
        if self.signing_secret:
            env["WEBHOOK_SIGNING_SECRET"] = self.signing_secret
        with (self.directory / "receiver.log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *command(self.language), env=env, stdout=log, stderr=log
            )
        self.proc = proc

        async def listening() -> bool:
            assert proc.returncode is None, f"{self.language} receiver exited:\n{self.log()}"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True

        await wait_for(listening, timeout=15)

    async def stop(self) -> None:
        """SIGTERM, as a service manager stops it; the worker finishes what it accepted."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 15)

    def processed(self) -> list[dict[str, Any]]:
        """One JSON line per processed webhook (a line still being written is left out)."""
        text = self.output.read_text() if self.output.exists() else ""
        return [json.loads(line) for line in text.split("\n")[:-1]]

    def sequences(self) -> list[int]:
        return [line["sequence"] for line in self.processed()]

    async def until_processed(self, count: int) -> list[int]:
        await wait_for(lambda: len(self.processed()) >= count, timeout=30)
        return self.sequences()


ExampleFactory = Callable[..., Awaitable[Example]]


@pytest.fixture
async def examples(tmp_path: Path) -> AsyncIterator[ExampleFactory]:
    made: list[Example] = []

    async def make(language: str, name: str, signing_secret: str | None = None) -> Example:
        example = Example(language, tmp_path / name, signing_secret)
        await example.start()
        made.append(example)
        return example

    yield make
    for example in made:
        if example.proc is not None and example.proc.returncode is None:
            example.proc.kill()
            await example.proc.wait()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


def webhook(sequence: int, secret: str = SECRET) -> dict[str, Any]:
    return {
        "id": f"direct-{sequence}",
        "sequence": sequence,
        "event": EVENT,
        "secret": secret,
        "timestamp": int(time.time()),
        "data": {"n": sequence},
    }


def headers_for(
    body: bytes, signing_secret: str | None, *, secret: str = SECRET, age: int = 0
) -> dict[str, str]:
    """The headers webhookd sends with `body`; `age` backdates the signature's timestamp."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {secret}"}
    if signing_secret:
        now = int(time.time()) - age
        headers["webhook-id"] = "direct"
        headers["webhook-timestamp"] = str(now)
        headers["webhook-signature"] = sign(signing_secret, "direct", now, body)
    return headers


async def post(
    session: aiohttp.ClientSession, example: Example, body: bytes, headers: dict[str, str]
) -> tuple[int, Any]:
    async with session.post(example.url, data=body, headers=headers) as response:
        text = await response.text()
        return response.status, (json.loads(text) if response.status != 200 else text)


async def resend(
    session: aiohttp.ClientSession, example: Example, document: Any
) -> tuple[int, Any]:
    """Post a document as webhookd would, signed if the example checks signatures."""
    body = json.dumps(document).encode()
    return await post(session, example, body, headers_for(body, example.signing_secret))


# The tenants each language's examples are fed by: one example per tenant, since an example
# keeps one "last sequence" counter (a receiver serves one tenant).
TENANTS: dict[str, dict[str, Any]] = {
    "single": {},
    "batched": {"batching": True, "batch_size": 4, "batch_window": 0},
    "signed": {"signing_secret": SIGNING_SECRET},
    "batched_signed": {
        "batching": True,
        "batch_size": 4,
        "batch_window": 0,
        "signing_secret": SIGNING_SECRET,
    },
    # No Authorization header: the example checks the secret in the body alone.
    "no_header": {"authorization_header": False},
}


@pytest.mark.parametrize("language", LANGUAGES)
async def test_each_webhook_from_the_daemon_is_processed_once_in_order(
    language: str,
    tmp_path: Path,
    examples: ExampleFactory,
    process_factory: Callable[..., Process],
    session: aiohttp.ClientSession,
) -> None:
    started = await asyncio.gather(
        *(
            examples(language, name, options.get("signing_secret"))
            for name, options in TENANTS.items()
        )
    )
    receivers = dict(zip(TENANTS, started, strict=True))
    config = write_config(
        tmp_path,
        {
            name: tenant(receivers[name].url, secret=SECRET, **options)
            for name, options in TENANTS.items()
        },
    )
    daemon = process_factory(config)
    await start(daemon)
    api = Api(session, daemon)

    queued: dict[str, list[dict[str, Any]]] = {name: [] for name in TENANTS}
    for size in (1, 4, 5):  # 10 webhooks per tenant, in requests of 1, 4 and 5
        for name in TENANTS:
            first = len(queued[name]) + 1
            items = [{"event": EVENT, "data": {"n": n}} for n in range(first, first + size)]
            queued[name] += await api.ingest(name, items)

    for name, example in receivers.items():
        context = f"{language} {name}:\n{example.log()}\ndaemon log:\n{daemon.log()[-2000:]}"
        assert await example.until_processed(10) == list(range(1, 11)), context
        for line, given in zip(example.processed(), queued[name], strict=True):
            assert line == {
                "sequence": given["sequence"],
                "id": given["id"],
                "event": EVENT,
                "timestamp": line["timestamp"],
                "data": {"n": given["sequence"]},  # n counts from 1, as the sequence does
            }, context  # and never the secret

    # Re-sends of webhooks already processed (a single one, a batch overlapping the last
    # one processed) are answered 200 and ignored; a new one after them is processed. The
    # worker takes them in order, so once 11 shows, the re-sends have been dealt with.
    for name, example in receivers.items():
        lines = example.processed()
        resent = [{**line, "secret": SECRET} for line in lines]
        assert await resend(session, example, resent[4]) == (200, "ok")
        assert await resend(session, example, resent[7:]) == (200, "ok")
        await api.ingest(name, {"event": EVENT, "data": {"n": 11}})
    for example in receivers.values():
        assert await example.until_processed(11) == list(range(1, 12)), example.log()


@pytest.mark.parametrize("language", LANGUAGES)
async def test_the_last_sequence_survives_a_restart(
    language: str, examples: ExampleFactory, session: aiohttp.ClientSession
) -> None:
    example = await examples(language, "restarted")
    assert await resend(session, example, [webhook(1), webhook(2), webhook(3)]) == (200, "ok")
    assert await example.until_processed(3) == [1, 2, 3]
    await example.stop()

    await example.start()
    # 2 and 3 again (webhookd re-sends a request whose answer it did not get), then 4; then
    # 6, after a gap (5 was parked by an operator): processed, with a note on stderr.
    assert await resend(session, example, [webhook(2), webhook(3), webhook(4)]) == (200, "ok")
    assert await resend(session, example, webhook(6)) == (200, "ok")
    assert await example.until_processed(5) == [1, 2, 3, 4, 6]
    assert "gap: 5-5 not received" in example.log()


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_wrong_secret_or_signature_is_refused_and_not_processed(
    language: str, examples: ExampleFactory, session: aiohttp.ClientSession
) -> None:
    example = await examples(language, "guarded", SIGNING_SECRET)
    # Refused requests carry sequence 2: had one been processed, the good sequence 1 sent
    # last would be skipped as already seen.
    body = json.dumps(webhook(2)).encode()
    good = headers_for(body, SIGNING_SECRET)
    wrong_bearer = {**good, "Authorization": "Bearer s3cr3t-u"}
    bad_signature = {**good, "webhook-signature": "v1,b2s= " + good["webhook-signature"][:-4]}
    unsigned = {k: v for k, v in good.items() if not k.startswith("webhook-")}
    stale = headers_for(body, SIGNING_SECRET, age=6 * 60)  # Standard Webhooks allows 5 min
    from_the_future = headers_for(body, SIGNING_SECRET, age=-6 * 60)
    for headers in (wrong_bearer, bad_signature, unsigned, stale, from_the_future):
        status, answer = await post(session, example, body, headers)
        assert status == 401, (headers, status, answer)
        assert answer["error"] in {"unauthorized", "bad_signature"}, answer
        assert SECRET not in json.dumps(answer)

    # Right header and signature, wrong secret in the body; the same without the header
    # (as a tenant with authorization_header = false sends).
    for document in (webhook(2, secret="s3cr3t"), [webhook(2), webhook(3, secret="")]):
        wrong_body = json.dumps(document).encode()
        headers = headers_for(wrong_body, SIGNING_SECRET)
        status, answer = await post(session, example, wrong_body, headers)
        assert (status, answer["error"]) == (401, "unauthorized"), answer
        del headers["Authorization"]
        status, answer = await post(session, example, wrong_body, headers)
        assert (status, answer["error"]) == (401, "unauthorized"), answer

    for garbage in (b"not json", b"[]", b'{"sequence": "2"}', b"[1, 2]"):
        status, answer = await post(session, example, garbage, headers_for(garbage, SIGNING_SECRET))
        assert (status, answer["error"]) == (400, "bad_body"), (garbage, answer)

    assert await resend(session, example, webhook(1)) == (200, "ok")
    assert await example.until_processed(1) == [1], example.log()


async def raw_status(example: Example, authorization: bytes, body: bytes) -> bytes:
    """The status line for a request whose Authorization header holds exactly these bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", example.port)
    writer.write(
        b"POST /webhooks HTTP/1.1\r\nHost: receiver\r\nContent-Type: application/json\r\n"
        b"Authorization: " + authorization + b"\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), body)
    )
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    await writer.wait_closed()
    return status.rstrip()


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_wrong_bearer_is_refused_without_a_signing_secret(
    language: str, examples: ExampleFactory, session: aiohttp.ClientSession
) -> None:
    example = await examples(language, "bearer-only")
    body = json.dumps(webhook(2)).encode()
    for secret in ("s3cr3t", "s3cr3t-üü", ""):
        status, answer = await post(session, example, body, headers_for(body, None, secret=secret))
        assert (status, answer["error"]) == (401, "unauthorized"), (secret, answer)
    # Bytes that are not UTF-8 (the secret in latin-1, say) are a wrong secret, not a crash.
    for authorization in (b"Bearer s3cr3t-\xfc", b"Bearer \xff\xfe"):
        status_line = await raw_status(example, authorization, body)
        assert status_line.startswith(b"HTTP/1.1 401 "), (authorization, status_line)
    assert await raw_status(example, f"Bearer {SECRET}".encode(), body) == b"HTTP/1.1 200 OK"
    assert await example.until_processed(1) == [2], example.log()
