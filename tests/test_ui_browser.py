"""The pages in a real browser: Debian's chromium (/usr/bin/chromium), driven by Playwright,
against `webhookd run` as a subprocess and real receivers on 127.0.0.1.

Playwright, because its Python package drives a given Chromium binary through the DevTools
protocol with no separate driver to match (Selenium needs Debian's chromium-driver of the
very same version), and it waits for the page by itself. Its browser download (`playwright
install`) is never used: `executable_path` points at Debian's build.

One browser and one daemon for the module (a browser start costs a second or two); each test
opens its own context (its own cookies) where sign-in matters. The tests run in file order:
the stalled tenant of one is retried by the next. `make screenshots` runs the last test with
WEBHOOKD_SCREENSHOTS set: the PNGs go to docs/screenshots/.
"""

from __future__ import annotations

import asyncio
import html
import http.server
import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, sync_playwright

from tests.conftest import Process, Receiver, free_port, write_config
from webhookd import config as config_mod
from webhookd.ui import portal

CHROMIUM = "/usr/bin/chromium"
TOKEN = "browser-test-token-0123456789"
PORTAL_KEY = "p" * 44
SCRIPT = "<script>window.pwned=1</script>"
# The SaaS whose own "Webhook config" page frames the portal (served by the test itself).
# Real servers on loopback, as the daemon is: Chromium refuses a public site's (or an
# intercepted page's) frame of a loopback address (Private Network Access).
SAAS_PORT, ELSEWHERE_PORT = free_port(), free_port()
SAAS = f"http://127.0.0.1:{SAAS_PORT}"
ELSEWHERE = f"http://127.0.0.1:{ELSEWHERE_PORT}"


class FramingSite:
    """A SaaS's own settings page that frames a URL: a plain HTTP server in a thread."""

    def __init__(self, port: int) -> None:
        self.framed = ""
        site = self

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (
                    "<!doctype html><h1>Our settings</h1>"
                    f'<iframe src="{html.escape(site.framed)}" width="600" height="400"></iframe>'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Page)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ThreadReceiver:
    """tests/conftest.py's Receiver, served from a thread: these tests are synchronous
    (Playwright's sync API does not run inside an event loop), and the receiver must be able to
    be down first and started later, on the port the tenant's endpoint names."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.recv = Receiver(port=port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        started = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_post("/{path:.*}", self.recv.handle)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None


class Daemon:
    def __init__(self, process: Process) -> None:
        self.process = process
        self.base = process.base

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {TOKEN}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def status(self, tenant: str) -> dict[str, Any]:
        status, body = self.api("GET", f"/v1/tenants/{tenant}/status")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def wait(self, condition: Any, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not met in time"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def receivers() -> Iterator[dict[str, ThreadReceiver]]:
    made = {"down": ThreadReceiver(free_port()), "hostile": ThreadReceiver(free_port())}

    async def hostile(request: web.Request) -> web.Response:
        # The sender records a redirect's Location (not its reason phrase): both carry one.
        return web.Response(status=302, reason=SCRIPT, headers={"Location": "/" + SCRIPT})

    made["hostile"].recv.always("/evil", hostile)
    made["hostile"].start()  # "down" starts in a test
    yield made
    for receiver in made.values():
        receiver.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, receivers) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("ui-browser")
    key = directory / "portal.key"
    key.write_text(PORTAL_KEY)
    path = write_config(
        directory,
        {"main": {"endpoint": "http://127.0.0.1:9/main", "secret": "s3cr3t", "events": ["*"]}},
        daemon={
            "api_token": TOKEN,
            "portal_key_file": str(key),
            "portal_frame_ancestors": [SAAS],
            "log_level": "info",
        },
        delivery={"retry_base": 600},  # a failed tenant stays stalled until Retry
    )
    process = Process(path)
    process.start()
    running = Daemon(process)
    down = f"http://127.0.0.1:{receivers['down'].port}/acme"
    hostile = f"http://127.0.0.1:{receivers['hostile'].port}/evil"
    for name, endpoint in (("acme", down), ("evil", hostile), ("beta", down), ("gamma", down)):
        status, body = running.api(
            "PUT", f"/v1/tenants/{name}", {"endpoint": endpoint, "secret": "shh", "events": ["*"]}
        )
        assert status == 201, body
    yield running
    process.stop()
    assert TOKEN not in process.log() and "sig=" not in process.log()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def operator(browser: Browser, daemon: Daemon) -> Iterator[BrowserContext]:
    """A signed-in browser context, shared by the operator's tests."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(daemon.base + "/ui/signin")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(daemon.base + "/ui/")
    page.close()
    yield context
    context.close()


def no_horizontal_overflow(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_sign_in_with_the_keyboard(browser: Browser, daemon: Daemon) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(daemon.base + "/ui/")
    assert page.url == daemon.base + "/ui/signin"
    page.keyboard.type("wrong")  # the token field has the focus
    page.keyboard.press("Enter")
    assert "That is not the daemon's API token" in page.inner_text("main")
    page.fill("#token", TOKEN)
    page.keyboard.press("Enter")
    page.wait_for_url(daemon.base + "/ui/")
    assert page.inner_text("h1") == "Webhook status"
    assert page.evaluate("document.cookie") == ""  # the session cookie is HttpOnly
    assert TOKEN not in page.content()
    page.click("text=Sign out")
    page.wait_for_url(daemon.base + "/ui/signin")
    context.close()


def test_a_stalled_tenant_shows_stalled_with_its_failure(
    operator: BrowserContext, daemon: Daemon
) -> None:
    status, _ = daemon.api(
        "POST", "/v1/tenants/acme/webhooks", {"event": "CHECK_COMPLETED", "data": {"n": 1}}
    )
    assert status == 202
    daemon.wait(lambda: daemon.status("acme")["queue"] == "stalled")
    page = operator.new_page()
    page.goto(daemon.base + "/ui/")
    first = page.locator("table.tenants tbody tr").first
    assert "acme" in first.inner_text() and "Stalled" in first.inner_text()
    assert "connection refused" in first.inner_text()
    page.click("text=acme")
    assert page.inner_text("#queue-state").startswith("Stalled")
    assert "connection refused" in page.inner_text("table.failures")
    page.close()


def test_start_the_receiver_then_retry_with_the_keyboard_delivers(
    operator: BrowserContext, daemon: Daemon, receivers: dict[str, ThreadReceiver]
) -> None:
    receivers["down"].start()
    page = operator.new_page()
    page.goto(daemon.base + "/ui/tenants/acme")
    for _ in range(40):  # Tab through the page to the Retry button, as a keyboard user
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "retry":
            break
    else:
        raise AssertionError("Tab never reached the Retry button")
    page.keyboard.press("Enter")
    page.wait_for_url(daemon.base + "/ui/tenants/acme")
    # No reload: the page's live refresh (every 5 s) shows the queue emptied.
    page.wait_for_function(
        "() => document.getElementById('queue-state').textContent.startsWith('Empty')",
        timeout=15_000,
    )
    assert [w["data"] for w in receivers["down"].recv.requests[0].webhooks] == [{"n": 1}]
    page.close()


def test_refresh_clears_the_recent_failures(operator: BrowserContext, daemon: Daemon) -> None:
    page = operator.new_page()
    page.goto(daemon.base + "/ui/tenants/acme")
    assert page.locator("table.failures").count() == 1
    page.click("#refresh")
    assert "No recent failures." in page.inner_text("#live")
    assert "Cleared" in page.inner_text("[role=status]")
    page.close()


def test_an_endpoint_typo_shows_inline_and_changes_nothing(
    operator: BrowserContext, daemon: Daemon
) -> None:
    before = daemon.api("GET", "/v1/tenants/beta")[1]
    page = operator.new_page()
    page.goto(daemon.base + "/ui/tenants/beta")
    page.fill("#endpoint", "htps://example.com/hook")
    page.click("#save")
    error = page.locator("#endpoint-error")
    assert error.is_visible() and "http" in error.inner_text()
    # Next to its field: just below it on the page.
    field, shown = page.locator("#endpoint").bounding_box(), error.bounding_box()
    assert field and shown and 0 <= shown["y"] - (field["y"] + field["height"]) < 40
    assert page.input_value("#endpoint") == "htps://example.com/hook"
    assert daemon.api("GET", "/v1/tenants/beta")[1] == before
    page.close()


def test_a_post_without_the_csrf_token_is_refused(operator: BrowserContext, daemon: Daemon) -> None:
    page = operator.new_page()
    page.goto(daemon.base + "/ui/tenants/gamma")
    page.evaluate("document.querySelector('form[action$=\"/pause\"] input[name=csrf]').remove()")
    with page.expect_navigation():
        page.click("#pause")
    assert "Forbidden" in page.inner_text("h1") and "CSRF" in page.inner_text("main")
    assert daemon.status("gamma")["paused"] is False
    page.close()


def test_a_script_in_a_receivers_answer_runs_no_script(
    operator: BrowserContext, daemon: Daemon
) -> None:
    daemon.api("POST", "/v1/tenants/evil/webhooks", {"event": "CHECK_COMPLETED", "data": {}})
    daemon.wait(lambda: daemon.status("evil")["recent_failures"])
    page = operator.new_page()
    dialogs: list[str] = []

    def seen(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", seen)
    for path in ("/ui/", "/ui/tenants/evil"):
        page.goto(daemon.base + path)
        assert SCRIPT in page.inner_text("main")  # shown, as text
        assert page.evaluate("typeof window.pwned") == "undefined"
    assert dialogs == []
    page.close()


def test_a_portal_link_shows_its_tenant_only(browser: Browser, daemon: Daemon) -> None:
    status, answer = daemon.api("POST", "/v1/tenants/acme/portal", {"ttl": "10m"})
    assert status == 200
    context = browser.new_context()  # a customer's browser: no operator session
    page = context.new_page()
    response = page.goto(answer["url"])
    assert response is not None and response.status == 200
    text = page.inner_text("body")
    assert "acme" in text and "Webhook status queue" in text
    for other in ("beta", "gamma", "evil", "main", "Sign out", "Parked", "History"):
        assert other not in text
    links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    assert links == ["#main"]  # nothing else is reachable from it
    assert page.locator("#retry").is_visible() and page.locator("#refresh").is_visible()
    page.click("#retry")
    assert "Nothing to retry" in page.inner_text("[role=status]")

    altered = answer["url"][:-1] + ("0" if answer["url"][-1] != "0" else "1")
    other_tenant = answer["url"].replace("/portal/acme", "/portal/beta")
    daemon_config = config_mod.load(daemon.process.config_path).daemon
    expired = portal.make(daemon_config, "acme", 60, now=time.time() - 120)
    for url in (altered, other_tenant, daemon.base + expired.path()):
        response = page.goto(url)
        assert response is not None and response.status == 403
        assert page.inner_text("h1") == "This link is not valid"
        assert page.eval_on_selector_all("a[href]", "els => els.length") == 1  # "#main" only
    context.close()


def test_the_portal_embeds_only_in_the_configured_sites(browser: Browser, daemon: Daemon) -> None:
    _, answer = daemon.api("POST", "/v1/tenants/acme/portal")
    sites = [FramingSite(SAAS_PORT), FramingSite(ELSEWHERE_PORT)]  # only SAAS is listed
    context = browser.new_context()
    page = context.new_page()
    try:
        for site in sites:
            site.framed = answer["url"]
        page.goto(f"{SAAS}/settings")
        portal_frame = page.frame_locator("iframe")
        assert portal_frame.locator("h1").inner_text() == "acme"
        assert portal_frame.locator("#retry").is_visible()

        page.goto(f"{ELSEWHERE}/settings")
        frame = page.frames[1]
        frame.wait_for_load_state()
        # Refused by frame-ancestors: Chromium shows its error page in the frame instead.
        assert frame.url.startswith("chrome-error://") and "acme" not in frame.content()
        sites[0].framed = daemon.base + "/ui/"  # the operator's pages: never in a frame
        page.goto(f"{SAAS}/settings")
        frame = page.frames[1]
        frame.wait_for_load_state()
        assert frame.url.startswith("chrome-error://") and "Sign in" not in frame.content()
    finally:
        context.close()
        for site in sites:
            site.close()


def test_usable_at_390_and_1280_pixels_wide(
    browser: Browser, operator: BrowserContext, daemon: Daemon
) -> None:
    _, answer = daemon.api("POST", "/v1/tenants/evil/portal")
    page = operator.new_page()
    for width in (390, 1280):
        page.set_viewport_size({"width": width, "height": 800})
        for url in (
            daemon.base + "/ui/",
            daemon.base + "/ui/tenants/evil",
            daemon.base + "/ui/tenants/beta",
            answer["url"],
        ):
            page.goto(url)
            assert no_horizontal_overflow(page), (width, url)
            assert page.locator("#retry, h1").first.is_visible()
    page.close()


def test_pages_read_with_javascript_off(browser: Browser, daemon: Daemon) -> None:
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(daemon.base + "/ui/signin")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.goto(daemon.base + "/ui/tenants/evil")
    assert page.inner_text("#queue-state").startswith("Stalled")
    page.click("#skip")  # without the script's confirm(): the server asks
    assert "Skip evil's head webhook?" in page.inner_text("h1")
    page.click("button.danger")
    assert "Parked the head webhook" in page.inner_text("[role=status]")
    context.close()


def test_screenshots(browser: Browser, operator: BrowserContext, daemon: Daemon, tmp_path) -> None:
    """The overview, a stalled tenant and a portal page at 1280 and 390 px. Saved to
    $WEBHOOKD_SCREENSHOTS (make screenshots: docs/screenshots/), else a temporary folder."""
    folder = Path(os.environ.get("WEBHOOKD_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    # A shop whose receiver is down (nothing listens on its port): stalled.
    closed = f"http://127.0.0.1:{free_port()}/webhooks"
    daemon.api("PUT", "/v1/tenants/shop", {"endpoint": closed, "secret": "s", "events": ["*"]})
    for event in ("TASK_CREATED", "CHECK_COMPLETED"):
        daemon.api("POST", "/v1/tenants/shop/webhooks", {"event": event, "data": {}})
    daemon.wait(lambda: daemon.status("shop")["queue"] == "stalled")
    _, answer = daemon.api("POST", "/v1/tenants/acme/portal")
    page = operator.new_page()
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 800})
        for name, url in (
            ("overview", daemon.base + "/ui/"),
            ("stalled-tenant", daemon.base + "/ui/tenants/shop"),
            ("portal", answer["url"]),
        ):
            page.goto(url)
            path = folder / f"{name}-{width}.png"
            page.screenshot(path=str(path))  # the first screenful: small files
            assert path.stat().st_size > 1000
    page.close()


def test_wrong_tokens_lock_the_sign_in_form(browser: Browser, daemon: Daemon) -> None:
    """Last in the file: it locks 127.0.0.1 out of the sign-in form for up to a minute (the
    contexts signed in above keep their sessions). The exact count and the window's end are
    tested in tests/test_ui.py, with a clock moved by hand; the first test's wrong token may
    still count here, hence at most ten."""
    context = browser.new_context(viewport={"width": 390, "height": 800})
    page = context.new_page()
    page.goto(daemon.base + "/ui/signin")
    statuses = []
    for n in range(10):
        page.fill("#token", f"wrong-{n}")
        with page.expect_response(daemon.base + "/ui/signin") as answer:
            page.keyboard.press("Enter")
        statuses.append(answer.value.status)
        if answer.value.status == 429:
            page.goto(daemon.base + "/ui/signin")
            break
    assert set(statuses[:9]) == {401}, statuses
    page.fill("#token", TOKEN)  # the right token: refused too while locked
    with page.expect_response(daemon.base + "/ui/signin") as answer:
        page.keyboard.press("Enter")
    assert answer.value.status == 429 and 0 < int(answer.value.headers["retry-after"]) <= 60
    assert page.inner_text("h1") == "Too many wrong tokens"
    assert "Try again in" in page.inner_text("main") and TOKEN not in page.content()
    assert no_horizontal_overflow(page)
    page.click("text=Back to the sign-in form")
    page.wait_for_url(daemon.base + "/ui/signin")
    log = daemon.process.log()
    assert log.count("ui_signin_locked") == 1, log
    assert "wrong-" not in log and TOKEN not in log
    context.close()
