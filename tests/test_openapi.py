"""docs/openapi.yaml: a valid OpenAPI 3.1 document, served by the daemon, naming exactly the
app's routes, and true to a live daemon under Schemathesis (every operation, property-based,
and stateful through the document's links).

The Schemathesis tests run against `webhookd run` as a subprocess with an api_token, two
config tenants (one whose endpoint takes everything, one whose endpoint answers 503, so that
skip, parked and requeue have webhooks to act on) and a tenants_dir for the tenant API.
They are bounded by WEBHOOKD_SCHEMATHESIS_EXAMPLES examples per operation (and steps of the
stateful run); `make fuzz` raises it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import FlakyStrategyDefinition
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ensure_resource_availability,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
    use_after_free,
)

from tests.conftest import Process, StartDaemon, free_port, tenant, write_config
from webhookd import config as config_mod
from webhookd.api import create_app, openapi_document
from webhookd.service import Service

DOCUMENT_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
DOCUMENT: dict[str, Any] = yaml.safe_load(DOCUMENT_PATH.read_text(encoding="utf-8"))
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

# The app's HTML pages are not part of the JSON API this document describes: they are left
# out of the route comparison by prefix (the operator UI and the customer portal's pages).
HTML_PREFIXES = ("/ui", "/portal/")

EXAMPLES = int(os.environ.get("WEBHOOKD_SCHEMATHESIS_EXAMPLES", "25"))
TOKEN = "schemathesis-token"
EVENTS = ["CHECK_COMPLETED", "TASK_CREATED"]
TENANTS = ["acme", "stuck", "made-by-api"]


# -- the document ------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"] == "3.1.0"
    validate(DOCUMENT)  # raises on the first violation of the OpenAPI 3.1 schema


def test_the_daemon_ships_the_document_it_is_built_from() -> None:
    """The package's openapi.json (what /v1/openapi.json serves) is docs/openapi.yaml."""
    shipped = json.loads(openapi_document())
    assert shipped == DOCUMENT, "docs/openapi.yaml changed: run `make openapi` and commit both"


def test_the_document_is_package_data_of_every_install() -> None:
    """Shipped in the wheel (a non-editable install) as well as read in place (editable)."""
    pyproject = tomllib.loads((DOCUMENT_PATH.parent.parent / "pyproject.toml").read_text())
    assert "openapi.json" in pyproject["tool"]["setuptools"]["package-data"]["webhookd"]


def documented_operations() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in DOCUMENT["paths"].items()
        for method in METHODS
        if method in item
    }


def app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(method, path template) of every route of the app, as a client sees them."""
    path = write_config(tmp_path, {"acme": tenant("http://127.0.0.1:9/")})
    app = create_app(Service(config_mod.load(path)))
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        template = info.get("formatter") or info.get("path")
        assert template, f"a route of unknown shape: {route!r}"
        # {id:.+} (a variable matching any text, slashes included) is {id} to a client.
        template = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", template)
        # aiohttp answers HEAD for every GET route by itself (as GET without a body): the
        # document describes the GET.
        if route.method == "HEAD":
            continue
        if template.startswith(HTML_PREFIXES):
            continue
        assert template.startswith("/v1/") or template in ("/healthz", "/metrics"), template
        routes.add((route.method, template))
    return routes


def test_every_route_is_documented_and_every_documented_operation_is_a_route(
    tmp_path: Path,
) -> None:
    routes = app_routes(tmp_path)
    documented = documented_operations()
    assert sorted(routes - documented) == [], "routes of the app missing from docs/openapi.yaml"
    assert sorted(documented - routes) == [], "operations in docs/openapi.yaml the app lacks"


async def test_the_document_is_served_without_a_token(start_daemon: StartDaemon) -> None:
    daemon = await start_daemon(tenants={}, daemon={"api_token": TOKEN})
    async with daemon.session.get(daemon.base + "/v1/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == DOCUMENT
    async with daemon.session.get(daemon.base + "/v1/status") as response:
        assert response.status == 401  # the rest of the API still needs the token


# -- Schemathesis against a live daemon ----------------------------------------------------------


class Endpoints(BaseHTTPRequestHandler):
    """The tenants' receiver: /ok takes every delivery, /down answers 503 to each."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200 if self.path == "/ok" else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


PORT = free_port()  # chosen now: the schema's base URL is set when the module loads


@pytest.fixture(scope="module")
def live_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Endpoints)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}"
    directory = tmp_path_factory.mktemp("openapi")
    (directory / "tenants.d").mkdir()
    (directory / "portal.key").write_text("k" * 40)
    (directory / "portal.key").chmod(0o600)
    path = write_config(
        directory,
        {"acme": tenant(url + "/ok"), "stuck": tenant(url + "/down")},
        daemon={
            "listen": f"127.0.0.1:{PORT}",
            "api_token": TOKEN,
            "tenants_dir": "tenants.d",
            "portal_key_file": "portal.key",
        },
        delivery={"retry_base": 0.5},
    )
    process = Process(path)
    try:
        process.start()
        yield process
    finally:
        process.stop()
        receiver.shutdown()
        receiver.server_close()
        thread.join(5)
    assert "Traceback" not in process.log(), process.log()


def under_test() -> dict[str, Any]:
    """The document, with generation steered towards this daemon's configuration so that
    requests get past "no such tenant" and "unknown event" often.

    A tenant name is one of the configured ones (or one the tenant API may create) or any
    valid name: the schema takes exactly the names it took before, so its negative cases
    are the document's. An event type is one of two in the catalogue: an event type
    outside them is then a negative case, which the daemon refuses (422 unknown_event).
    """
    document = copy.deepcopy(DOCUMENT)
    tenant_name = document["components"]["parameters"]["Tenant"]
    tenant_name["schema"] = {"anyOf": [{"enum": TENANTS}, tenant_name["schema"]]}
    item = document["components"]["schemas"]["IngestItem"]["properties"]
    item["event"] = {"enum": EVENTS}
    return document


# The token through the document's own security scheme (not a fixed header): Schemathesis
# then also sends requests without it, or with another, and checks they are refused.
schema = schemathesis.openapi.from_dict(
    under_test(),
    config=schemathesis.Config.from_dict({"auth": {"openapi": {"bearerAuth": {"bearer": TOKEN}}}}),
)
schema.config.update(base_url=f"http://127.0.0.1:{PORT}")
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=EXAMPLES,
    with_security_parameters=False,
    deterministic=False,
    database="none",
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    # Requests without the token, or with another, are refused (401).
    ignored_auth,
    # A method a path does not take answers 405 with Allow, which lists the right ones.
    unsupported_method,
    allow_header_conformance,
    missing_required_header,
    # Stateful: a deleted tenant is gone; a created one is there.
    use_after_free,
    ensure_resource_availability,
]
BOUNDED = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.usefixtures("live_daemon")
@schema.parametrize()
@BOUNDED
def test_every_operation_answers_as_documented(case: schemathesis.Case[Any]) -> None:
    case.call_and_validate(checks=CHECKS, timeout=30)


# The chains the stateful run walks: the operations that produce or consume a tenant's
# webhooks and the tenant API's (each operation alone is covered above).
CHAINED = [
    "status",
    "ingest",
    "lookup",
    "retry",
    "history",
    "peek",
    "tenantStatus",
    "skip",
    "parked",
    "requeue",
    "replay",
    "putTenant",
    "getTenant",
    "deleteTenant",
]


class Workflow(schema.include(operation_id=CHAINED).as_state_machine()):  # type: ignore[misc]
    """Chains of calls through the document's links: status → ingest → lookup → retry,
    skip → requeue, parked → requeue, tenant PUT → GET → DELETE, ..."""

    failures: ClassVar[list[BaseException]] = []

    def get_call_kwargs(self, case: schemathesis.Case[Any]) -> dict[str, Any]:
        return {"timeout": 30}

    def validate_response(
        self,
        response: schemathesis.Response,
        case: schemathesis.Case[Any],
        additional_checks: Any = None,
        **kwargs: Any,
    ) -> None:
        try:
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs or None)
        except BaseException as exc:
            Workflow.failures.append(exc)
            raise


@pytest.mark.usefixtures("live_daemon")
def test_call_chains_through_the_links_answer_as_documented() -> None:
    """Generation only, no shrinking: a replay meets a daemon whose state moved on. For the
    same reason Hypothesis may find that a rule's precondition (a bundle filled by earlier
    answers) held in one run and not in the next, and stop with FlakyStrategyDefinition:
    that says nothing of the daemon, so the run starts again (at most three times). What
    fails the test is a check that failed, recorded as it happened."""
    Workflow.failures.clear()
    for _ in range(3):
        try:
            Workflow.run(
                settings=settings(
                    max_examples=max(5, EXAMPLES),
                    stateful_step_count=10,
                    phases=[Phase.generate],
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
            )
        except FlakyStrategyDefinition:
            if not Workflow.failures:
                continue
        break
    assert Workflow.failures == []
