"""Ingest bodies: validated into items whose `data` is the producer's own JSON text.

`data` is kept byte for byte as sent, whitespace outside strings aside: every number as it
was written (`-0`, `1E2`, `1e-400`, 30-digit integers), every string with its escapes
(`\\u00e9`, `\\/`). orjson parses almost every body, and its compact output is then the body's
own text; a body it would change takes the exact path, which cuts `data` out of the body.

No body holds the event loop for long: a small one is parsed on the loop, a large one with
few values in a thread (each C call inside is short), and a large one with many values (a
hostile one, or a telemetry dump) in a worker process, since one C call over millions of
values holds the GIL for hundreds of milliseconds wherever it runs.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import orjson

from webhookd.config import CONTROL_CHARACTERS

MAX_ITEMS = 1000
MAX_ID_LENGTH = 255
ITEM_KEYS = frozenset({"event", "data", "id"})
# orjson writes at most 254 levels of nesting; the exact path holds to the same.
MAX_DEPTH = 254
WHITESPACE = b" \t\n\r"  # JSON's insignificant whitespace (RFC 8259 §2)

# Where a body is parsed. Up to INLINE_BYTES: on the event loop (a few ms at worst). Up to
# THREAD_VALUES values and THREAD_BYTES bytes: in a thread, where no single C call (orjson,
# the standard library's scanner, str methods over the body) holds the GIL past ~15 ms.
# Beyond: in a worker process, one at a time, so hostile bodies cost one core at most.
INLINE_BYTES = 64 * 1024
THREAD_VALUES = 100_000
THREAD_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class IngestItem:
    """One validated ingest item; `data` is already JSON text."""

    id: str | None
    event: str
    data: str


class InvalidBody(ValueError):
    """The body is not a valid ingest request; the message says why, for the producer."""


def parse_ingest(body: bytes) -> list[IngestItem]:
    """Validate an ingest body: one webhook object or a non-empty array of up to 1000.

    Raises InvalidIngest (400) for anything else.
    """
    try:
        return _parse(body)
    except InvalidBody as exc:
        _refuse(str(exc))


def _refuse(detail: str) -> NoReturn:
    # Imported here: the worker process parses without the service (and all it imports).
    from webhookd.service import InvalidIngest

    raise InvalidIngest(detail) from None


def _unavailable(why: str) -> NoReturn:
    from webhookd.service import Unavailable

    raise Unavailable(f"the body could not be parsed: {why}; nothing was queued, send again")


async def parse_body(body: bytes) -> list[IngestItem]:
    """parse_ingest without holding the event loop for more than a few milliseconds; an
    Unavailable (503) when a large body's parser process cannot start or is stopped."""
    if len(body) <= INLINE_BYTES:
        return parse_ingest(body)
    items = await asyncio.to_thread(_parse_if_few_values, body)
    return await _parse_in_worker(body) if items is None else items


def _parse_if_few_values(body: bytes) -> list[IngestItem] | None:
    # Every value after the first in a container follows a comma; containers open with a
    # bracket. Commas inside strings count too: an estimate that errs towards the worker.
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > THREAD_VALUES or len(body) > THREAD_BYTES:
        return None
    return parse_ingest(body)


# -- the two paths -----------------------------------------------------------------------------


def _parse(body: bytes) -> list[IngestItem]:
    document = _as_orjson_writes_it(body)
    if document is not _CHANGED:
        documents, many = _documents(document)
        return [_item(index, doc, many, None) for index, doc in enumerate(documents)]
    text, document = _load_exact(body)
    documents, many = _documents(document)
    texts = _data_texts(text, many)
    return [
        _item(index, doc, many, data_text)
        for index, (doc, data_text) in enumerate(zip(documents, texts, strict=True))
    ]


_CHANGED = object()


def _as_orjson_writes_it(body: bytes) -> Any:
    """The document, if orjson writes it back as the body minus whitespace; else _CHANGED.

    Why equality after deleting all whitespace bytes is enough. Valid JSON holds raw tab,
    line feed and carriage return only between tokens, and spaces between tokens or inside
    strings; orjson's output has none between tokens. Deleting whitespace never touches a
    quote or a backslash, nor splits an escape (a backslash is never followed by whitespace),
    so both texts keep their strings, one for one, and everything outside the strings must
    match exactly: the same structure and literals, every number written the same way,
    no duplicate key dropped (that would drop a string). Within one string both spell the
    same characters, and orjson writes every space as itself: the two still match once
    spaces are gone only if the producer also wrote every space as itself (`\\u0020` would
    show) and spelled every other character as orjson does (`\\u00e9` against `é`, `\\/`
    against `/` show too). So when the texts match, each `orjson.dumps(data)` is the
    producer's text of `data` with its whitespace outside strings removed.
    """
    try:
        document = orjson.loads(body)
        written = orjson.dumps(document)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):  # 64-bit overflow, 255+ levels
        return _CHANGED
    if written == body:  # a compact producer: no need to delete anything
        return document
    if written.translate(None, WHITESPACE) != body.translate(None, WHITESPACE):
        return _CHANGED
    return document


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A surrogate escape (\ud800-\udfff) somewhere: the document must be checked for lone ones.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _load_exact(body: bytes) -> tuple[str, Any]:
    """The body's text and document, for a body orjson would not give back as sent.

    The standard library's parser, held to orjson's rules: UTF-8 only, no NaN or Infinity,
    no lone surrogate (anywhere: orjson refuses one even in a value a repeated key replaces).
    Numbers are only told apart from strings and objects here (`data` is kept as text), so
    `len` stands in for int() and float(): no 4300-digit limit, and 1e400 is as good as 1.
    """
    try:
        text = body.decode()
        document = json.loads(text, parse_int=len, parse_float=len, parse_constant=_reject_constant)
        if SURROGATE_ESCAPE.search(text):
            everything = json.loads(text, object_pairs_hook=list, parse_int=len, parse_float=len)
            json.dumps(everything, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        lone = f"\\u{ord(exc.object[exc.start]):04x}"
        raise InvalidBody(
            f"the body is not valid JSON: {lone} is half of a surrogate pair, not a character"
        ) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise InvalidBody(f"the body is not valid JSON: {exc}") from None
    return text, document


def _minify(json_text: str) -> str:
    """Valid JSON text without the whitespace between its tokens, in C-level passes.

    Raw tab, line feed and carriage return occur only between tokens; a space may be in a
    string too, so spaces go only from the text between strings. Unescaped quotes delimit
    the strings once the escapes `\\\\` and `\\"` stand aside as control characters, which
    valid JSON holds nowhere raw. (Every backslash begins an escape, so pairing them from
    the left, as str.replace does, finds exactly the `\\\\` escapes.)
    """
    text = json_text.replace("\n", "").replace("\r", "").replace("\t", "")
    if " " not in text:
        return text
    escaped = "\\" in text
    if escaped:
        text = text.replace("\\\\", "\x01").replace('\\"', "\x02")
    parts = text.split('"')  # strings' contents at the odd indexes
    parts[::2] = "\0".join(parts[::2]).replace(" ", "").split("\0")
    text = '"'.join(parts)
    return text.replace("\x02", '\\"').replace("\x01", "\\\\") if escaped else text


Scan = Callable[[str, int], tuple[Any, int]]  # JSONDecoder.raw_decode: (value, its end)


def _data_texts(text: str, many: bool) -> list[str | None]:
    """Each item's `data` as written in `text` (valid JSON), minified; the last one of
    several, as parsers take it; "{}" when absent, None when the item is no object."""
    text = _minify(text)
    scan = json.JSONDecoder(parse_int=len, parse_float=len).raw_decode
    if not many:
        return [_data_text(text, 0, scan)[1]]
    texts: list[str | None] = []
    index = 1  # past "["
    while True:
        end, data_text = _data_text(text, index, scan)
        texts.append(data_text)
        if text[end] == "]":
            return texts
        index = end + 1  # past ","


def _data_text(text: str, index: int, scan: Scan) -> tuple[int, str | None]:
    """(where the item at `index` of minified `text` ends, its data text)."""
    if text[index] != "{":
        return scan(text, index)[1], None
    start = end = 0
    index += 1
    while text[index] != "}":
        key, index = scan(text, index)  # then index is at ":"
        value_end = scan(text, index + 1)[1]
        if key == "data":
            start, end = index + 1, value_end
        index = value_end + 1 if text[value_end] == "," else value_end
    return index + 1, text[start:end] if end else "{}"


# -- items -------------------------------------------------------------------------------------


def _documents(document: Any) -> tuple[list[Any], bool]:
    if isinstance(document, dict):
        return [document], False
    if isinstance(document, list):
        if not document:
            raise InvalidBody("the array is empty; send 1 to 1000 webhooks")
        if len(document) > MAX_ITEMS:
            raise InvalidBody(f"{len(document)} webhooks in one request; the limit is {MAX_ITEMS}")
        return document, True
    raise InvalidBody('expected a webhook object {"event", "data", "id"?} or an array of them')


def _item(index: int, doc: Any, many: bool, data_text: str | None) -> IngestItem:
    """One item, checked; `data_text` is its data as sent (exact path), or None (orjson's)."""
    where = f"item {index}: " if many else ""
    if not isinstance(doc, dict):
        raise InvalidBody(f"{where}expected an object")
    unknown = set(doc) - ITEM_KEYS
    if unknown:
        raise InvalidBody(
            f"{where}unknown field(s) {', '.join(sorted(unknown))}; expected event, data, id"
        )
    event = doc.get("event")
    if not isinstance(event, str) or not event:
        raise InvalidBody(f"{where}event must be a non-empty string")
    data = doc.get("data", {})
    if not isinstance(data, dict):
        raise InvalidBody(f"{where}data must be a JSON object")
    webhook_id = doc.get("id")
    if webhook_id is not None and (
        not isinstance(webhook_id, str) or not 0 < len(webhook_id) <= MAX_ID_LENGTH
    ):
        raise InvalidBody(f"{where}id must be a string of 1 to {MAX_ID_LENGTH} characters")
    if webhook_id is not None and CONTROL_CHARACTERS.search(webhook_id):
        # It is sent as the webhook-id header of signed deliveries.
        raise InvalidBody(f"{where}id must not hold control characters (line breaks, ...)")
    try:
        # On the exact path, orjson only measures the depth (lone surrogates are gone).
        written = orjson.dumps(data).decode()
    except orjson.JSONEncodeError:
        raise InvalidBody(
            f"{where}data is nested too deeply (at most {MAX_DEPTH} levels)"
        ) from None
    return IngestItem(webhook_id, event, written if data_text is None else data_text)


# -- the worker process ------------------------------------------------------------------------


# The worker imports this very copy of webhookd, installed or not.
_PACKAGES = str(Path(__file__).resolve().parent.parent)
WORKER_ENVIRONMENT = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGES, os.environ.get("PYTHONPATH")])),
}


class _WorkerSlot:
    """One worker process at a time, per event loop (the daemon runs one; tests, many)."""

    loop: asyncio.AbstractEventLoop | None = None
    lock: asyncio.Lock | None = None

    @classmethod
    def get(cls) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if cls.loop is not loop or cls.lock is None:
            cls.loop, cls.lock = loop, asyncio.Lock()
        return cls.lock


async def _parse_in_worker(body: bytes) -> list[IngestItem]:
    async with _WorkerSlot.get():
        # Popen, not asyncio's subprocess: uvloop forks, which copies the daemon's page
        # tables on the event loop (20-40 ms at 300 MB); Popen uses vfork (0.5 ms). -P:
        # nothing in the working directory shadows a module.
        try:
            process = subprocess.Popen(  # noqa: ASYNC220 - see above
                [sys.executable, "-P", "-m", "webhookd.ingest"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=WORKER_ENVIRONMENT,
            )
        except OSError as exc:  # out of processes, memory or descriptors: for now
            _unavailable(f"the parser process could not start ({exc.strerror or exc})")
        # Shielded: cancelled before a thread was free to run it, the job would never run,
        # and nothing else reaps the worker or closes its pipes.
        feeding = asyncio.ensure_future(asyncio.to_thread(_worker_outcome, process, body))
        try:
            return await asyncio.shield(feeding)
        finally:
            if process.poll() is None:  # cancelled (the client left, or shutdown): the
                process.kill()  # thread's communicate() then returns, and reaps it
                feeding.add_done_callback(_forget)


def _forget(job: asyncio.Future[Any]) -> None:
    """A cancelled parse's outcome: nobody waits for it (the worker was killed)."""
    if not job.cancelled():
        job.exception()


def _worker_outcome(process: subprocess.Popen[bytes], body: bytes) -> list[IngestItem]:
    out, err = process.communicate(body)
    if process.returncode < 0:
        # Stopped by a signal: the unit's stop (systemd signals every process of the unit,
        # a terminal's Ctrl-C the whole foreground group), or the kernel short of memory.
        _unavailable(f"the parser process was stopped (signal {-process.returncode})")
    if process.returncode != 0:
        raise RuntimeError(
            f"the ingest parser process exited with {process.returncode}: "
            f"{err.decode(errors='replace')[-500:]}"
        )
    head, _, blob = out.partition(b"\n")
    outcome = orjson.loads(head)
    if "error" in outcome:
        _refuse(outcome["error"])
    items, offset = [], 0
    for webhook_id, event, size in outcome["items"]:
        items.append(IngestItem(webhook_id, event, blob[offset : offset + size].decode()))
        offset += size
    return items


def _worker() -> None:
    """Parse the body on stdin; write `{"error": detail}`, or `{"items": [[id, event,
    data bytes], ...]}` followed by the data texts, to stdout."""
    gc.disable()  # one body, then exit: collecting a hostile body's millions of objects is waste
    body = sys.stdin.buffer.read()
    try:
        items = _parse(body)
    except InvalidBody as exc:
        sys.stdout.buffer.write(orjson.dumps({"error": str(exc)}) + b"\n")
        return
    datas = [item.data.encode() for item in items]
    head = [[item.id, item.event, len(data)] for item, data in zip(items, datas, strict=True)]
    sys.stdout.buffer.write(orjson.dumps({"items": head}) + b"\n")
    sys.stdout.buffer.writelines(datas)


if __name__ == "__main__":
    _worker()
