"""Review of what a tenant's endpoint receives (SPEC §3, §8; README "What a tenant's
endpoint receives"): each test failed on the reviewed code (27d11a9)
because of one mismatch, and passes since the commit after it.

Checked and found matching (no test here): the request line (POST, path and query
%-encoded only where a request target cannot carry them, an empty path sent as `/`),
Host with and without a port and for `[::1]:port`, Content-Type, Content-Length, User-Agent,
Authorization and its omission, no duplicate headers; unbatched and batched bodies, field
names and types, JSON-special and non-ASCII secrets in the body, rotated secrets; Standard
Webhooks ids, timestamps and signatures; redirects, success statuses.
"""

from __future__ import annotations

import time
from pathlib import Path

import idna
import pytest

from tests.conftest import Receiver, StartDaemon, tenant, wait_for, write_config
from webhookd import config as config_mod
from webhookd import http1
from webhookd.sender import Sender
from webhookd.store import Webhook

# -- 1. internationalised host names go to another domain ---------------------------------------


@pytest.mark.parametrize("label", ["straße", "ς"], ids=["sharp-s", "final-sigma"])
async def test_an_internationalised_endpoint_host_is_the_configured_domain(
    tmp_path: Path, label: str
) -> None:
    """SPEC §3: "Every delivery is `POST <endpoint>`" — to the endpoint as configured.

    http1.parse_target encodes a non-ASCII host with Python's "idna" codec, which is
    IDNA 2003: it maps `ß` to `ss` and `ς` to `σ`, so `https://straße.example/hook` is
    delivered to `strasse.example`, another registrable domain (DENIC has registered `ß`
    names since 2010), with its Host header and TLS name, carrying the tenant's data and
    secret. IDNA 2008 / UTS #46 (browsers, curl, and yarl, i.e. the aiohttp client that
    http1 replaced) keep them: `xn--strae-oqa.example`. The name resolved is shown by the
    real sender's DNS error (`.example` never resolves)."""
    host = f"{label}.example"
    endpoint = f"https://{host}/hook"
    path = write_config(tmp_path, {"acme": tenant(endpoint)})
    acme = config_mod.load(path).tenants["acme"]  # the configuration takes it
    expected = idna.encode(host, uts46=True).decode("ascii")

    target = http1.parse_target(acme.endpoint)
    sender = Sender(allow_private=True)
    try:
        hook = Webhook(1, "evt-1", "CHECK_COMPLETED", time.time(), "{}")
        outcome = await sender.send(acme, [hook])
    finally:
        await sender.close()
    assert not outcome.ok
    seen = (target.authority, target.host, outcome.error)
    assert seen == (expected, expected, f"DNS: cannot resolve {expected}")


# -- 2. a secret whose ends are whitespace ------------------------------------------------------


@pytest.mark.parametrize("secret", ["s3cr3t ", "s3cr3t\t"], ids=["trailing-space", "trailing-tab"])
async def test_the_authorization_header_a_receiver_reads_is_bearer_and_the_body_secret(
    tmp_path: Path, receiver: Receiver, start_daemon: StartDaemon, secret: str
) -> None:
    """SPEC §1: "the secret travels twice: as the field `secret` in every webhook object,
    and as `Authorization: Bearer <secret>`"; SPEC §3: `Authorization` is `Bearer <secret>`.

    config refuses control characters in a secret because it goes in a header, but takes
    one ending in a space or a tab (`secret = "s3cr3t "`, or `secret_env` from a shell
    `export`; `secret_file` is stripped). HTTP parsers drop a field value's surrounding
    whitespace (RFC 9110 §5.5), so the receiver reads `Bearer s3cr3t` while the body says
    `"s3cr3t "`: a receiver checking the header against the secret refuses every delivery
    and the tenant stalls for good. (Refusing such a secret in the configuration, naming
    the key, passes this test too.)"""
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
