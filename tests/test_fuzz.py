"""Fuzzing the edges a stranger controls: ingest bodies, raw HTTP requests, config files and
tenant PUTs.

Every input either works or is refused with the documented error. Nothing else is acceptable:
no 500, no traceback in the log, no hang, no webhook queued by a refused request, no exception
from the config loader other than ConfigError. Randomised loops print their seed; rerun one
with WEBHOOKD_FUZZ_SEED=<seed>. Hypothesis runs derandomised (the same examples every run) and
keeps no example database, so a failure here fails every time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import math
import os
import random
import re
import tempfile
import urllib.parse
import zlib
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.conftest import Daemon, StartDaemon, tenant, write_config
from webhookd import config as config_mod
from webhookd import ingest
from webhookd.config import (
    DAEMON_KEYS,
    DELIVERY_KEYS,
    PROXY_KEYS,
    TENANT_KEYS,
    TENANT_NAME,
    Config,
    ConfigError,
)
from webhookd.ingest import IngestItem
from webhookd.service import InvalidIngest

SEED = int(os.environ.get("WEBHOOKD_FUZZ_SEED") or 20261125)
EVENT = "CHECK_COMPLETED"  # the fuzzed tenant subscribes to this one only
UNSUBSCRIBED = "TASK_CREATED"
LONG_NUMBER = "12345678901234567890"  # orjson reads a double: the body takes the exact path
ENDPOINT = "http://127.0.0.1:9/never-called"  # the tenants are paused or never sent to

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# =============================================================================================
# 1. parse_ingest, a pure function: items or BadRequest, and the data kept exactly


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, which are not JSON (RFC 8259)."""
    return json.loads(text, parse_constant=_not_json)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down: 1 is not 1.0, True is not 1."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def parse(body: bytes) -> list[IngestItem] | InvalidIngest:
    """parse_ingest's outcome; any exception other than BadRequest fails the test."""
    try:
        return ingest.parse_ingest(body)
    except InvalidIngest as exc:
        assert exc.status == 400 and exc.detail, exc
        return exc


def is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_items(items: list[IngestItem]) -> None:
    """What every accepted item must be, whatever the body was: storable and sendable."""
    for item in items:
        assert isinstance(item.event, str) and item.event, item
        assert is_unicode(item.event), f"event is not valid Unicode: {item.event!r}"
        assert item.id is None or (isinstance(item.id, str) and 0 < len(item.id) <= 255), item
        assert item.id is None or is_unicode(item.id), f"id is not valid Unicode: {item.id!r}"
        assert is_unicode(item.data), f"data is not valid Unicode: {item.data[:200]!r}"
        try:
            data = strict_loads(item.data)
        except ValueError as exc:
            raise AssertionError(f"data is not JSON ({exc}): {item.data[:200]!r}") from None
        assert isinstance(data, dict), item.data[:200]


def has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(has_non_finite(v) for v in value)
    return False


def valid_item(item: Any) -> bool:
    if not isinstance(item, dict) or not set(item) <= {"event", "data", "id"}:
        return False
    event, data, webhook_id = item.get("event"), item.get("data", {}), item.get("id")
    return (
        isinstance(event, str)
        and event != ""
        and isinstance(data, dict)
        and (
            webhook_id is None
            or (
                isinstance(webhook_id, str)
                and 0 < len(webhook_id) <= 255
                # no control character but tab: it is sent as a header value
                and not any((ord(c) < 32 and c != "\t") or c == "\x7f" for c in webhook_id)
            )
        )
    )


def acceptable(document: Any) -> bool:
    """docs/http-api.md#post-v1tenantstwebhooks: one object or 1-1000 of them, each {event, data?,
    id?}; NaN is not JSON."""
    if has_non_finite(document):
        return False
    if isinstance(document, dict):
        return valid_item(document)
    if isinstance(document, list):
        return 0 < len(document) <= 1000 and all(valid_item(i) for i in document)
    return False


BIG_INTS = st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**19, -(10**30), 10**400]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | BIG_INTS
    | st.floats()
    | st.text()  # hypothesis never makes a lone surrogate; those are fuzzed as escapes below
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
DATA_OBJECTS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5)
EVENTS = st.sampled_from([EVENT, UNSUBSCRIBED, "NOT_AN_EVENT", ""]) | st.text(max_size=10)


@st.composite
def webhook_items(draw: st.DrawFn) -> Any:
    item: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        item["event"] = draw(EVENTS if draw(st.integers(0, 4)) else JSON_VALUES)
    if draw(st.booleans()):
        item["data"] = draw(DATA_OBJECTS if draw(st.integers(0, 4)) else JSON_VALUES)
    if draw(st.booleans()):
        item["id"] = draw(
            st.text(min_size=0, max_size=300) if draw(st.integers(0, 4)) else JSON_VALUES
        )
    if draw(st.integers(0, 6)) == 0:  # a random extra key
        item[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    return item


DOCUMENTS = webhook_items() | st.lists(webhook_items(), max_size=6) | JSON_VALUES


@FUZZ
@given(document=DOCUMENTS, ensure_ascii=st.booleans())
@example(document={"event": EVENT, "data": {"big": 2**64, "neg": -(2**63) - 1}}, ensure_ascii=True)
@example(document={"event": EVENT, "data": {"f": 0.1, "e": 1e300, "z": -0.0}}, ensure_ascii=True)
@example(document={"event": EVENT, "data": {"x": math.inf}}, ensure_ascii=True)
@example(
    document={"event": EVENT, "data": {"n": int(LONG_NUMBER), "x": math.nan}}, ensure_ascii=True
)
@example(document={"event": EVENT, "id": "x" * 256}, ensure_ascii=True)
def test_parse_ingest_accepts_exactly_the_valid_documents_and_keeps_data_exact(
    document: Any, ensure_ascii: bool
) -> None:
    body = json.dumps(document, ensure_ascii=ensure_ascii).encode()
    outcome = parse(body)
    if not acceptable(document):
        assert isinstance(outcome, InvalidIngest), (body[:300], outcome)
        return
    assert isinstance(outcome, list), (body[:300], outcome)
    check_items(outcome)
    items = [document] if isinstance(document, dict) else document
    assert len(outcome) == len(items)
    for given_item, parsed in zip(items, outcome, strict=True):
        assert parsed.event == given_item["event"]
        assert parsed.id == given_item.get("id")
        data = strict_loads(parsed.data)
        assert same(data, given_item.get("data", {})), (given_item, parsed.data)


@FUZZ
@given(body=st.binary(max_size=3000))
@example(body=b"")
@example(body=b"\xef\xbb\xbf{}")  # a UTF-8 byte order mark
@example(body=b"\x00{\x00}")  # UTF-16 as the standard library would guess it
@example(body=b'{"event":"A"}' * 2)
def test_parse_ingest_any_bytes(body: bytes) -> None:
    outcome = parse(body)
    if isinstance(outcome, list):
        check_items(outcome)


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A valid body with random byte edits: the inputs a parser trips on."""
    items = draw(st.lists(webhook_items(), min_size=1, max_size=3))
    if draw(st.booleans()):
        items[0] = {"event": EVENT, "data": {"n": int(LONG_NUMBER), "s": "é"}}
    body = bytearray(json.dumps(items, ensure_ascii=draw(st.booleans())).encode())
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(body)))
        action = draw(st.sampled_from(["insert", "replace", "delete", "truncate"]))
        byte = draw(st.integers(0, 255) | st.sampled_from(list(b'{}[]",:\\0-.eE\x80\xff')))
        if action == "insert":
            body.insert(position, byte)
        elif action == "replace" and position < len(body):
            body[position] = byte
        elif action == "delete" and position < len(body):
            del body[position]
        elif action == "truncate":
            del body[position:]
    return bytes(body)


@FUZZ
@given(body=mutated_bodies())
def test_parse_ingest_mutated_bodies(body: bytes) -> None:
    outcome = parse(body)
    if isinstance(outcome, list):
        check_items(outcome)


INVALID_UTF8 = st.sampled_from(
    [b"\x80", b"\xff", b"\xc3", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
) | st.binary(min_size=1, max_size=6).filter(lambda b: not _decodes(b))


def _decodes(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(
    garbage=INVALID_UTF8,
    where=st.sampled_from(["event", "id", "key", "value"]),
    exact=st.booleans(),
)
def test_parse_ingest_refuses_invalid_utf8(garbage: bytes, where: str, exact: bool) -> None:
    """Bytes that are not UTF-8 anywhere in a string: a 400, on both parsing paths (UTF-8
    encoded surrogates, ED A0 80, included: they are not UTF-8 either)."""
    number = LONG_NUMBER if exact else "1"
    parts = {"event": EVENT.encode(), "id": b"id-1", "key": b"k", "value": b"v"}
    parts[where] = parts[where][:1] + garbage + parts[where][1:]
    body = b'{"event":"%s","id":"%s","data":{"n":%s,"%s":"%s"}}' % (
        parts["event"],
        parts["id"],
        number.encode(),
        parts["key"],
        parts["value"],
    )
    assert isinstance(parse(body), InvalidIngest), body


@pytest.mark.parametrize("exact", [False, True], ids=["fast-path", "exact-path"])
@pytest.mark.parametrize("where", ["event", "id", "data-key", "data-value"])
@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\ud800\\u0041"])
def test_parse_ingest_refuses_lone_surrogates(exact: bool, where: str, escape: str) -> None:
    """A lone surrogate escape is valid JSON syntax but not Unicode text: it can be neither
    stored nor sent, so it is a bad request wherever it is (orjson refuses it; the exact path,
    taken when orjson would write the body otherwise, must too)."""
    number = LONG_NUMBER if exact else "1"
    fields = {"event": EVENT, "id": "id-1", "data-key": "k", "data-value": "v"}
    fields[where] = "A" + escape
    body = (
        f'{{"event":"{fields["event"]}","id":"{fields["id"]}",'
        f'"data":{{"n":{number},"{fields["data-key"]}":"{fields["data-value"]}"}}}}'
    ).encode()
    outcome = parse(body)
    if isinstance(outcome, list):
        check_items(outcome)


@pytest.mark.parametrize("exact", [False, True], ids=["fast-path", "exact-path"])
@pytest.mark.parametrize("number", ["1e400", "-1e400", "1e309", "-0.0", "1E+2", "1.5e-400"])
def test_parse_ingest_numbers_beyond_a_double(exact: bool, number: str) -> None:
    """A number a double cannot hold, or would write otherwise, is kept as written: never
    turned into `Infinity` (not JSON), 0.0 or another spelling."""
    data = f'{{"x":{number},"n":{LONG_NUMBER if exact else 1}}}'
    outcome = parse(f'{{"event":"{EVENT}","data":{data}}}'.encode())
    assert isinstance(outcome, list), outcome
    check_items(outcome)
    assert [item.data for item in outcome] == [data]


def nested(depth: int, shape: str) -> bytes:
    if shape == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def _ranges(depths: list[int]) -> str:
    spans: list[str] = []
    for depth in depths:
        if spans and spans[-1].split("-")[-1] == str(depth - 1):
            spans[-1] = spans[-1].split("-")[0] + f"-{depth}"
        else:
            spans.append(str(depth))
    return ", ".join(spans)


@pytest.mark.parametrize("exact", [False, True], ids=["fast-path", "exact-path"])
@pytest.mark.parametrize("shape", ["array", "object"])
def test_parse_ingest_deeply_nested_data(exact: bool, shape: str) -> None:
    """Nested data of every depth from 1 to 1200, and 10,000: kept exactly or refused, 400."""
    number = LONG_NUMBER if exact else "1"
    failures: dict[str, list[int]] = {}
    for depth in [*range(1, 1201), 10_000]:
        data = b'{"n":%s,"x":%s}' % (number.encode(), nested(depth, shape))
        body = b'{"event":"%s","data":%s}' % (EVENT.encode(), data)
        try:
            outcome = ingest.parse_ingest(body)
        except InvalidIngest:
            continue
        except Exception as exc:
            failures.setdefault(f"{type(exc).__name__}: {exc}", []).append(depth)
            continue
        # Compact in, compact out: the exact text is the only faithful answer (and comparing
        # text needs no recursion).
        if [i.data for i in outcome] != [data.decode()]:
            failures.setdefault("data changed", []).append(depth)
    summary = "; ".join(f"depth {_ranges(d)} -> {error}" for error, d in failures.items())
    assert not failures, f"parse_ingest with data nested in {shape}s: {summary}"


@pytest.mark.parametrize("shape", ["array", "object"])
@pytest.mark.parametrize("exact", [False, True], ids=["fast-path", "exact-path"])
def test_parse_ingest_document_nested_10000_deep(shape: str, exact: bool) -> None:
    body = nested(10_000, shape)
    if exact:
        body = b"[" + LONG_NUMBER.encode() + b"," + body + b"]"
    assert isinstance(parse(body), InvalidIngest)


@pytest.mark.parametrize("exact", [False, True], ids=["fast-path", "exact-path"])
def test_parse_ingest_huge_strings_are_kept_exactly(exact: bool) -> None:
    rng = random.Random(SEED)
    alphabet = 'aé€😀"\\\n\t\x00\u2028'
    text = "".join(rng.choices(alphabet, k=2_000_000))
    data = {"s": text, "n": int(LONG_NUMBER) if exact else 1, text[:1000]: [text[:5000]]}
    body = json.dumps({"event": EVENT, "id": "i" * 255, "data": data}, ensure_ascii=False)
    [item] = ingest.parse_ingest(body.encode())
    assert item.id == "i" * 255
    assert same(strict_loads(item.data), data)
    assert isinstance(parse(json.dumps({"event": EVENT, "id": "i" * 256}).encode()), InvalidIngest)
    assert isinstance(parse(json.dumps({"event": text}).encode()), list)  # 422 comes later


def test_parse_ingest_item_count_limits() -> None:
    item = {"event": EVENT, "data": {"n": 1}}
    assert len(ingest.parse_ingest(json.dumps([item] * 1000).encode())) == 1000
    assert isinstance(parse(json.dumps([item] * 1001).encode()), InvalidIngest)
    assert isinstance(parse(b"[]"), InvalidIngest)
    exact = {"event": EVENT, "data": {"n": int(LONG_NUMBER)}}
    assert isinstance(parse(json.dumps([exact] * 1001).encode()), InvalidIngest)


# =============================================================================================
# 2. The HTTP ingest endpoint, over raw sockets


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def exchange(port: int, request: bytes, *, half_close: bool = False) -> Answer | None:
    """Send raw bytes, read to EOF; None when the server closed without answering.

    Every request says `Connection: close`, so EOF marks the end of the answer; a server
    that neither answers nor closes within 10 s has hung.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            if half_close:
                writer.write_eof()
            await writer.drain()
        try:
            raw = await asyncio.wait_for(reader.read(), 10)
        except ConnectionError:
            raw = b""
        except TimeoutError:
            raise AssertionError(f"no answer within 10 s (a hang): {request[:300]!r}") from None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return parse_answer(raw)


def parse_answer(raw: bytes) -> Answer | None:
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:  # 100 Continue: the real answer follows
            raw = rest
            continue
        if "content-length" in headers:
            rest = rest[: int(headers["content-length"])]
        return Answer(status, headers, rest)
    return None


def http_request(
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    *,
    framing: str = "length",
    rng: random.Random | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        chunks, rest, sizes = [], body, rng or random.Random(0)
        while rest:
            size = sizes.randint(1, 4096)
            chunks.append(b"%x\r\n%s\r\n" % (len(rest[:size]), rest[:size]))
            rest = rest[size:]
        payload = b"".join(chunks) + b"0\r\n\r\n"
    else:
        payload = b""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 2**63 - 1, 2**64, -(2**63) - 1, 10**30, rng.randint(-99, 99)])
    if kind == 2:
        return rng.choice([0.5, -0.0, 1e300, 5e-324, rng.random()])
    if kind in (3, 4, 5):
        return "".join(rng.choice('ab é€😀"\\\n\x00') for _ in range(rng.randrange(12)))
    if kind in (6, 7):
        return {random_json(rng, 9): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def random_key(rng: random.Random) -> str:
    value = random_json(rng, 9)
    return value if isinstance(value, str) else str(value)


CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "Application/JSON",
    "application/cloudevents+json",
    "application/json; charset=latin-1",
    'application/json; charset="',
    "application/json;;;",
    "application/json; a=b; a=c",
    "text/plain",
    "text/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "",
    ";",
    "/",
    "*/*",
    "application/",
    "json",
    "application/json\t",
]
PATHS = [
    "/v1/tenants/acme/webhooks",
    "/v1/tenants/acme/webhooks",
    "/v1/tenants/acme/webhooks",
    "/v1/tenants/acme/webhooks?x=%00&limit=5",
    "/v1/tenants/off/webhooks",
    "/v1/tenants/nope/webhooks",
    "/v1/tenants/%ZZ/webhooks",
    "/v1/tenants/a%2Fb/webhooks",
    "/v1/tenants/%F0%9F%98%80/webhooks",
    "/v1/tenants/" + "a" * 65 + "/webhooks",
    "/v1/tenants/acme/webhooks/extra",
    "/v1/tenants//webhooks",
]


class Bodies:
    """Ingest bodies: mostly valid-looking, each with a twist a producer's bug could add."""

    def __init__(self, rng: random.Random, limit: int) -> None:
        self.rng = rng
        self.limit = limit
        self.ids = ["dup-1", "dup-2", "ümlaut-id"]

    def item(self) -> dict[str, Any]:
        rng = self.rng
        item: dict[str, Any] = {"event": rng.choice([EVENT, EVENT, EVENT, UNSUBSCRIBED, "NOPE"])}
        if rng.random() < 0.8:
            item["data"] = {random_key(rng): random_json(rng) for _ in range(rng.randrange(5))}
        if rng.random() < 0.5:
            item["id"] = rng.choice([*self.ids, f"id-{rng.random()}", "", "x" * 256])
        if rng.random() < 0.1:
            item[rng.choice(["secret", "sequence", "Event", random_key(rng)])] = 1
        if rng.random() < 0.05:
            del item["event"]
        return item

    def valid(self) -> bytes:
        items = [self.item() for _ in range(self.rng.randrange(1, 6))]
        document: Any = items[0] if len(items) == 1 and self.rng.random() < 0.5 else items
        return json.dumps(document, ensure_ascii=self.rng.random() < 0.5).encode()

    def make(self) -> tuple[str, bytes]:
        rng = self.rng
        kind = rng.choice(
            ["valid"] * 6
            + ["mutated"] * 3
            + ["bytes", "scalar", "empty", "many", "deep", "surrogate", "non-finite", "big"]
        )
        body = self.valid()
        if kind == "mutated":
            edited = bytearray(body)
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(edited) + 1)
                if rng.random() < 0.5 and at < len(edited):
                    del edited[at]
                else:
                    edited.insert(at, rng.choice(b'{}[]",:\\0e\x80\xff'))
            body = bytes(edited)
        elif kind == "bytes":
            body = rng.randbytes(rng.randrange(1, 300))
        elif kind == "scalar":
            body = rng.choice([b"null", b"1", b'"x"', b"true", b"[1]", b"[[]]", b"{}", b"[{}]"])
        elif kind == "empty":
            body = rng.choice([b"", b"[]", b" ", b"\n"])
        elif kind == "many":
            count = rng.choice([1000, 1001])
            body = json.dumps([{"event": UNSUBSCRIBED}] * count).encode()
        elif kind == "deep":
            depth = rng.choice([rng.randrange(1, 2000), 255, 300, 980, 990, 10_000])
            number = LONG_NUMBER if rng.random() < 0.5 else "1"
            inner = nested(depth, rng.choice(["array", "object"])).decode()
            body = f'{{"event":"{EVENT}","data":{{"n":{number},"x":{inner}}}}}'.encode()
        elif kind == "surrogate":
            number = LONG_NUMBER if rng.random() < 0.7 else "1"
            where = rng.choice(["event", "id", "key", "value"])
            parts = {
                "event": rng.choice([EVENT, UNSUBSCRIBED]),
                "id": "s",
                "key": "k",
                "value": "v",
            }
            parts[where] += "\\ud800"
            body = (
                f'{{"event":"{parts["event"]}","id":"{parts["id"]}-{rng.random()}",'
                f'"data":{{"n":{number},"{parts["key"]}":"{parts["value"]}"}}}}'
            ).encode()
        elif kind == "non-finite":
            number = LONG_NUMBER if rng.random() < 0.7 else "1"
            value = rng.choice(["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1e309"])
            body = f'{{"event":"{EVENT}","data":{{"n":{number},"x":{value}}}}}'.encode()
        elif kind == "big":
            body = json.dumps({"event": EVENT, "data": {"s": "x" * (self.limit + 10)}}).encode()
        return kind, body


@dataclass
class Violations:
    """Every broken promise, grouped by what broke, with the first input that broke it."""

    seen: dict[str, tuple[int, str]] = field(default_factory=dict)

    def add(self, what: str, sample: str) -> None:
        count, first = self.seen.get(what, (0, sample))
        self.seen[what] = (count + 1, first)

    def report(self) -> str:
        return "\n".join(
            f"- {what} ({count}x), e.g. {sample}" for what, (count, sample) in self.seen.items()
        )


def check_answer(
    answer: Answer | None, allowed_2xx: frozenset[int], *, parser_refuses: bool = False
) -> str | None:
    """None when the answer keeps the contract (a listed 2xx, or a 4xx JSON error); else what
    broke. `parser_refuses`: aiohttp's HTTP parser answers this request itself, before the
    application sees it, in text; any 4xx will do."""
    if answer is None:
        return "no answer to a well-formed request (connection closed)"
    if answer.status >= 500:
        return f"HTTP {answer.status} {answer.body[:120]!r}"
    if not (400 <= answer.status < 500 or answer.status in allowed_2xx):
        return f"unexpected HTTP {answer.status}"
    if parser_refuses:
        return None if 400 <= answer.status < 500 else f"HTTP {answer.status} to {answer.body!r}"
    if not answer.headers.get("content-type", "").startswith("application/json"):
        return f"HTTP {answer.status} is not JSON: {answer.headers.get('content-type')}"
    try:
        body = answer.json()
    except ValueError:
        return f"HTTP {answer.status} body is not JSON: {answer.body[:120]!r}"
    if answer.status >= 400:
        ok = (
            isinstance(body, dict)
            and set(body) == {"error", "detail"}
            and all(isinstance(v, str) and v for v in body.values())
        )
        return None if ok else f"HTTP {answer.status} error body is not {{error, detail}}: {body}"
    return None


def allowed_for(method: str, path: str) -> frozenset[int]:
    """POST to a webhooks path may be taken (202); GET there is a peek (200)."""
    if "/webhooks" not in path:
        return frozenset()
    return frozenset({202} if method == "POST" else {200} if method == "GET" else set())


async def ingest_daemon(start_daemon: StartDaemon, tmp_path: Path) -> Daemon:
    """acme (paused, subscribed to CHECK_COMPLETED only) and off (disabled)."""
    tenants = {
        "acme": tenant(ENDPOINT, events=[EVENT]),
        "off": tenant(ENDPOINT, enabled=False),
    }
    daemon = await start_daemon(write_config(tmp_path, tenants, daemon={"max_body_bytes": 65536}))
    status, _ = await daemon.request("POST", "/v1/tenants/acme/pause")
    assert status == 200
    return daemon


def port_of(daemon: Daemon) -> int:
    return int(daemon.base.rsplit(":", 1)[1])


async def queue_state(daemon: Daemon) -> tuple[int, int]:
    """(healthz status, acme's waiting count) — and the off tenant must still hold nothing."""
    health, _ = await daemon.request("GET", "/healthz")
    acme, off = await daemon.status("acme"), await daemon.status("off")
    assert off["waiting"] == 0, off
    return health, int(acme["waiting"])


def error_events(logs: list[MutableMapping[str, Any]]) -> list[str]:
    """The error-level events the daemon logged: each one an internal failure."""
    return [
        " ".join(
            [e["event"], *(f"{k}={v}" for k, v in e.items() if k not in ("event", "log_level"))]
        )[:200]
        for e in logs
        if e.get("log_level") in ("error", "critical")
    ]


async def test_random_requests_answer_202_or_a_4xx_json_error_and_refusals_queue_nothing(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Random methods, paths, Content-Types, encodings, framings and bodies against a paused
    tenant: each answer is a 202 (POST) or 200 (GET: a peek) or a 4xx JSON error, the queue
    grows by exactly the 202's `queued` entries, healthz stays 200, nothing is logged as an
    error. Violations are collected, grouped, and reported together."""
    print(f"HTTP fuzz seed {SEED} (rerun with WEBHOOKD_FUZZ_SEED={SEED})")
    rng = random.Random(SEED)
    daemon = await ingest_daemon(start_daemon, tmp_path)
    port = port_of(daemon)
    bodies = Bodies(rng, 65536)
    violations = Violations()
    waiting = 0
    kinds: dict[str, int] = {}
    with capture_logs() as logs:
        for _ in range(300):
            kind, body = bodies.make()
            method = rng.choice(["POST"] * 24 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"])
            path = PATHS[0] if rng.random() < 0.6 else rng.choice(PATHS)
            headers: list[tuple[str, str]] = []
            content_type = rng.choice(["application/json"] * 20 + CONTENT_TYPES)
            if content_type is not None:
                headers.append(("Content-Type", content_type))
            encoding = rng.choice([None] * 12 + ["gzip", "gzip!", "deflate", "deflate!", "x-zz"])
            encoding_label = {"gzip!": "gzip (garbage)", "deflate!": "deflate (garbage)"}.get(
                encoding or "none", encoding or "none"
            )
            if encoding in ("gzip", "deflate"):
                body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
            elif encoding is not None:  # a declared encoding the bytes are not in
                body = b"\x1f\x8b\x08garbage" + body[:50] if encoding == "gzip!" else body
                encoding = encoding.rstrip("!")
            if encoding is not None:
                headers.append(("Content-Encoding", encoding))
            if rng.random() < 0.2:
                headers.append(("Accept", rng.choice(["text/plain", "*/*", "application/xml"])))
            if rng.random() < 0.1:
                headers.append(("Expect", "100-continue"))
            if rng.random() < 0.1:
                headers.append(("Authorization", "Bearer " + random_key(rng).encode().hex()))
            framing = rng.choice(["length"] * 4 + ["chunked"])
            request = http_request(method, path, headers, body, framing=framing, rng=rng)
            sample = f"{kind}: {request[:400]!r}"
            answer = await exchange(port, request)
            # An unknown method token is refused by llhttp itself, in text/plain.
            problem = check_answer(
                answer, allowed_for(method, path), parser_refuses=method == "FOO"
            )
            if problem:
                what = f"{problem[:30]} [{method}, {kind} body, encoding {encoding_label}]"
                violations.add(what, f"{problem} <- {sample}")
            queued = 0
            if answer is not None and answer.status == 202 and path.startswith(PATHS[0]):
                queued = sum(w["status"] == "queued" for w in answer.json()["webhooks"])
            health, now_waiting = await queue_state(daemon)
            if health != 200:
                violations.add("healthz not 200 afterwards", sample)
            if now_waiting != waiting + queued:
                violations.add(
                    "queue changed by other than the 202's queued count",
                    f"{waiting}+{queued} expected, {now_waiting} waiting <- {sample}",
                )
            waiting = now_waiting
            if answer is not None:
                kinds[f"{answer.status}"] = kinds.get(f"{answer.status}", 0) + 1
    for event in error_events(logs):
        violations.add("error logged: " + event.split(" ")[0], event)
    print(f"answers by status: {sorted(kinds.items())}; {waiting} queued")
    assert not violations.seen, f"seed {SEED}:\n{violations.report()}"
    assert kinds.get("202", 0) >= 10 and waiting > 0, f"too few accepted to mean much: {kinds}"


HISTORY_PARAMS = {
    "limit": ["1", "100", "1000", "0", "1001", "-1", "", "1e2", "x", "٣"],
    "order": ["newest", "oldest", "", "NEWEST", "random"],
    "cursor": ["0", "5", "-1", "x", "9" * 30, ""],
    "event": [EVENT, "", "NOPE", "\x00", "é" * 300],
    "from_sequence": ["0", "1", "-3", "1.5", "9" * 19, ""],
    "to_sequence": ["0", "2", "x", "99999999999999999999"],
    "since": ["0", "1700000000", "2026-12-01T00:00:00Z", "2026-12-01T00:00:00", "nan", "inf", ""],
    "until": ["-1", "1e30", "2026-13-01T00:00:00Z", "2026-12-01T00:00:00+02:00", "monday"],
    "outcome": ["delivered", "parked,discarded", "", ",", "lost", "delivered,,"],
    "format": ["text", "json", ""],
    "colour": ["blue"],
}
REPLAY_VALUES: list[Any] = [
    0,
    1,
    -1,
    2**62,
    2**63,
    1.5,
    "1",
    "",
    None,
    True,
    False,
    [],
    {},
    "2026-12-01T00:00:00Z",
    "2026-12-01",
    "x" * 300,
    math.inf,
    1e300,
    "1700000000",
]
REPLAY_FIELDS = [
    "from_sequence",
    "to_sequence",
    "since",
    "until",
    "event",
    "dry_run",
    "replay_id",
    "other",
]


async def test_random_history_queries_lookups_and_replay_bodies_answer_2xx_or_a_4xx_json_error(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Random history query strings, looked-up ids and replay bodies: each answer is a 200 or
    a 4xx JSON error, nothing is queued (nothing was delivered, so no replay matches),
    healthz stays 200 and nothing is logged as an error."""
    rng = random.Random(SEED)
    daemon = await ingest_daemon(start_daemon, tmp_path)
    await daemon.ingest("acme", [{"event": EVENT, "id": f"h-{n}"} for n in range(3)])
    violations = Violations()
    kinds: dict[str, int] = {}
    with capture_logs() as logs:
        for _ in range(200):
            choice = rng.random()
            body: bytes | None = None
            if choice < 0.4:
                keys = rng.sample(sorted(HISTORY_PARAMS), rng.randrange(0, 4))
                query = "&".join(
                    f"{k}={urllib.parse.quote(rng.choice(HISTORY_PARAMS[k]))}" for k in keys
                )
                method, path = "GET", f"/v1/tenants/acme/history?{query}"
            elif choice < 0.6:
                webhook_id = rng.choice(
                    ["h-1", "nope", "%2F", "a" * 256, "%00", random_key(rng) or "x", "%FF"]
                )
                if webhook_id not in ("%2F", "%00", "%FF"):
                    webhook_id = urllib.parse.quote(webhook_id, safe="")
                method, path = "GET", f"/v1/tenants/acme/webhooks/{webhook_id}"
            else:
                document: Any = {
                    k: rng.choice(REPLAY_VALUES)
                    for k in rng.sample(REPLAY_FIELDS, rng.randrange(0, 5))
                }
                if rng.random() < 0.1:
                    document = random_json(rng)
                body = json.dumps(document).encode()
                if rng.random() < 0.1:
                    body = body[: rng.randrange(len(body) + 1)] + rng.randbytes(3)
                method, path = "POST", "/v1/tenants/acme/replay"
            headers = {"Accept": "text/plain"} if rng.random() < 0.2 else {}
            sample = f"{method} {path} {body!r}"[:300]
            async with daemon.session.request(
                method, daemon.base + path, data=body, headers=headers
            ) as response:
                text = await response.text()
                status = response.status
                kinds[str(status)] = kinds.get(str(status), 0) + 1
                if status >= 500 or not (status == 200 or 400 <= status < 500):
                    violations.add(f"HTTP {status}", f"{text[:120]} <- {sample}")
                elif status >= 400:
                    try:
                        error = json.loads(text)
                        assert set(error) == {"error", "detail"} and all(error.values())
                    except (ValueError, AssertionError, AttributeError):
                        violations.add(
                            f"HTTP {status} not a JSON error", f"{text[:120]} <- {sample}"
                        )
                elif method == "POST" and json.loads(text)["count"]:
                    violations.add("a replay matched what was never delivered", sample)
            health, waiting = await queue_state(daemon)
            if (health, waiting) != (200, 3):
                violations.add("healthz or the queue changed", f"{health} {waiting} <- {sample}")
    for event in error_events(logs):
        violations.add("error logged: " + event.split(" ")[0], event)
    print(f"answers by status: {sorted(kinds.items())}")
    assert not violations.seen, f"seed {SEED}:\n{violations.report()}"
    assert kinds.get("200", 0) >= 20 and kinds.get("400", 0) >= 20, kinds


# The inputs the random loop above found, each pinned so that it fails on its own.
NASTY_BODIES = {
    "data-nested-300-deep": (
        f'{{"event":"{EVENT}","data":{{"x":{nested(300, "object").decode()}}}}}'.encode()
    ),
    "data-nested-985-deep-exact-path": (
        f'{{"event":"{EVENT}","data":{{"n":{LONG_NUMBER},'
        f'"x":{nested(985, "array").decode()}}}}}'.encode()
    ),
    "lone-surrogate-id-exact-path": (
        f'{{"event":"{EVENT}","id":"\\ud800","data":{{"n":{LONG_NUMBER}}}}}'.encode()
    ),
    "lone-surrogate-id-unsubscribed-exact-path": (
        f'{{"event":"{UNSUBSCRIBED}","id":"\\ud800","data":{{"n":{LONG_NUMBER}}}}}'.encode()
    ),
    "lone-surrogate-event-exact-path": (
        f'{{"event":"\\ud800","data":{{"n":{LONG_NUMBER}}}}}'.encode()
    ),
    "1e400-exact-path": f'{{"event":"{EVENT}","data":{{"x":1e400,"n":{LONG_NUMBER}}}}}'.encode(),
}


@pytest.mark.parametrize("name", sorted(NASTY_BODIES))
async def test_nasty_ingest_body_is_refused_or_kept_as_valid_json(
    name: str, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Each body is refused with a 4xx and queues nothing, or is taken and then shows (peek)
    as valid JSON; never a 5xx, never an error in the log."""
    daemon = await ingest_daemon(start_daemon, tmp_path)
    headers = [("Content-Type", "application/json")]
    with capture_logs() as logs:
        answer = await exchange(
            port_of(daemon), http_request("POST", PATHS[0], headers, NASTY_BODIES[name])
        )
        problem = check_answer(answer, frozenset({202}))
        assert answer is not None
        _, waiting = await queue_state(daemon)
        if answer.status == 202:
            queued = sum(w["status"] == "queued" for w in answer.json()["webhooks"])
            assert waiting == queued
            peek = await exchange(port_of(daemon), http_request("GET", PATHS[0], [], b""))
            peek_problem = check_answer(peek, frozenset({200}))
            assert peek_problem is None, f"taken with 202, then peek: {peek_problem}"
        else:
            assert waiting == 0, f"HTTP {answer.status} but {waiting} webhook(s) queued"
    assert problem is None, problem
    assert error_events(logs) == []


async def test_a_bad_request_does_not_fail_the_requests_committed_with_it(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Ingest is group-committed: a bad item that reaches the store (here a lone surrogate
    id, which SQLite cannot encode) must be refused on its own, not take the whole group,
    other producers' valid webhooks for other tenants included, down with it."""
    daemon = await ingest_daemon(start_daemon, tmp_path)
    bad = NASTY_BODIES["lone-surrogate-id-exact-path"]
    headers = {"Content-Type": "application/json"}
    bad_answers, good_statuses = [], []
    for _ in range(5):  # the bad one amid 20 good ones, so that some commit holds both
        good = [daemon.request("POST", PATHS[0], json={"event": EVENT}) for _ in range(20)]
        answers = await asyncio.gather(
            *good[:10], daemon.request("POST", PATHS[0], data=bad, headers=headers), *good[10:]
        )
        bad_answers.append(answers[10])
        good_statuses += [status for status, _ in answers[:10] + answers[11:]]
    refused = all(400 <= status < 500 for status, _ in bad_answers)
    taken = good_statuses.count(202)
    assert (refused, taken) == (True, 100), f"{taken} of 100 good ones taken; bad: {bad_answers}"
    assert (await daemon.status("acme"))["waiting"] == 100


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bodies_are_refused_with_a_json_415(
    encoding: str, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await ingest_daemon(start_daemon, tmp_path)
    headers = [("Content-Type", "application/json"), ("Content-Encoding", encoding)]
    with capture_logs() as logs:
        answer = await exchange(
            port_of(daemon), http_request("POST", PATHS[0], headers, b"\x1f\x8b\x08 not gzip")
        )
    assert answer is not None
    assert check_answer(answer, frozenset()) is None, (answer.status, answer.body)
    # Compressed ingest is not accepted at all (README): garbage or not, a JSON 415.
    assert answer.status == 415, (answer.status, answer.body)
    assert json.loads(answer.body)["error"] == "unsupported_media_type"
    assert error_events(logs) == []
    assert await queue_state(daemon) == (200, 0)


async def test_truncated_bodies_and_content_length_lies_are_not_internal_errors(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A client that promises more body than it sends, then hangs up: the daemon may close
    or answer 4xx, but must not hang, answer 5xx, log an internal error or queue anything."""
    rng = random.Random(SEED + 1)
    daemon = await ingest_daemon(start_daemon, tmp_path)
    port = port_of(daemon)
    violations = Violations()
    with capture_logs() as logs:
        for _ in range(30):
            body = json.dumps([{"event": EVENT, "data": {"i": i}} for i in range(5)]).encode()
            cut = rng.randrange(len(body))
            headers = [("Content-Type", "application/json")]
            lie = rng.choice(["longer", "huge", "chunked"])
            if lie == "chunked":
                request = http_request("POST", PATHS[0], headers, body, framing="chunked")
                request = request[: request.index(b"\r\n\r\n") + 4 + cut]
            else:
                length = len(body) if lie == "longer" else rng.choice([10**6, 10**12, 2**63])
                headers.append(("Content-Length", str(length)))
                request = http_request("POST", PATHS[0], headers, framing="none") + body[:cut]
            answer = await exchange(port, request, half_close=True)
            if answer is not None and not 400 <= answer.status < 500:
                violations.add(f"HTTP {answer.status}", repr(request[:300]))
            health, waiting = await queue_state(daemon)
            if (health, waiting) != (200, 0):
                violations.add("healthz or queue changed", f"{health} {waiting}")
    for event in error_events(logs):
        violations.add("error logged for a client hang-up: " + event.split(" ")[0], event)
    assert not violations.seen, violations.report()


# =============================================================================================
# 3. The config loader, and the tenant API that writes tenant files


TENANT_TABLE_KEYS = [*TENANT_KEYS, *PROXY_KEYS, *DELIVERY_KEYS]
KNOWN = {
    "": {"daemon", "events", "delivery", "tenants"},
    "daemon": set(DAEMON_KEYS),
    "events": {"custom"},
    "delivery": set(DELIVERY_KEYS),
    "tenant": set(TENANT_TABLE_KEYS),
}
# Files each example's folder holds, so that path-valued keys can point at something real.
BINARY_FILE, TOKEN_FILE, SECRET_FILE = "binary.dat", "token.txt", "tenant.secret"
PATHS_IN_CONFIG = [
    "webhookd.db",
    "tenants.d",
    "",
    BINARY_FILE,
    TOKEN_FILE,
    SECRET_FILE,
    "missing/file",
    "/",
    ".",
    "~",
    "~/x",
    "~no-such-user-webhookd/x",
    "a\x00b",
    "x" * 300,
    "ü/€",
]
SIGNING = [
    "whsec_" + base64.b64encode(b"k" * 32).decode(),
    "whsec_" + base64.b64encode(b"k" * 8).decode(),
    "whsec_",
    "whsec_!!!!",
    "whsec_abc",
    "sk_live_x",
    "",
]
DURATIONS = [
    "7d",
    "24h",
    "90m",
    "30s",
    "2w",
    "0",
    0,
    1,
    86400.5,
    "1.5h",
    "7 days",
    "-1d",
    "",
    1e300,
]
PLAUSIBLE: dict[str, list[Any]] = {
    "database": PATHS_IN_CONFIG,
    "tenants_dir": PATHS_IN_CONFIG,
    "ca_file": PATHS_IN_CONFIG,
    "api_token_file": PATHS_IN_CONFIG,
    "secret_file": PATHS_IN_CONFIG,
    "listen": ["127.0.0.1:8787", "[::1]:0", "localhost:1", "0.0.0.0:80", ":80", "x", "1.2.3.4:"],
    "api_token": ["", "tok"],
    "log_format": ["auto", "json", "console", "xml"],
    "log_level": ["debug", "info", "warning", "error", "trace"],
    "durability": ["full", "normal", "none"],
    "source_address": ["", "127.0.0.1", "::1", "::1%lo", "256.0.0.1", "host"],
    "endpoint": [
        "http://hooks.example/x",
        "https://hooks.example:8443/p?q=1",
        "ftp://hooks.example/",
        "http://",
        "http://[::1",
        "http://u:p@hooks.example/",
        "http://hooks.example/#frag",
        "http://hooks.example:99999/",
        "http://hooks.example:-1/",
    ],
    "events": [
        ["*"],
        [EVENT],
        [],
        ["NOPE"],
        ["PROFILE_STATUS_CHANGED"],
        ["COLLECTED_DATA_UPDATED"],
        ["INVOICE_PAID"],
        ["*", EVENT, EVENT],
    ],
    "custom": [[], ["INVOICE_PAID"], [EVENT], ["lower"], ["A" * 65], [1]],
    "history_retention": DURATIONS,
    "idempotency_window": DURATIONS,
    "history_max_bytes": [
        "1GiB",
        "500MB",
        "0",
        0,
        "10KiB",
        "1 GB",
        "-1GiB",
        1 << 51,
        "1.5GiB",
        2**20,
    ],
    "history_payloads": [True, False, "false", 0],
    "database_password_file": PATHS_IN_CONFIG,
    "proxy_password_file": PATHS_IN_CONFIG,
    "portal_key_file": PATHS_IN_CONFIG,
    "proxy": [
        "http://proxy.example:3128",
        "http://user@proxy.example:3128",
        "https://proxy.example",
        "socks5://proxy.example:1080",
        "http://proxy.example:3128/path",
        "",
    ],
    "proxy_checks_addresses": [True, False, "yes"],
    "portal_can_edit": [True, False, 1],
    "portal_frame_ancestors": [
        [],
        ["https://app.example.com"],
        ["'self'", "https://*.example.com:8443"],
        ["https://app.example.com/path"],
        ["javascript:alert(1)"],
        "https://app.example.com",
    ],
    "portal_base_url": ["", "https://hooks.example", "https://hooks.example/w/", "ftp://x", "x"],
    "advertise_url": ["http://10.0.0.5:8787", "https://a.example", "", "10.0.0.5:8787"],
    **{
        key: DURATIONS
        for key in ("lease_seconds", "api_header_timeout", "api_idle_timeout", "ui_session_ttl")
    },
    "portal_link_ttl": DURATIONS,
    "api_max_connections": [0, 1, 100, 1000, -1, 2**40, 1.5],
    "replay_max": [1, 0, 100_000, 10_000_001, -5, 1.5],
    "secret": ["s3cr3t", "", 0],
    "secret_env": ["PATH", "WEBHOOKD_NO_SUCH_VARIABLE", ""],
    "signing_secret": SIGNING,
    "success_statuses": [[200], [200, 204], [], [301], [199], [200, True], 200],
    **{
        key: [0, 1, -1, 10, 1000, 1001, 2**63, 0.5, -0.0, 1e308, math.inf, -math.inf, math.nan]
        for key in (
            "batch_size",
            "batch_window",
            "batch_timeout",
            "timeout",
            "retry_base",
            "retry_doublings",
            "retry_after_doublings",
            "recent_failures",
            "max_connections",
            "shutdown_grace",
            "max_body_bytes",
        )
    },
}

TOML_SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.datetimes()
    | st.dates()
    | st.times()
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
RANDOM_KEYS = st.text(max_size=12) | st.sampled_from(["Database", "tenant", "a.b", "é", " "])


def value_for(draw: st.DrawFn, key: str) -> Any:
    if key in PLAUSIBLE and draw(st.integers(0, 3)):
        return draw(st.sampled_from(PLAUSIBLE[key]))
    return draw(TOML_VALUES)


@st.composite
def tables(draw: st.DrawFn, keys: list[str], base: dict[str, Any] | None = None) -> Any:
    """A table of some known keys (plausible or random values) and some unknown ones; now
    and then not a table at all."""
    if draw(st.integers(0, 15)) == 0:
        return draw(TOML_VALUES)
    table = dict(base or {})
    for key in draw(st.lists(st.sampled_from(keys), max_size=5, unique=True)):
        table[key] = value_for(draw, key)
    for key in draw(st.lists(st.sampled_from(list(table)), unique=True)) if table else []:
        if draw(st.integers(0, 5)) == 0:
            del table[key]
    if draw(st.integers(0, 4)) == 0:
        table[draw(RANDOM_KEYS)] = draw(TOML_VALUES)
    return table


TENANT_BASE_NO_SECRET = {"endpoint": "http://hooks.example/x", "events": ["*"]}
TENANT_BASE = {**TENANT_BASE_NO_SECRET, "secret": "s"}
TENANT_NAMES = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True) | st.text(max_size=70)
TENANT_FILE_NAMES = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True) | st.text(
    st.characters(codec="ascii", min_codepoint=32, exclude_characters="/"), min_size=1, max_size=70
)


@st.composite
def config_documents(draw: st.DrawFn) -> dict[str, Any]:
    document: dict[str, Any] = {}
    sections = {
        "daemon": tables(list(DAEMON_KEYS), {"listen": "127.0.0.1:8787"}),
        "events": tables(["custom"]),
        "delivery": tables(list(DELIVERY_KEYS)),
        "tenants": st.dictionaries(
            TENANT_NAMES, tables(TENANT_TABLE_KEYS, TENANT_BASE), max_size=3
        ),
    }
    for name, strategy in sections.items():
        if draw(st.integers(0, 5)):
            document[name] = draw(strategy)
    if draw(st.integers(0, 5)) == 0:
        document.setdefault(draw(RANDOM_KEYS), draw(TOML_VALUES))
    return document


def key_path(*parts: str) -> str:
    return ".".join(
        p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else json.dumps(p, ensure_ascii=False)
        for p in parts
    )


def unknown_key_errors(source: str, document: dict[str, Any]) -> set[str]:
    """The `unknown key` lines the loader must report for this document."""
    expected = {f"{source}: {key_path(k)}: unknown key" for k in set(document) - KNOWN[""]}
    for section in ("daemon", "events", "delivery"):
        table = document.get(section)
        if isinstance(table, dict):
            for key in set(table) - KNOWN[section]:
                expected.add(f"{source}: {key_path(section, key)}: unknown key")
    tenants = document.get("tenants")
    if isinstance(tenants, dict):
        for name, table in tenants.items():
            if TENANT_NAME.fullmatch(name) and isinstance(table, dict):
                for key in set(table) - KNOWN["tenant"]:
                    expected.add(f"{source}: {key_path('tenants', name, key)}: unknown key")
    return expected


SEGMENT = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*")'
KEY_PATH = re.compile(rf"{SEGMENT}(?:\.{SEGMENT})*: \S")
WHOLE_FILE = ("file not found", "cannot read", "not valid TOML")


def check_error_lines(error: ConfigError, source: str, tenant_files: list[str]) -> None:
    assert error.errors, "a ConfigError with no error in it"
    assert str(error) == "\n".join(error.errors)
    for line in error.errors:
        assert isinstance(line, str), line
        if line.startswith(f"{source}: "):
            rest = line[len(source) + 2 :]
            assert rest.startswith(WHOLE_FILE) or KEY_PATH.match(rest), f"no key path: {line!r}"
        else:
            assert any(line.startswith(f"{f}: ") for f in tenant_files), f"no file: {line!r}"


def within(value: float, low: float, high: float, *, low_open: bool = False) -> bool:
    if not math.isfinite(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


def check_config(config: Config) -> None:
    """A loaded config holds only values docs/configuration.md allows: finite numbers in their
    ranges."""
    d = config.daemon
    assert within(d.shutdown_grace, 0, 3600), f"daemon.shutdown_grace = {d.shutdown_grace}"
    assert 1 <= d.max_connections <= 100_000 and 1024 <= d.max_body_bytes <= 1 << 30
    assert (
        d.api_token
        or d.listen_host in ("localhost", "127.0.0.1", "::1")
        or (d.listen_host.startswith("127."))
    )
    for name, options in [("delivery", config.delivery)] + [
        (f"tenants.{t.name}", t.delivery) for t in config.tenants.values()
    ]:
        where = f"{name}: {options}"
        assert 1 <= options.batch_size <= 1000, where
        assert within(options.batch_window, 0, 10), where
        assert within(options.batch_timeout, 0, 600, low_open=True), where
        assert within(options.timeout, 0, 600, low_open=True), where
        assert within(options.retry_base, 0, 7 * 86400, low_open=True), where
        assert 0 <= options.retry_doublings <= 30, where
        assert within(options.retry_after_doublings, 0, 30 * 86400, low_open=True), where
        assert options.success_statuses and all(200 <= s <= 299 for s in options.success_statuses)
        assert 0 <= options.recent_failures <= 1000, where
        assert within(options.history_retention, 0, 3650 * 86400), where
        assert isinstance(options.history_payloads, bool), where
    assert within(d.idempotency_window, 1, 3650 * 86400), d.idempotency_window
    assert d.history_max_bytes is None or (1 << 20) <= d.history_max_bytes <= 1 << 50
    assert 1 <= d.replay_max <= 10_000_000, d.replay_max
    for t in config.tenants.values():
        assert TENANT_NAME.fullmatch(t.name) and t.secret.reveal() and t.events, t


@contextlib.contextmanager
def config_folder() -> Iterator[Path]:
    """A fresh folder with the files config values may point at; the cwd while in use, so
    the loader is given a relative path and must name it as given."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "conf").mkdir()
        (root / "conf" / BINARY_FILE).write_bytes(b"\xff\xfe\x00\x80binary")
        (root / "conf" / TOKEN_FILE).write_text("tok\n")
        (root / "conf" / SECRET_FILE).write_text("s3cr3t\n")
        (root / "conf" / SECRET_FILE).chmod(0o600)
        with contextlib.chdir(root):
            yield root


def load_outcome(source: str) -> Config | ConfigError:
    try:
        return config_mod.load(source, environ={"PATH": "/bin"})
    except ConfigError as exc:
        return exc


def check_load(document: dict[str, Any], tenant_files: dict[str, Any]) -> None:
    """Load `document` (and these tenant files): a valid Config or a well-formed ConfigError."""
    with config_folder() as root:
        source = "conf/webhookd.toml"
        Path(source).write_text(tomli_w.dumps(document))
        tenants_dir = root / "conf" / "tenants.d"
        tenants_dir.mkdir()
        for name, table in tenant_files.items():
            if name in (".", ".."):
                continue
            text = tomli_w.dumps(table) if isinstance(table, dict) else f"x = {table!r}"
            with contextlib.suppress(OSError):
                (tenants_dir / f"{name}.toml").write_text(text)
        files = [os.fspath(p) for p in tenants_dir.resolve().glob("*.toml")]
        outcome = load_outcome(source)
        if isinstance(outcome, Config):
            check_config(outcome)
        else:
            check_error_lines(outcome, source, files)
            missing = unknown_key_errors(source, document) - set(outcome.errors)
            assert not missing, f"unknown keys not reported: {missing}; got {outcome.errors}"


# Each example writes files; shrinking a failure would take a minute, and the inputs it found
# are pinned, minimal, in NASTY_CONFIGS below.
@settings(FUZZ, max_examples=120, phases=[Phase.explicit, Phase.generate])
@given(document=config_documents(), tenant_files=st.dictionaries(TENANT_FILE_NAMES, TOML_VALUES))
def test_config_load_returns_a_config_or_a_config_error_naming_file_and_key(
    document: dict[str, Any], tenant_files: dict[str, Any]
) -> None:
    check_load(document, tenant_files)


NO_HOME = "~no-such-user-webhookd"
NASTY_CONFIGS: dict[str, dict[str, Any]] = {
    "database-in-unknown-home": {"daemon": {"database": f"{NO_HOME}/db"}},
    "tenants_dir-in-unknown-home": {"daemon": {"tenants_dir": NO_HOME}},
    "api_token_file-with-nul": {"daemon": {"api_token_file": "a\x00b"}},
    # Found by the fuzzer once it drew more keys: Path.is_file() raised ENAMETOOLONG.
    "ca_file-name-too-long": {"daemon": {"ca_file": "x" * 300}},
    "api_token_file-not-utf8": {"daemon": {"api_token_file": BINARY_FILE}},
    "secret_file-in-unknown-home": {
        "tenants": {"t": {**TENANT_BASE_NO_SECRET, "secret_file": f"{NO_HOME}/s"}}
    },
    "secret_file-with-nul": {"tenants": {"t": {**TENANT_BASE_NO_SECRET, "secret_file": "a\x00b"}}},
    "secret_file-not-utf8": {
        "tenants": {"t": {**TENANT_BASE_NO_SECRET, "secret_file": BINARY_FILE}}
    },
    "retry_base-inf": {"delivery": {"retry_base": math.inf}},
    "shutdown_grace--inf": {"daemon": {"shutdown_grace": -math.inf}},
    "tenant-timeout-inf": {"tenants": {"t": {**TENANT_BASE, "timeout": math.inf}}},
    "batch_window-nan": {"delivery": {"batch_window": math.nan}},
    "timeout-nan": {"delivery": {"timeout": math.nan}},
    "shutdown_grace-nan": {"daemon": {"shutdown_grace": math.nan}},
    "empty-key-in-daemon": {"daemon": {"": 1}},
    "empty-key-at-top": {"": 1},
}


@pytest.mark.parametrize("name", list(NASTY_CONFIGS))
def test_config_load_nasty_values(name: str) -> None:
    """Values the fuzzer above turned up, pinned: each is an error naming file and key."""
    document = NASTY_CONFIGS[name]
    check_load(document, {})
    with config_folder():
        Path("conf/webhookd.toml").write_text(tomli_w.dumps(document))
        assert isinstance(load_outcome("conf/webhookd.toml"), ConfigError)


@FUZZ
@given(content=st.binary(max_size=500) | st.text(max_size=200).map(str.encode))
@example(content=b"\xff\xfe[daemon]")
@example(content=b"[daemon]\ndatabase = \xc3\x28")
@example(content=b"a = 1\na = 2")
@example(content=b"[[tenants]]\nx=1")
@example(content=b"tenants = 1")
def test_config_load_random_bytes(content: bytes) -> None:
    with config_folder():
        source = "conf/webhookd.toml"
        Path(source).write_bytes(content)
        outcome = load_outcome(source)
        try:
            content.decode()
        except UnicodeDecodeError:
            assert isinstance(outcome, ConfigError), outcome
        if isinstance(outcome, ConfigError):
            check_error_lines(outcome, source, [])
        else:
            check_config(outcome)


# -- the tenant API: PUT /v1/tenants/{t} -------------------------------------------------------


def files_in(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def put_body(rng: random.Random) -> bytes:
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice([b"", b"null", b"[]", b"1", b'"x"', b"{", b"\xff", b'{"a":NaN}'])
    if kind == 1:
        return json.dumps(random_json(rng)).encode()
    table: dict[str, Any] = {
        "endpoint": "http://hooks.example/x",
        "events": [EVENT],
        "secret": f"s-{rng.random()}",
    }
    if rng.random() < 0.3:  # the secret from elsewhere
        source = rng.choice(["secret_file", "secret_env"])
        table[source] = rng.choice(PLAUSIBLE[source])
        del table["secret"]
    for _ in range(rng.randrange(3)):
        key = rng.choice([*TENANT_TABLE_KEYS, "delivery", "name", random_key(rng)])
        if rng.random() < 0.6 and key in PLAUSIBLE:
            table[key] = rng.choice(PLAUSIBLE[key])
        else:
            table[key] = random_json(rng)
    if rng.random() < 0.1:
        table.pop(rng.choice(list(table)), None)
    if rng.random() < 0.05:
        table["secret"] = "***"
    try:
        return json.dumps(table, allow_nan=False).encode()
    except ValueError:  # NaN or Infinity: send them anyway, as a careless client would
        return json.dumps(table).encode()


async def test_tenant_put_answers_2xx_or_a_4xx_json_error_and_a_refusal_writes_nothing(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Random tenant tables (real keys with plausible or random values, random keys, bodies
    that are not objects or not JSON) PUT to valid, main-file and invalid names."""
    print(f"tenant API fuzz seed {SEED} (rerun with WEBHOOKD_FUZZ_SEED={SEED})")
    rng = random.Random(SEED + 2)
    (tmp_path / BINARY_FILE).write_bytes(b"\xff\xfe\x00\x80binary")
    (tmp_path / SECRET_FILE).write_text("s3cr3t\n")
    config = write_config(tmp_path, {"main": tenant(ENDPOINT)}, daemon={"tenants_dir": "tenants.d"})
    daemon = await start_daemon(config)
    port = port_of(daemon)
    directory = tmp_path / "tenants.d"
    violations = Violations()
    statuses: dict[int, int] = {}
    names = ["t1", "t2", "T-3", "x_y", "main", "bad.name", "a" * 65, "%00"]
    with capture_logs() as logs:
        for _ in range(200):
            name = rng.choice(names[:4]) if rng.random() < 0.8 else rng.choice(names)
            body = put_body(rng)
            before = files_in(directory)
            content_type = rng.choice(["application/json", "application/json", "text/plain"])
            request = http_request(
                "PUT", f"/v1/tenants/{name}", [("Content-Type", content_type)], body
            )
            answer = await exchange(port, request)
            sample = f"PUT {name} {body[:300]!r}"
            if answer is None:
                violations.add("no answer", sample)
                continue
            statuses[answer.status] = statuses.get(answer.status, 0) + 1
            if answer.status not in (200, 201, 400, 404, 409):
                violations.add(f"HTTP {answer.status}", f"{answer.body[:200]!r} <- {sample}")
            problem = check_answer(answer, frozenset({200, 201}))
            if problem is None and answer.status < 300 and answer.json().get("tenant") != name:
                problem = "a 2xx for another tenant"
            if problem and answer.status < 500:
                violations.add(problem[:60], f"{problem} <- {sample}")
            after = files_in(directory)
            if answer.status >= 300 and after != before:
                violations.add(f"HTTP {answer.status} changed tenants_dir", sample)
            if answer.status in (200, 201) and f"{name}.toml" not in after:
                violations.add("2xx without a tenant file", sample)
            health, _ = await daemon.request("GET", "/healthz")
            if health != 200:
                violations.add("healthz not 200 afterwards", sample)
    for event in error_events(logs):
        violations.add("error logged: " + event.split(" ")[0], event)
    print(f"answers by status: {sorted(statuses.items())}")
    assert not violations.seen, f"seed {SEED}:\n{violations.report()}"
    assert statuses.get(201, 0) + statuses.get(200, 0) >= 3, statuses
    assert statuses.get(400, 0) >= 10, statuses


@pytest.mark.parametrize(
    "secret_file", ["~no-such-user-webhookd/secret", "a\x00b", BINARY_FILE], ids=repr
)
async def test_tenant_put_with_an_unreadable_secret_file_is_a_400(
    secret_file: str, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    (tmp_path / BINARY_FILE).write_bytes(b"\xff\xfe\x00\x80binary")
    config = write_config(tmp_path, {}, daemon={"tenants_dir": "tenants.d"})
    daemon = await start_daemon(config)
    body = {"endpoint": "http://hooks.example/x", "events": [EVENT], "secret_file": secret_file}
    with capture_logs() as logs:
        status, answer = await daemon.request("PUT", "/v1/tenants/t1", json=body)
    assert status == 400 and answer["error"] == "invalid_tenant", (status, answer)
    assert "secret_file" in answer["detail"]
    assert error_events(logs) == []
    assert files_in(tmp_path / "tenants.d") == {}
