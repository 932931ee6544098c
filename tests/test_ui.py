"""The pages at /ui/ and /portal/, read with aiohttp's client: sign-in and sessions, wrong
tokens locking an address out, CSRF, the headers, the overview's paging, the tenant page's
controls and Webhook config form, portal links, and hostile text kept as text.
tests/test_ui_browser.py drives a browser."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from yarl import URL

from tests import test_cluster
from tests.conftest import Daemon, Receiver, StartDaemon, free_port, tenant, wait_for, write_config
from tests.test_cluster import held, two_instances
from webhookd import config as config_mod
from webhookd.ui import portal
from webhookd.ui import throttle as throttle_mod
from webhookd.ui.pages import SESSIONS, SIGN_IN_THROTTLE
from webhookd.ui.sessions import COOKIE
from webhookd.ui.throttle import SignInThrottle, client_key

start_instance = test_cluster.start_instance  # the fixture: in-process instances
TOKEN = "ui-test-token-0123456789"
PORTAL_KEY = "k" * 40


class Browser:
    """A cookie-keeping client, as a browser is: pages, forms and their CSRF tokens. `source`
    is the client's own address (any of 127.0.0.0/8 reaches a daemon on 127.0.0.1)."""

    def __init__(self, daemon: Daemon, source: str = "") -> None:
        self.base = daemon.base
        self.session = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(local_addr=(source, 0)) if source else None,
        )

    async def get(self, path: str) -> tuple[int, str, Any]:
        async with self.session.get(self.base + path, allow_redirects=False) as response:
            return response.status, await response.text(), response

    async def post(self, path: str, form: dict[str, Any]) -> tuple[int, str, Any]:
        async with self.session.post(
            self.base + path, data=form, allow_redirects=False
        ) as response:
            return response.status, await response.text(), response

    async def csrf(self, path: str) -> str:
        status, page, _ = await self.get(path)
        assert status == 200, page
        return csrf_of(page)

    async def sign_in(self, token: str = TOKEN) -> tuple[int, str, Any]:
        return await self.post(
            "/ui/signin", {"csrf": await self.csrf("/ui/signin"), "token": token}
        )

    async def close(self) -> None:
        await self.session.close()


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found[1]


@pytest.fixture
async def browsers():
    made: list[Browser] = []

    def make(daemon: Daemon, source: str = "") -> Browser:
        made.append(Browser(daemon, source))
        return made[-1]

    yield make
    for browser in made:
        await browser.close()


def portal_config(tmp_path: Path, **daemon: Any) -> dict[str, Any]:
    key = tmp_path / "portal.key"
    key.write_text(PORTAL_KEY + "\n")
    return {"portal_key_file": str(key), **daemon}


async def test_sign_in_once_then_a_session_cookie(start_daemon: StartDaemon, browsers, receiver):
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a"))}, daemon={"api_token": TOKEN}
    )
    browser = browsers(daemon)
    status, _, response = await browser.get("/ui/")
    assert (status, response.headers["Location"]) == (303, "/ui/signin")

    status, page, _ = await browser.sign_in("wrong")
    assert status == 401 and "not the daemon's API token" in page and "wrong" not in page

    status, _, response = await browser.sign_in()
    assert status == 303 and response.headers["Location"] == "/ui/"
    cookie = response.headers["Set-Cookie"]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/ui/", "Max-Age=28800"):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain HTTP here; over TLS the cookie is Secure
    behind_tls = browsers(daemon)
    async with behind_tls.session.get(
        daemon.base + "/ui/signin", headers={"X-Forwarded-Proto": "https"}
    ) as response:
        assert "Secure" in response.headers["Set-Cookie"]

    status, page, _ = await browser.get("/ui/")
    assert status == 200 and "acme" in page and TOKEN not in page
    # The API itself still wants the token: a session cookie is no API credential.
    async with browser.session.get(daemon.base + "/v1/status") as response:
        assert response.status == 401

    # Sign-out ends the session on the server: the old cookie opens nothing.
    status, _, response = await browser.post("/ui/signout", {"csrf": await browser.csrf("/ui/")})
    assert (status, response.headers["Location"]) == (303, "/ui/signin")
    status, _, _ = await browser.get("/ui/")
    assert status == 303


async def test_a_session_expires(tmp_path, start_daemon: StartDaemon, browsers, receiver):
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a"))},
        daemon={"api_token": TOKEN, "ui_session_ttl": "60s"},
    )
    browser = browsers(daemon)
    status, _, response = await browser.sign_in()
    assert "Max-Age=60" in response.headers["Set-Cookie"]
    runner = daemon.server._runner
    assert runner is not None
    for session in list(runner.app[SESSIONS]._by_id.values()):
        session.expires = time.time() - 1  # as if 60 s had passed
    status, _, _ = await browser.get("/ui/")
    assert status == 303


class Clock:
    """The throttle's clock, moved by hand: a minute passes without waiting one."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle_of(daemon: Daemon) -> tuple[SignInThrottle, Clock]:
    runner = daemon.server._runner
    assert runner is not None
    throttle = runner.app[SIGN_IN_THROTTLE]
    clock = Clock()
    throttle.clock = clock
    return throttle, clock


async def wrong_tokens(browser: Browser, count: int) -> None:
    for n in range(count):
        status, page, _ = await browser.sign_in(f"wrong-{n}")
        assert status == 401 and "not the daemon's API token" in page, (n, status)


async def test_ten_wrong_tokens_lock_the_address_out_even_for_the_right_token(
    start_daemon: StartDaemon, browsers, receiver
):
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a"))}, daemon={"api_token": TOKEN}
    )
    throttle, clock = throttle_of(daemon)
    browser = browsers(daemon)
    with capture_logs() as logs:
        await wrong_tokens(browser, 9)
        assert [e for e in logs if e["event"].startswith("ui_")] == []  # none logged one by one
        clock.now += 15
        await wrong_tokens(browser, 1)  # the 10th, 15 s into the window: locked for 45 s
    locks = [e for e in logs if e["event"] == "ui_signin_locked"]
    assert locks == [
        {"event": "ui_signin_locked", "remote": "127.0.0.1", "lock_s": 45, "log_level": "warning"}
    ]
    assert not any("wrong-" in str(e) or TOKEN in str(e) for e in logs)

    # The 11th, with the right token: refused without being checked, as a page.
    clock.now += 5
    status, page, response = await browser.sign_in()
    assert status == 429 and response.headers["Retry-After"] == "40"
    assert "Too many wrong tokens" in page and "Try again in 40 seconds" in page
    assert "10 wrong API tokens were sent from your address within 60 seconds" in page
    assert response.headers["Content-Security-Policy"].endswith("frame-ancestors 'none'")
    assert page.count("<script") == 1 and TOKEN not in page
    status, _, response = await browser.get("/ui/")
    assert (status, response.headers["Location"]) == (303, "/ui/signin")  # not signed in
    # Even a form without its CSRF token is answered 429: nothing is read while locked.
    status, _, _ = await browser.post("/ui/signin", {"token": TOKEN})
    assert status == 429
    clock.now += 39
    status, _, response = await browser.sign_in()
    assert status == 429 and response.headers["Retry-After"] == "1"

    # The window is over: the right token signs in.
    clock.now += 1
    status, _, response = await browser.sign_in()
    assert (status, response.headers["Location"]) == (303, "/ui/")
    status, page, _ = await browser.get("/ui/")
    assert status == 200 and "acme" in page
    assert len(throttle) == 0
    # The API's bearer token is no part of it: a wrong one is a plain 401, ever.
    for _ in range(12):
        status, body = await daemon.request(
            "GET", "/v1/status", headers={"Authorization": "Bearer nope"}
        )
        assert (status, body["error"]) == (401, "unauthorized")
    status, _ = await daemon.request("GET", "/v1/status")
    assert status == 200


async def test_wrong_tokens_sent_together_get_no_more_guesses_than_the_limit(
    start_daemon: StartDaemon, browsers, receiver, monkeypatch: pytest.MonkeyPatch
):
    """Twelve sign-ins sent at once, their bodies held back until every one has passed the
    check made before the body is read: the lock still stops the two past the 10th."""
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a"))}, daemon={"api_token": TOKEN}
    )
    throttle, _ = throttle_of(daemon)
    browser = browsers(daemon)
    csrf = await browser.csrf("/ui/signin")
    checked: list[str | None] = []
    check = throttle.locked_for

    def counted_check(remote: str | None) -> int:
        checked.append(remote)
        return check(remote)

    monkeypatch.setattr(throttle, "locked_for", counted_check)
    cookie = browser.session.cookie_jar.filter_cookies(URL(browser.base + "/ui/"))[COOKIE].value
    host, port = browser.base.removeprefix("http://").split(":")
    release = asyncio.Event()

    async def sign_in(n: int) -> int:
        # By hand: aiohttp's client holds a request's head back until its body comes.
        body = f"csrf={csrf}&token=wrong-{n}".encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /ui/signin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            + f"Cookie: {COOKIE}={cookie}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        await release.wait()
        writer.write(body)
        status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        return int(status_line.split()[1])

    sent = [asyncio.create_task(sign_in(n)) for n in range(12)]
    await wait_for(lambda: len(checked) == 12)  # all twelve wait for their bodies
    release.set()
    statuses = sorted(await asyncio.gather(*sent))
    assert statuses == [401] * 10 + [429] * 2


async def test_the_right_token_before_the_lock_clears_the_count(
    start_daemon: StartDaemon, browsers, receiver
):
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a"))}, daemon={"api_token": TOKEN}
    )
    throttle, _ = throttle_of(daemon)
    first = browsers(daemon)
    await wrong_tokens(first, 9)
    status, _, _ = await first.sign_in()
    assert status == 303 and len(throttle) == 0
    # Nine more from the same address: without the right token's clearing, the first of
    # them would have been the 10th, and the right token after them refused.
    second = browsers(daemon)
    await wrong_tokens(second, 9)
    status, _, response = await second.sign_in()
    assert (status, response.headers["Location"]) == (303, "/ui/")


async def test_a_locked_address_does_not_lock_another(
    start_daemon: StartDaemon, browsers, receiver
):
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a"))}, daemon={"api_token": TOKEN}
    )
    throttle, _ = throttle_of(daemon)
    attacker = browsers(daemon, "127.0.0.2")
    await wrong_tokens(attacker, 10)
    status, _, _ = await attacker.sign_in()
    assert status == 429
    operator = browsers(daemon, "127.0.0.1")
    status, _, response = await operator.sign_in()
    assert (status, response.headers["Location"]) == (303, "/ui/")
    assert throttle.locked_for("127.0.0.2") == 60 and throttle.locked_for("127.0.0.1") == 0


async def test_the_table_of_addresses_stays_bounded(start_daemon: StartDaemon, browsers, receiver):
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a"))}, daemon={"api_token": TOKEN}
    )
    throttle, clock = throttle_of(daemon)
    throttle.capacity = 4
    for n in range(2, 12):  # ten addresses, one wrong token each, a second apart
        await wrong_tokens(browsers(daemon, f"127.0.0.{n}"), 1)
        clock.now += 1
        assert len(throttle) == min(n - 1, 4)
    # The oldest went first: the four newest are kept.
    kept = list(throttle._by_key)
    assert kept == ["127.0.0.8", "127.0.0.9", "127.0.0.10", "127.0.0.11"]
    # And an entry goes with its window: a minute later, the next call finds none left.
    clock.now += 60
    assert throttle.locked_for("127.0.0.11") == 0 and len(throttle) == 0


def test_a_spray_of_addresses_keeps_at_most_the_capacity() -> None:
    clock = Clock()
    throttle = SignInThrottle(clock=clock)
    for n in range(3 * throttle_mod.CAPACITY):
        throttle.wrong(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
    assert len(throttle) == throttle_mod.CAPACITY
    # Every IPv6 address of one /64 is one client: a million of them count as one.
    for n in range(1, 12):
        throttle.wrong(f"2001:db8:0:7::{n:x}")
    assert len(throttle) == throttle_mod.CAPACITY
    assert throttle.locked_for("2001:db8:0:7:ffff::1") == 60
    assert throttle.locked_for("2001:db8:0:8::1") == 0
    clock.now += 60
    assert throttle.locked_for("2001:db8:0:7::1") == 0 and len(throttle) == 0


def test_whom_the_throttle_counts() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"  # a dual-stack socket's IPv4 client
    assert client_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_key(None) == "-"


async def test_a_post_without_the_csrf_token_is_refused(
    start_daemon: StartDaemon, browsers, receiver
):
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a"))}, daemon={"api_token": TOKEN}
    )
    browser = browsers(daemon)
    await browser.sign_in()
    for form in ({}, {"csrf": "not-the-token"}):
        status, page, _ = await browser.post("/ui/tenants/acme/pause", form)
        assert status == 403 and "CSRF" in page
    assert (await daemon.status("acme"))["paused"] is False
    # Without a session at all (another site's form): refused too.
    stranger = browsers(daemon)
    status, _, _ = await stranger.post("/ui/tenants/acme/pause", {"csrf": "x"})
    assert status == 403
    # With it, the same form pauses.
    csrf = await browser.csrf("/ui/tenants/acme")
    status, _, _ = await browser.post("/ui/tenants/acme/pause", {"csrf": csrf})
    assert status == 303 and (await daemon.status("acme"))["paused"] is True


async def test_without_a_token_on_loopback_the_pages_are_open(
    start_daemon: StartDaemon, browsers, receiver
):
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/a"))})
    browser = browsers(daemon)
    status, page, response = await browser.get("/ui/")
    assert status == 200 and "acme" in page and "Sign out" not in page
    assert "HttpOnly" in response.headers["Set-Cookie"]  # a session for the CSRF token
    status, _, _ = await browser.get("/ui/signin")
    assert status == 303
    # Forms still need the CSRF token: a foreign page cannot post to a loopback daemon.
    status, _, _ = await browser.post("/ui/tenants/acme/pause", {})
    assert status == 403
    csrf = await browser.csrf("/ui/tenants/acme")
    status, _, _ = await browser.post("/ui/tenants/acme/pause", {"csrf": csrf})
    assert status == 303 and (await daemon.status("acme"))["paused"] is True


async def test_every_page_sends_the_security_headers(
    tmp_path, start_daemon: StartDaemon, browsers, receiver
):
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a"))},
        daemon=portal_config(tmp_path, portal_frame_ancestors=["https://app.example.com"]),
    )
    browser = browsers(daemon)
    link = portal.make(daemon.service.config.daemon, "acme", 600)
    for path in ("/ui/", "/ui/tenants/acme", "/ui/tenants/nope", link.path(), "/portal/acme"):
        _, _, response = await browser.get(path)
        headers = response.headers
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        if path.startswith("/portal/"):
            assert csp.endswith("frame-ancestors https://app.example.com")
            assert "X-Frame-Options" not in headers
        else:
            assert csp.endswith("frame-ancestors 'none'") and headers["X-Frame-Options"] == "DENY"


async def test_the_overview_pages_10000_tenants(tmp_path, start_daemon: StartDaemon, browsers):
    tenants = {f"t{n:05d}": tenant("http://127.0.0.1:9/x") for n in range(10_000)}
    daemon = await start_daemon(tenants=tenants, delivery={"retry_base": 3600})
    browser = browsers(daemon)
    started = time.monotonic()
    status, page, _ = await browser.get("/ui/")
    took = time.monotonic() - started
    assert status == 200
    assert page.count('href="/ui/tenants/t') == 50
    assert "10000 tenants, page 1 of 200" in page and 'rel="next"' in page
    assert "t00049" in page and "t00050" not in page
    status, page, _ = await browser.get("/ui/?page=200")
    assert "t09999" in page and 'rel="prev"' in page and 'rel="next"' not in page
    status, page, _ = await browser.get("/ui/?q=t0999")
    assert "10 tenants" in page and page.count('href="/ui/tenants/t') == 10
    print(f"overview of 10,000 tenants: {took * 1000:.0f} ms")


async def test_stalled_tenants_come_first_with_their_failure_as_text(
    start_daemon: StartDaemon, browsers, receiver: Receiver
):
    async def hostile(request: web.Request) -> web.Response:
        # The reason phrase is not part of the recorded error; the Location of a redirect
        # (not followed) is: both carry a script.
        return web.Response(
            status=302,
            reason="<script>window.pwned=2</script>",
            headers={"Location": "/<script>window.pwned=1</script>"},
        )

    receiver.always("/z", hostile)
    daemon = await start_daemon(
        tenants={"aaa": tenant(receiver.url("/a")), "zzz": tenant(receiver.url("/z"))},
        delivery={"retry_base": 3600},
    )
    answer = await daemon.ingest("zzz", {"event": "CHECK_COMPLETED", "data": {"n": "<img src=x>"}})
    webhook_id = answer["webhooks"][0]["id"]
    await wait_for(lambda: daemon.service.workers["zzz"].queue_state == "stalled")
    browser = browsers(daemon)
    _, page, _ = await browser.get("/ui/")
    assert page.index("/ui/tenants/zzz") < page.index("/ui/tenants/aaa")
    assert 'class="state state-stalled">Stalled' in page
    assert "<script>window" not in page and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    _, page, _ = await browser.get("/ui/?state=stalled")
    assert "/ui/tenants/zzz" in page and "/ui/tenants/aaa" not in page
    _, page, _ = await browser.get("/ui/tenants/zzz")
    assert "Stalled" in page and "&lt;script&gt;" in page and "<script>window" not in page
    _, page, _ = await browser.get("/ui/tenants/zzz?id=" + quote(webhook_id))
    assert "&lt;img src=x&gt;" in page and "<img src=x>" not in page  # its data, as text
    assert page.count("<script") == 1  # ours, from /ui/static/ui.js


async def test_retry_refresh_skip_requeue_from_the_tenant_page(
    start_daemon: StartDaemon, browsers, receiver: Receiver
):
    receiver.always("/a", 503)
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a"))}, delivery={"retry_base": 3600}
    )
    await daemon.ingest("acme", [{"id": "one", "event": "CHECK_COMPLETED", "data": {}}])
    await wait_for(lambda: daemon.service.workers["acme"].row.attempts >= 1)
    browser = browsers(daemon)
    csrf = await browser.csrf("/ui/tenants/acme")

    receiver.always("/a", 200)
    status, _, response = await browser.post("/ui/tenants/acme/retry", {"csrf": csrf})
    assert (status, response.headers["Location"]) == (303, "/ui/tenants/acme")
    await wait_for(lambda: receiver.at("/a", ok_only=True))
    _, page, _ = await browser.get("/ui/tenants/acme")
    assert "Retrying now" in page
    await wait_for(lambda: daemon.service.workers["acme"].queue_state == "empty")
    _, page, _ = await browser.get("/ui/tenants/acme")
    assert "state-empty" in page and "503" in page  # the failure stays until Refresh

    await browser.post("/ui/tenants/acme/refresh", {"csrf": csrf})
    _, page, _ = await browser.get("/ui/tenants/acme")
    assert "Cleared 1 recent failure" in page and "No recent failures" in page

    # Skip asks first (without JavaScript: a confirmation page), then parks the head.
    receiver.always("/a", 503)
    await daemon.ingest("acme", [{"id": "two", "event": "CHECK_COMPLETED", "data": {}}])
    await wait_for(lambda: daemon.service.workers["acme"].row.attempts >= 1)
    status, page, _ = await browser.post("/ui/tenants/acme/skip", {"csrf": csrf})
    assert status == 200 and "Skip acme&#39;s head webhook?" in page
    assert (await daemon.status("acme"))["waiting"] == 1
    await wait_for(lambda: daemon.service.workers["acme"].in_flight is None)
    await browser.post("/ui/tenants/acme/skip", {"csrf": csrf, "confirm": "yes"})
    _, page, _ = await browser.get("/ui/tenants/acme")
    assert "Parked the head webhook (id two" in page and "Requeue" in page
    receiver.always("/a", 200)
    await browser.post("/ui/tenants/acme/requeue", {"csrf": csrf, "id": "two"})
    _, page, _ = await browser.get("/ui/tenants/acme")
    assert "Requeued id two" in page
    await wait_for(lambda: daemon.service.workers["acme"].queue_state == "empty")

    # History and lookup by id.
    _, page, _ = await browser.get("/ui/tenants/acme?id=one")
    assert "delivered" in page and 'href="/ui/tenants/acme?id=one"' in page
    _, page, _ = await browser.get("/ui/tenants/acme?id=never")
    assert "never had a webhook with id &#39;never&#39;" in page


async def test_the_config_form_validates_as_the_api_and_keeps_secrets(
    tmp_path, start_daemon: StartDaemon, browsers, receiver: Receiver
):
    daemon = await start_daemon(tenants={"main": tenant(receiver.url("/m"))})
    status, _ = await daemon.request(
        "PUT", "/v1/tenants/api1", json=tenant(receiver.url("/a"), secret="very-secret-value")
    )
    assert status == 201
    browser = browsers(daemon)
    status, page, _ = await browser.get("/ui/tenants/api1")
    assert "very-secret-value" not in page and "Write-only" in page
    csrf = csrf_of(page)
    form = {"csrf": csrf, "enabled": "on", "endpoint": "htp:/typo", "events": "CHECK_COMPLETED"}
    status, page, _ = await browser.post("/ui/tenants/api1/config", form)
    assert status == 400
    error = re.search(r'<p class="field-error" id="endpoint-error">([^<]+)</p>', page)
    assert error and "http" in error[1]
    assert 'value="htp:/typo"' in page  # what was typed stays, to correct it
    assert daemon.service.config.tenants["api1"].endpoint == receiver.url("/a")  # unchanged

    form = {**form, "endpoint": receiver.url("/b"), "batching": "on"}
    status, _, _ = await browser.post("/ui/tenants/api1/config", form)
    assert status == 303
    saved = daemon.service.config.tenants["api1"]
    assert saved.endpoint == receiver.url("/b") and saved.batching
    assert saved.events == ("CHECK_COMPLETED",)
    assert saved.secret.reveal() == "very-secret-value"  # kept: the field was empty
    await browser.post("/ui/tenants/api1/config", {**form, "secret": "a-new-secret"})
    assert daemon.service.config.tenants["api1"].secret.reveal() == "a-new-secret"

    # A main-file tenant: shown read-only with the reason, and a POST is refused.
    _, page, _ = await browser.get("/ui/tenants/main")
    assert "Read-only: This tenant is defined in the main configuration file" in page
    assert "<fieldset disabled>" in page
    status, page, _ = await browser.post("/ui/tenants/main/config", form)
    assert status == 409 and daemon.service.config.tenants["main"].endpoint == receiver.url("/m")


async def test_a_portal_link_opens_its_tenant_only(
    tmp_path, start_daemon: StartDaemon, browsers, receiver: Receiver
):
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a")), "other": tenant(receiver.url("/o"))},
        daemon={"api_token": TOKEN, **portal_config(tmp_path)},
    )
    status, answer = await daemon.request("POST", "/v1/tenants/acme/portal", json={"ttl": "30m"})
    assert status == 200 and answer["can_edit"] is False
    assert answer["url"].startswith(daemon.base + "/portal/acme?expires=")
    expires = int(re.search(r"expires=(\d+)", answer["url"])[1])  # type: ignore[index]
    assert abs(expires - (time.time() + 1800)) < 5
    path = answer["url"].removeprefix(daemon.base)
    browser = browsers(daemon)
    status, page, _ = await browser.get(path)
    assert status == 200 and "Webhook status queue" in page
    assert "other" not in page and "/ui/" not in page.replace("/ui/static/", "")
    assert "Webhook config" not in page  # portal_can_edit is off
    assert "Pause" not in page and "Skip head" not in page and "History" not in page, page

    await daemon.ingest("acme", {"event": "CHECK_COMPLETED", "data": {}})
    fields = dict(re.findall(r'name="(expires|can_edit|sig)" value="([^"]+)"', page))
    status, _, response = await browser.post("/portal/acme/retry", fields)
    assert status == 303 and response.headers["Location"].startswith(path)
    status, _, _ = await browser.post("/portal/acme/pause", fields)
    assert status == 403  # only Retry and Refresh
    status, _, _ = await browser.post("/portal/acme/config", fields)
    assert status == 403

    altered = path.replace("sig=", "sig=0")
    for wrong in (altered, path.replace("/portal/acme", "/portal/other"), "/portal/acme"):
        status, page, _ = await browser.get(wrong)
        assert status == 403 and "This link is not valid" in page and "acme" not in page
    old = portal.make(daemon.service.config.daemon, "acme", 60, now=time.time() - 3600)
    status, page, _ = await browser.get(old.path())
    assert status == 403
    status, _, _ = await browser.post("/portal/acme/retry", {**fields, "sig": "0" * 64})
    assert status == 403
    # The link opens no operator page.
    status, _, _ = await browser.get("/ui/")
    assert status == 303


async def test_a_portal_link_may_edit_when_the_operator_allows_it(
    tmp_path, start_daemon: StartDaemon, browsers, receiver: Receiver
):
    daemon = await start_daemon(
        tenants={"filed": tenant(receiver.url("/f"))},
        daemon=portal_config(tmp_path, portal_can_edit=True),
    )
    await daemon.request("PUT", "/v1/tenants/acme", json=tenant(receiver.url("/a")))
    status, answer = await daemon.request("POST", "/v1/tenants/acme/portal")
    assert status == 200 and answer["can_edit"] is True
    browser = browsers(daemon)
    path = answer["url"].removeprefix(daemon.base)
    _, page, _ = await browser.get(path)
    assert "Webhook config" in page and "Shared secret" in page
    fields = dict(re.findall(r'name="(expires|can_edit|sig)" value="([^"]+)"', page))
    form = {**fields, "enabled": "on", "endpoint": "ftp://x", "all_events": "on"}
    status, page, _ = await browser.post("/portal/acme/config", form)
    assert status == 400 and 'id="endpoint-error"' in page
    status, _, _ = await browser.post(
        "/portal/acme/config", {**form, "endpoint": receiver.url("/n")}
    )
    assert status == 303
    assert daemon.service.config.tenants["acme"].endpoint == receiver.url("/n")

    # A main-file tenant's form is read-only, and says so without naming the operator's file.
    _, answer = await daemon.request("POST", "/v1/tenants/filed/portal")
    _, page, _ = await browser.get(answer["url"].removeprefix(daemon.base))
    assert "managed by your provider" in page and "<fieldset disabled>" in page
    assert str(daemon.service.config.path) not in page and "config.toml" not in page


async def test_the_portal_endpoint_without_a_key_says_how_to_set_one(
    start_daemon: StartDaemon, receiver
):
    daemon = await start_daemon(tenants={"acme": tenant(receiver.url("/a"))})
    status, body = await daemon.request("POST", "/v1/tenants/acme/portal")
    assert status == 409 and body["error"] == "portal_not_configured"
    assert "portal_key_file" in body["detail"]
    status, body = await daemon.request("POST", "/v1/tenants/nope/portal")
    assert status == 404


async def test_the_portal_endpoint_checks_its_body(tmp_path, start_daemon: StartDaemon, receiver):
    daemon = await start_daemon(
        tenants={"acme": tenant(receiver.url("/a"))}, daemon=portal_config(tmp_path)
    )
    for body in ({"ttl": "soon"}, {"ttl": 5}, {"other": 1}, [1]):
        status, answer = await daemon.request("POST", "/v1/tenants/acme/portal", json=body)
        assert status == 400, answer
    status, _ = await daemon.request("POST", "/v1/tenants/acme/portal", data=b"{")
    assert status == 400


def test_portal_keys_are_checked_with_the_file_and_key_named(tmp_path):
    short = tmp_path / "short.key"
    short.write_text("tooshort\n")
    path = write_config(tmp_path, {}, daemon={"portal_key_file": str(short)})
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.load(path)
    assert "daemon.portal_key_file" in str(caught.value) and "at least 32" in str(caught.value)
    path = write_config(tmp_path, {}, daemon={"portal_frame_ancestors": ["https://a.b/path"]})
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.load(path)
    assert "portal_frame_ancestors" in str(caught.value)


def test_the_portal_command_prints_a_link(tmp_path, process_factory):
    key = tmp_path / "portal.key"
    key.write_text(PORTAL_KEY)
    port = free_port()
    path = write_config(
        tmp_path,
        {"acme": tenant("http://127.0.0.1:9/x")},
        daemon={"listen": f"127.0.0.1:{port}", "api_token": TOKEN, "portal_key_file": str(key)},
    )
    process = process_factory(path)
    process.start()
    done = subprocess.run(
        [sys.executable, "-m", "webhookd", "portal", "acme", "--ttl", "2h", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"http://127.0.0.1:{port}/portal/acme?expires=")
    assert "read-only" in done.stderr
    assert "sig=" not in process.log()  # the daemon logs no link


async def test_with_several_instances_the_forms_act_on_the_tenants_owner(
    tmp_path: Path, receiver: Receiver, postgres_url: str, start_instance, browsers
):
    # A backoff of a minute: only a retry makes the next attempt in time.
    a, b, name = await two_instances(
        tmp_path, receiver, postgres_url, start_instance, retry_base=60.0
    )
    receiver.script(f"/{name}", 503)
    await b.ingest(name, [{"event": "CHECK_COMPLETED", "id": "r-1", "data": {}}])
    await wait_for(lambda: a.service.workers[name].queue_state == "stalled", timeout=5)

    browser = browsers(b)  # B's pages, for a tenant A delivers
    status, page, _ = await browser.get(f"/ui/tenants/{name}")
    assert status == 200 and "Stalled" in page and "HTTP 503" in page
    csrf = csrf_of(page)
    await browser.post(f"/ui/tenants/{name}/retry", {"csrf": csrf})
    await wait_for(lambda: receiver.sequences(f"/{name}") == [1], timeout=5)
    _, page, _ = await browser.get(f"/ui/tenants/{name}")
    assert "Retrying now" in page

    assert len(a.service.workers[name].failures) == 1
    await browser.post(f"/ui/tenants/{name}/refresh", {"csrf": csrf})
    assert len(a.service.workers[name].failures) == 0  # the owner's, not B's copy
    await browser.post(f"/ui/tenants/{name}/pause", {"csrf": csrf})
    assert a.service.workers[name].row.paused
    _, page, _ = await browser.get(f"/ui/tenants/{name}")
    assert "Paused: nothing is delivered" in page and 'id="resume"' in page
    assert held(a) >= {name}
