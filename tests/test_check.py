"""`webhookd check` beyond validation: settings that are valid but cannot work on this
machine are warnings that name the key and the setting to change (webhookd.checks), and
`run` logs the same ones at start. The summary table fits 80 columns.

Real files, real DNS lookups of names that cannot resolve (`.invalid`), real sockets bound
to test the source addresses, `check` and `run` as subprocesses.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import signal
import tomllib
from collections.abc import Callable
from pathlib import Path

import tomli_w

from tests.conftest import ROOT, Process, free_port, tenant, wait_for, write_config
from tests.test_reload import log_events
from tests.test_tenants_api import SIGNING, run_cli
from webhookd import checks, config

BLOCKED = (
    'every attempt fails with "blocked: resolves to private address …"; '
    "set allow_private_endpoints = true in [daemon] to deliver to it"
)
OK_WITH_WARNINGS = "the file is valid, so check exits 0; errors exit 1"


def warnings_of(output: str) -> list[str]:
    return [
        line.removeprefix("warning: ")
        for line in output.splitlines()
        if line.startswith("warning: ")
    ]


# -- the first hour: `init`, a local endpoint, `check` ---------------------------------------------


def test_check_warns_that_a_loopback_endpoint_is_blocked_and_names_the_setting(
    tmp_path: Path,
) -> None:
    """`init` writes allow_private_endpoints = false; a tenant on 127.0.0.1 (the development
    receiver) then fails every attempt. check says so, and still exits 0."""
    path = tmp_path / "config.toml"
    assert run_cli("init", str(path)).returncode == 0
    raw = tomllib.loads(path.read_text())
    raw["tenants"] = {"demo": tenant("http://127.0.0.1:9000/demo")}  # init writes none
    path.write_text(tomli_w.dumps(raw))

    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: OK, with 1 warning (below)"
    assert f"1 warning ({OK_WITH_WARNINGS}):" in lines
    assert warnings_of(result.stdout) == [
        f"{path}: tenants.demo.endpoint: 127.0.0.1 is a loopback address, which "
        f"allow_private_endpoints = false refuses: {BLOCKED}"
    ]
    assert "without TLS" not in result.stdout  # the secret does not leave the machine

    raw["daemon"]["allow_private_endpoints"] = True
    path.write_text(tomli_w.dumps(raw))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{path}: OK"
    assert "warning" not in result.stdout


def test_check_resolves_enabled_endpoints_as_deliveries_would(tmp_path: Path) -> None:
    """A name is looked up and its addresses judged by the sender's own rule; a name that does
    not resolve is a warning too. A disabled tenant sends nothing: its name is not looked up.
    `run` (resolve=False) judges literal addresses only."""
    path = write_config(
        tmp_path,
        {
            "local": tenant("http://localhost:9000/x"),
            "gone": tenant("https://hooks.gone.invalid/x"),
            "off": tenant("https://hooks.off.invalid/x", enabled=False),
            "private": tenant("https://10.1.2.3/x", enabled=False),
            "public": tenant("https://93.184.215.14/x"),
        },
        daemon={"allow_private_endpoints": False},
    )
    cfg = config.load(path)
    found = checks.findings(cfg)
    assert len(found) == 3, found
    gone, local, private = found
    assert gone.startswith(
        f"{path}: tenants.gone.endpoint: hooks.gone.invalid does not resolve here ("
    ), gone
    assert gone.endswith(
        'every attempt fails with "DNS: cannot resolve hooks.gone.invalid" until it does; '
        "check the host name"
    ), gone
    assert re.fullmatch(
        re.escape(f"{path}: tenants.local.endpoint: localhost resolves only to non-public ")
        + r"addresses \((127\.0\.0\.1|::1)(, (127\.0\.0\.1|::1))?\), "
        + re.escape(f"which allow_private_endpoints = false refuses: {BLOCKED}"),
        local,
    ), local
    assert private == (
        f"{path}: tenants.private.endpoint: 10.1.2.3 is a private address, which "
        f"allow_private_endpoints = false refuses: {BLOCKED}"
    )
    assert checks.findings(cfg, resolve=False) == [private]

    allow = write_config(
        tmp_path,
        {"local": tenant("http://localhost:9000/x"), "private": tenant("https://10.1.2.3/x")},
        name="allow.toml",
    )
    assert checks.findings(config.load(allow)) == []


def test_check_warns_where_the_secret_would_travel_in_clear(tmp_path: Path) -> None:
    """http:// is fine for a receiver on this machine, or in development; not with a
    signing_secret (which says someone cares who reads), nor behind a non-loopback API."""
    tenants = {
        "signed": tenant("http://hooks.signed.invalid/x", signing_secret=SIGNING),
        "plain": tenant("http://hooks.plain.invalid/x"),
        "local": tenant("http://127.0.0.1:9000/x", signing_secret=SIGNING),
        "tls": tenant("https://hooks.tls.invalid/x", signing_secret=SIGNING),
    }
    signed = (
        "tenants.signed.endpoint: http:// with a signing_secret: the secret and every webhook "
        "travel unencrypted (a signature proves who sent them, not who read them); use https://"
    )
    development = config.load(write_config(tmp_path, tenants, name="dev.toml"))
    assert checks.findings(development, resolve=False) == [f"{development.path}: {signed}"]
    assert checks.plain_http_unwarned(development) == ["plain"]  # check notes it, no more

    port = free_port()
    exposed = config.load(
        write_config(
            tmp_path,
            tenants,
            daemon={"listen": f"0.0.0.0:{port}", "api_token": "t0ken-for-the-network"},
            name="prod.toml",
        )
    )
    assert checks.findings(exposed, resolve=False) == [
        f"{exposed.path}: tenants.plain.endpoint: http:// while the API listens on "
        f"0.0.0.0:{port} (not loopback): the tenant's secret travels unencrypted to "
        "hooks.plain.invalid; use https://",
        f"{exposed.path}: {signed}",
    ]
    assert checks.plain_http_unwarned(exposed) == []


def test_check_warns_about_a_source_address_no_interface_has(tmp_path: Path) -> None:
    """Binding to the address (port 0) fails as every delivery's connect would."""
    path = write_config(
        tmp_path,
        {
            "eu": tenant("https://hooks.eu.invalid/x", source_address="198.51.100.7"),
            "here": tenant("https://hooks.here.invalid/x", source_address="127.0.0.1"),
        },
        daemon={"source_address": "192.0.2.7"},
    )
    found = checks.findings(config.load(path), resolve=False)
    hint = "every attempt sent from it fails; use one of its addresses (ip -brief address) or "
    assert found == [
        f"{path}: daemon.source_address: no interface of this machine has 192.0.2.7 "
        f"(Cannot assign requested address): {hint}remove the setting",
        f"{path}: tenants.eu.source_address: no interface of this machine has 198.51.100.7 "
        f"(Cannot assign requested address): {hint}remove the setting",
    ]


# -- secret files: readable by the service user, and by no one else --------------------------------


def me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def other_user() -> str:
    """A user that is not the one running the tests (nor root)."""
    return next(u.pw_name for u in pwd.getpwall() if u.pw_uid not in (0, os.getuid()))


def other_group() -> str:
    """A group the file may be given (any, as root) that is not this user's own."""
    return next(
        g.gr_name
        for g in grp.getgrall()
        if g.gr_gid != os.getgid() and (os.getuid() == 0 or g.gr_gid in os.getgroups())
    )


def secret_file_warnings(
    tmp_path: Path, mode: int, service_user: str, group: str | None = None
) -> list[str]:
    secret = tmp_path / "acme.secret"
    secret.write_text("from-file\n")
    secret.chmod(mode)
    os.chown(secret, -1, grp.getgrnam(group).gr_gid if group else os.getgid())
    table = tenant("https://hooks.acme.invalid/x", secret_file="acme.secret")
    del table["secret"]
    path = write_config(tmp_path, {"acme": table})
    return checks.findings(config.load(path), resolve=False, service_user=service_user)


def test_a_secret_file_only_its_service_user_can_read_is_fine(tmp_path: Path) -> None:
    assert secret_file_warnings(tmp_path, 0o600, me()) == []
    assert secret_file_warnings(tmp_path, 0o400, me()) == []
    # The user's own group (root:webhookd 0640 is the service layout of config.toml).
    assert secret_file_warnings(tmp_path, 0o640, me()) == []


def test_a_secret_file_the_service_user_cannot_read_is_named(tmp_path: Path) -> None:
    """0600 and owned by someone else (root, say): the daemon would not even start."""
    user, owner = other_user(), me()
    group = grp.getgrgid(os.getgid()).gr_name
    assert secret_file_warnings(tmp_path, 0o600, user) == [
        f"{tmp_path}/config.toml: tenants.acme.secret_file: acme.secret (mode 0600, owner "
        f"{owner}, group {group}) is not readable by {user}, the user the service runs as "
        f"(User= in systemd/webhookd.service): the daemon would not start; chown {user} it, "
        f"or chgrp {user} it and chmod 0640 it"
    ]


def test_a_secret_file_others_can_read_is_named(tmp_path: Path) -> None:
    user, owner = other_user(), me()
    group = grp.getgrgid(os.getgid()).gr_name
    where = f"{tmp_path}/config.toml: tenants.acme.secret_file: acme.secret"
    assert secret_file_warnings(tmp_path, 0o644, user) == [
        f"{where} (mode 0644, owner {owner}, group {group}) is readable by every user; chmod o-r it"
    ]
    # Readable by the group of the file, which is not the service user's: its members too.
    assert secret_file_warnings(tmp_path, 0o640, me(), group=other_group()) == [
        f"{where} (mode 0640, owner {owner}, group {other_group()}) is readable by the group "
        f"{other_group()}; chgrp {me()} it, or chmod g-r it"
    ]


def test_without_the_service_user_here_another_user_than_the_owner_is_assumed(
    tmp_path: Path,
) -> None:
    """No `webhookd` user on this machine (a laptop, a build host): the warning says which
    user it judged for."""
    absent, owner = "webhookd-not-a-user-here", me()
    group = grp.getgrgid(os.getgid()).gr_name
    where = f"{tmp_path}/config.toml: tenants.acme.secret_file: acme.secret"
    assert secret_file_warnings(tmp_path, 0o600, absent) == [
        f"{where} (mode 0600, owner {owner}, group {group}) is readable by {owner} only, and "
        f"the service runs as {absent} (User= in systemd/webhookd.service); with no such "
        f"user here, a user other than {owner} was assumed, who could not read it: the "
        "daemon would not start; chown the file to the user the daemon runs as"
    ]
    assert secret_file_warnings(tmp_path, 0o640, absent) == [
        f"{where} (mode 0640, owner {owner}, group {group}) is readable by the group "
        f"{group}: keep only the service user in that group, or chmod g-r it"
    ]


def test_the_service_user_is_the_units(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "webhookd.service").read_text()
    assert re.search(rf"^User={checks.SERVICE_USER}$", unit, re.M)


# -- the same warnings at start --------------------------------------------------------------


async def test_run_logs_the_warnings_check_prints_but_dns_at_start_and_reload(
    tmp_path: Path, process_factory: Callable[..., Process]
) -> None:
    path = write_config(
        tmp_path,
        {
            "demo": tenant("http://127.0.0.1:9/demo"),
            "eu": tenant("https://hooks.eu.invalid/x", source_address="198.51.100.7"),
        },
        daemon={"allow_private_endpoints": False, "log_level": "info"},
    )
    expected = checks.findings(config.load(path), resolve=False)
    assert [w.split(": ")[1] for w in expected] == [
        "tenants.demo.endpoint",
        "tenants.eu.source_address",
    ]
    process = process_factory(path)
    await asyncio.to_thread(process.start)
    assert [e["warning"] for e in log_events(process, "config_warning")] == expected
    assert process.proc is not None
    process.proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: log_events(process, "reloaded"), timeout=10)
    assert [e["warning"] for e in log_events(process, "config_warning")] == expected * 2

    check = await asyncio.to_thread(run_cli, "check", "-c", str(path))
    assert check.returncode == 0, check.stderr
    printed = warnings_of(check.stdout)
    dns = [w for w in printed if "tenants.eu.endpoint: hooks.eu.invalid does not resolve" in w]
    assert len(dns) == 1, printed
    assert [w for w in printed if w not in dns] == expected


# -- the summary fits 80 columns ---------------------------------------------------------------


def test_the_check_table_fits_80_columns(tmp_path: Path) -> None:
    """Names of 64 characters that differ at their end, an endpoint URL of 150: the table is
    cut to fit, the names in the middle (their ends stay apart), the URLs at their end."""
    names = ["acme-" + "x" * 49 + "-eu-west-" + str(n) for n in (1, 2)]
    assert all(len(name) == 64 for name in names)
    url = "http://127.0.0.1:9000/" + "webhooks/" * 14
    path = write_config(tmp_path, {name: tenant(url) for name in names})
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    block = result.stdout.split("\n\n")[1]
    header, *rows = block.splitlines()
    assert header.split() == ["TENANT", "STATE", "EVENTS", "SECRET", "ENDPOINT"]
    assert all(len(line) <= 80 for line in block.splitlines()), block
    assert len(rows) == 2
    for name, row in zip(names, rows, strict=True):
        shown, endpoint = row.split()[0], row.split()[-1]
        assert "…" in shown and name.startswith(shown[: shown.index("…")])
        assert name.endswith(shown[shown.index("…") + 1 :]) and shown.endswith(name[-1])
        assert endpoint.endswith("…") and url.startswith(endpoint[:-1]), row
