"""Config / reload / secrets review: each test shows one place where the daemon departs from
SPEC.md §5, §7, §8 or the README (Configuration, Operations, Run as a service). Each failed
on the code it was written against (55ea422) and passes since the commit after 4b34f64."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Process, Receiver, free_port, tenant, wait_for, write_config
from tests.test_reload import call, log_events

EVENT = "CHECK_COMPLETED"
ProcessFactory = Callable[..., Process]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


async def sighup_and_wait(process: Process) -> None:
    """SIGHUP, then wait until the daemon logged that the reload was applied."""
    before = len(log_events(process, "reloaded"))
    assert process.proc is not None
    process.proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: len(log_events(process, "reloaded")) > before, timeout=10)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webhookd", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


# -- reload: tenants_dir is restart-only, yet half-applied at once ------------------------------


async def test_changing_tenants_dir_by_reload_does_not_drop_api_tenants_before_the_restart(
    tmp_path: Path,
    receiver: Receiver,
    process_factory: ProcessFactory,
    http: aiohttp.ClientSession,
) -> None:
    """SPEC §5: "`[daemon]` keys other than `log_level`, `log_format` and
    `allow_private_endpoints` take effect at the next restart; a reload that changes them logs
    a warning naming them." SPEC §6: `PUT /v1/tenants/{t}` is "written to
    `tenants_dir/{t}.toml` ..., applied live".

    Operator: prepares a move of the tenant files by setting `tenants_dir = "moved.d"` (still
    empty) in config.toml and runs `systemctl reload webhookd`. The daemon logs
    `restart_needed keys=["tenants_dir"]`, but `Service.apply` takes the tenants from
    `config.load`, which already read the *new* folder: every API-made tenant of the old one
    stops at once (orphaned), while `daemon.tenants_dir` keeps the old value. A tenant PUT
    afterwards (answered 201) is written to the old folder, and the next reload, for any
    reason, silently removes it again. The restart-only key is neither kept until the
    restart nor applied consistently.
    """
    (tmp_path / "tenants.d").mkdir()
    (tmp_path / "moved.d").mkdir()
    beta = tmp_path / "tenants.d" / "beta.toml"
    beta.write_text(f'endpoint = "{receiver.url("/beta")}"\nsecret = "s3cr3t"\nevents = ["*"]\n')
    beta.chmod(0o600)
    listen = f"127.0.0.1:{free_port()}"
    tenants = {"acme": tenant(receiver.url("/acme"))}
    daemon = {"listen": listen, "log_level": "info", "tenants_dir": "tenants.d"}
    config = write_config(tmp_path, tenants, daemon=daemon)
    process = process_factory(config)
    await asyncio.to_thread(process.start)
    status, _ = await call(http, process, "GET", "/v1/tenants/beta")
    assert status == 200

    write_config(tmp_path, tenants, daemon={**daemon, "tenants_dir": "moved.d"})
    await sighup_and_wait(process)
    warned = log_events(process, "restart_needed")
    assert warned and "tenants_dir" in warned[-1]["keys"], warned

    # An operator creates a tenant through the API before the restart: 201.
    gamma = tenant(receiver.url("/gamma"))
    status, body = await call(http, process, "PUT", "/v1/tenants/gamma", gamma)
    assert status == 201, body
    # Any later reload (another tenant's secret rotated, say).
    await sighup_and_wait(process)

    found = {}
    for name in ("beta", "gamma"):
        found[name], _ = await call(http, process, "GET", f"/v1/tenants/{name}")
    assert found == {"beta": 200, "gamma": 200}, (
        f"tenants after a reload that only warned 'restart_needed: tenants_dir': {found}"
    )


# -- config strictness: ca_file ------------------------------------------------------------------


def test_check_refuses_a_ca_file_that_is_not_a_certificate_bundle(tmp_path: Path) -> None:
    """SPEC §5: "bad values are errors that name the file (as given) and the key path ...
    and stop startup". SPEC §7: `webhookd check` "validate, print a summary, exit 1 on
    errors". README (Run as a service): `webhookd check -c /etc/webhookd/config.toml` is the
    step before `systemctl enable --now webhookd`.

    Operator: sets `ca_file` to the private CA's *key* or a DER file by mistake (anything
    that is a file but not PEM certificates) and runs `webhookd check`: "OK", exit 0. The
    config loader only checks `is_file()`; the bundle is first parsed by `ssl` in
    `Sender.__init__`, so `webhookd run` then exits 1 with
    `cannot_start error="[X509: NO_CERTIFICATE_OR_CRL_FOUND] ..." listen="127.0.0.1:8787"`,
    naming neither the file nor `daemon.ca_file` (and pointing at `listen`). A reload that
    sets such a ca_file is accepted too (only `restart_needed`), so the next restart fails.
    """
    (tmp_path / "private-ca.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a cert\n")
    config = write_config(
        tmp_path,
        {"acme": tenant("https://hooks.acme.example/x")},
        daemon={"ca_file": "private-ca.pem"},
    )
    result = cli("check", "-c", str(config))
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"check accepted an unusable ca_file:\n{output}"
    assert f"{config}: daemon.ca_file:" in output, output


# -- secrets: an api_token with a line break -----------------------------------------------------


async def test_a_two_line_api_token_file_never_shows_the_token(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    """SPEC §7: "Secrets and tokens never appear in logs, errors or status output." README
    (Configuration): a secret is refused when it holds a control character ("a line break
    from a two-line secret file, say"), because it travels as a header value.

    Operator: writes the token file with two lines (a pasted token wrapped in two, or
    `echo $OLD >> api.token` while rotating), starts the daemon (it starts: `api_token_file`
    is stripped at the ends only and, unlike tenant secrets, never checked for control
    characters), then runs `webhookd status -c config.toml`. urllib refuses the header and the
    CLI dies with a traceback ending `ValueError: Invalid header value b'Bearer <token>'`: the
    whole API token, printed to the terminal (and to whatever captures it: CI logs, a
    ticket). No client can ever send that token either, so the config should refuse it.
    """
    first, second = "tok-" + secrets.token_hex(12), "tok-" + secrets.token_hex(12)
    token_file = tmp_path / "api.token"
    token_file.write_text(f"{first}\n{second}\n")
    token_file.chmod(0o600)
    config = write_config(tmp_path, {}, daemon={"api_token_file": "api.token"})

    outputs = {}
    check = cli("check", "-c", str(config))
    outputs["check"] = check.stdout + check.stderr
    if check.returncode == 0:  # accepted: then the daemon runs with it
        process = process_factory(config)
        await asyncio.to_thread(process.start)
        status = await asyncio.to_thread(cli, "status", "-c", str(config))
        outputs["status"] = status.stdout + status.stderr
        outputs["daemon log"] = process.log()
    leaks = [
        f"{part} in {where}: {text!r}"
        for where, text in outputs.items()
        for part in (first, second)
        if part in text
    ]
    assert not leaks, leaks


@pytest.mark.parametrize(
    "token",
    ["tok-5f0c2a9e71d4b6 ", "tök-5f0c2a9e71d4b6"],
    ids=["trailing-space", "non-ascii"],
)
async def test_the_cli_can_use_the_api_token_the_config_accepts(
    tmp_path: Path, process_factory: ProcessFactory, token: str
) -> None:
    """README (Command line): "The client commands read `listen` and `api_token` from the same
    config file the daemon uses." SPEC §5: bad values are errors that stop startup; README:
    `webhookd check` validates a file.

    Operator: writes `api_token = "…"` inline with a trailing space (a paste) or with a
    non-ASCII letter. `check` says OK and the daemon starts, but `webhookd status` (and every
    other client command) gets `HTTP 401` from its own daemon: the API strips the token it
    is sent while the configured one is kept unstripped, and urllib sends the header as
    Latin-1 while the daemon compares UTF-8 bytes. Same root cause as the two-line token: an
    `api_token` is never checked as a header value, unlike tenant secrets.
    """
    config = write_config(tmp_path, {}, daemon={"api_token": token})
    check = cli("check", "-c", str(config))
    if check.returncode != 0:  # refused with a key path: fine
        assert f"{config}: daemon.api_token:" in check.stderr, check.stderr
        return
    process = process_factory(config)
    await asyncio.to_thread(process.start)
    status = await asyncio.to_thread(cli, "status", "-c", str(config))
    assert status.returncode == 0, (
        f"check accepted the token, but the CLI cannot use it: {status.stderr}"
    )


# -- reload: the restart_needed warning --------------------------------------------------------


async def test_restart_needed_is_logged_when_the_same_reload_raises_log_verbosity(
    tmp_path: Path, receiver: Receiver, process_factory: ProcessFactory
) -> None:
    """SPEC §5: "`[daemon]` keys other than `log_level`, `log_format` and
    `allow_private_endpoints` take effect at the next restart; a reload that changes them logs
    a warning naming them." README (Configuration): "(a reload that changes them logs
    `restart_needed` naming them)".

    Operator: runs quietly with `log_level = "error"`, then edits config.toml to
    `log_level = "info"` and `max_connections = 50` and reloads, expecting to see what the
    reload did. `Service.apply` logs `restart_needed` (and any `config_warning`) *before*
    `logs.configure` applies the new level, so the warning is filtered by the old "error"
    level and never written, while the `reloaded` line right after it (at info) is: the
    operator believes max_connections is now 50.
    """
    listen = f"127.0.0.1:{free_port()}"
    tenants = {"acme": tenant(receiver.url("/acme"))}
    config = write_config(tmp_path, tenants, daemon={"listen": listen, "log_level": "error"})
    process = process_factory(config)
    await asyncio.to_thread(process.start)

    write_config(
        tmp_path,
        tenants,
        daemon={"listen": listen, "log_level": "info", "max_connections": 50},
    )
    await sighup_and_wait(process)  # "reloaded" is at info: the new level is in force
    warned = log_events(process, "restart_needed")
    assert warned and warned[-1]["keys"] == ["max_connections"], (
        "no restart_needed warning for max_connections; log:\n" + process.log()
    )
