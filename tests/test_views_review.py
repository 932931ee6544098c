"""Review of the operator-facing views: status, text tables, CLI clients, README walk-through.

Each test here failed on the code it was written against (c453128), because of the defect
its docstring names (with the SPEC or README sentence it breaks), and passes since the
commit after it.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import ROOT, Receiver, StartDaemon, tenant, wait_for, write_config
from tests.test_e2e import cli
from webhookd import views
from webhookd.__main__ import build_parser
from webhookd.status import iso

EVENT = "CHECK_COMPLETED"
SECRET_VARIABLE = "WEBHOOKD_REVIEW_ACME_SECRET"


def walkthrough() -> str:
    """README's "When a tenant is stalled" section, up to the next top-level heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## When a tenant is stalled")
    end = text.index("\n## ", start + 1)
    return text[start:end]


# -- 1. the client commands need the daemon's tenant secrets --------------------------------------


async def test_client_commands_work_without_the_daemons_tenant_secrets(
    tmp_path: Path,
    receiver: Receiver,
    start_daemon: StartDaemon,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README, Command line: "The client commands read `listen` and `api_token` from the
    same config file the daemon uses." SPEC §5 offers `secret_env = "ACME_SECRET"` for a
    tenant (the variable set in the service's environment, as systemd does), and SPEC §7
    gives `webhookd status [TENANT] [-c CONFIG]`, `retry`, `refresh` against that file.

    The client commands load the whole configuration, tenant secrets included, so in an
    operator's shell (where the service's variable is not set) `webhookd status -c
    /etc/webhookd/config.toml` exits 1 with "tenants.acme.secret_env: environment variable
    … is not set or empty" instead of showing the status of a running daemon.
    """
    receiver.always("/acme", 503)
    monkeypatch.setenv(SECRET_VARIABLE, "acme-secret-from-the-unit")  # the daemon's environment
    table = tenant(receiver.url("/acme"), retry_base=30.0, secret_env=SECRET_VARIABLE)
    del table["secret"]
    path = write_config(tmp_path, {"acme": table})
    daemon = await start_daemon(path)
    await daemon.ingest("acme", {"event": EVENT})
    await wait_for(lambda: daemon.service.tenant_status("acme")["attempts"] == 1, timeout=5)

    operator_shell = {k: v for k, v in os.environ.items() if k != SECRET_VARIABLE}
    results = {}
    for command in (("status",), ("status", "acme"), ("retry", "acme"), ("refresh", "acme")):
        results[command] = await cli(*command, "-c", str(path), env=operator_shell)
    failed = {" ".join(c): (code, err.strip()) for c, (code, _, err) in results.items() if code}
    assert failed == {}, failed
    assert "stalled" in results[("status",)][1]
    assert results[("retry", "acme")][1].strip() == "acme: retrying now"


# -- 2. the walk-through's status table ------------------------------------------------------------


def test_walkthrough_status_table_is_what_the_text_view_prints() -> None:
    """README, "When a tenant is stalled", step 1: "The text view puts each tenant on a
    line; the stalled one says so, with its last error", followed by the output of
    `curl -s 'localhost:8787/v1/status?format=text'`:

        acme    stalled  137      12m ago   13m ago   5         in 7m58s  HTTP 503
        globex  empty    0        -         2s ago    0         -         -

    Rendered by the text view for exactly that state (oldest webhook 12 minutes old, last
    success 13 minutes ago, next attempt in 7m58s), the OLDEST and LAST OK cells read
    "12m00s ago" and "13m00s ago": below an hour the view always prints seconds, so the
    "12m ago" the walk-through shows never appears.
    """
    section = walkthrough()
    block = section[section.index("TENANT  QUEUE") :]
    shown = [line for line in block[: block.index("```")].splitlines() if line.strip()]
    assert len(shown) == 4, shown  # header, acme, globex, the totals line

    now = 1_764_064_800.0  # any whole second
    failure = {
        "at": iso(now - 30),
        "attempt": 5,
        "first_sequence": 1,
        "last_sequence": 100,
        "count": 100,
        "status": 503,
        "error": "HTTP 503",
        "duration_ms": 12.0,
    }
    acme = {
        "tenant": "acme",
        "queue": "stalled",
        "waiting": 137,
        "oldest_waiting_at": iso(now - 12 * 60),
        "last_processed_at": iso(now - 13 * 60),
        "attempts": 5,
        "next_attempt_at": iso(now + 7 * 60 + 58),
        "recent_failures": [failure],
    }
    globex = {
        "tenant": "globex",
        "queue": "empty",
        "waiting": 0,
        "oldest_waiting_at": None,
        "last_processed_at": iso(now - 2),
        "attempts": 0,
        "next_attempt_at": None,
        "recent_failures": [],
    }
    totals = {"tenants": 2, "waiting": 137, "stalled": 1, "paused": 0, "disabled": 0}
    text = views.status_table({"tenants": [acme, globex], "totals": totals}, now=now)
    printed = [line for line in text.splitlines() if line.strip()]
    # Cells compared, not the padding (the README's columns are laid out by hand).
    assert [line.split() for line in printed] == [line.split() for line in shown], text


# -- 3. "each step has a CLI equivalent" -----------------------------------------------------------


def test_every_walkthrough_step_has_the_cli_equivalent_it_promises() -> None:
    """README, "When a tenant is stalled": "Everything here is curl against the API (…);
    each step has a CLI equivalent." Pause, resume and step 4 (peek, skip, parked,
    requeue) had none when this was written; every curl line must now name a command
    that parses."""
    section = walkthrough()
    assert "each step has a CLI equivalent" in section
    parser = build_parser()
    missing = []
    for line in section.splitlines():
        if "curl " not in line or "Bearer" in line or "the same as JSON" in line:
            continue  # the JSON form of step 2 shares that step's `webhookd status acme`
        curl = re.search(r"curl [^`#]*", line)
        assert curl is not None, line
        # "# or: webhookd …", "…: webhookd …" after a code line, "(or `webhookd …`)" in prose.
        equivalent = re.search(r"(?:# or: |: |\(or `)(webhookd [^`)]*)", line)
        if equivalent is None:
            missing.append(curl.group(0).strip())
            continue
        words = shlex.split(equivalent.group(1).strip().replace("<id>", "ID"))[1:]
        parser.parse_args(words)  # the named equivalent exists (SystemExit 2 otherwise)
    assert missing == [], "API calls of the walk-through with no CLI equivalent: " + "; ".join(
        missing
    )
