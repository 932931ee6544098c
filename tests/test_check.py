"""`webhookd check` beyond validation: settings that are valid but cannot work on this
machine are warnings that name the key and the setting to change (webhookd.checks), and
`run` logs the same ones at start. The summary table fits 80 columns.

Real files, real DNS lookups of names that cannot resolve (`.invalid`), real sockets bound
to test the source addresses, `check` and `run` as subprocesses. A PostgreSQL database is
checked by connecting to it: real servers, one of them with TLS from a private CA.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import signal
import socket
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trustme

from tests.conftest import ROOT, Process, free_port, tenant, wait_for, write_config
from tests.postgres import TLS_HOSTNAME, PostgresServer, started_server
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


# -- a PostgreSQL database: check connects to it -----------------------------------------------

CANNOT_USE = "the file is valid, but its database cannot be used (below)"
PASSWORD_SOURCES = "database_password_file, $WEBHOOKD_DATABASE_PASSWORD or the URL"


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server speaking TLS with a certificate for `localhost` only, from its
    own private CA (server.ca)."""
    server = started_server(ssl=True)
    try:
        yield server
    finally:
        server.remove()


def postgres_config(directory: Path, url: str, name: str = "config.toml", **daemon: Any) -> Path:
    return write_config(
        directory,
        {"demo": tenant("http://127.0.0.1:9000/demo")},
        daemon={"database": url, **daemon},
        name=name,
    )


def probe(directory: Path, url: str, timeout: float = checks.DATABASE_TIMEOUT_S) -> str:
    """What `check` says of the database at `url` (relative paths from `directory`)."""
    found = checks.probe_database(config.postgres_url(url, directory), timeout)
    return found.version or found.error


def test_check_connects_to_a_postgresql_database_and_shows_its_version(
    tmp_path: Path, postgres_url: str
) -> None:
    path = postgres_config(tmp_path, postgres_url)
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: OK"
    assert re.fullmatch(
        rf"  database    {re.escape(postgres_url)} \(PostgreSQL \d+\.\d+, reachable\)", lines[1]
    ), lines[1]
    # tenants_dir is not read there: the API's tenants are in the database.
    assert lines[3] == (
        "  tenants_dir - (on PostgreSQL, tenants made through the API are in the database)"
    )


def test_check_exits_1_when_the_database_refuses_the_password(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    """The role must log in with its password (SCRAM): the right one in
    database_password_file connects, a wrong one is an error naming where to set it."""
    postgres_server.create_role("check_login", "the-right-password")
    url = postgres_url.replace("postgresql://postgres@", "postgresql://check_login@")
    (tmp_path / "db.password").write_text("a-wrong-password\n")
    path = postgres_config(tmp_path, url, database_password_file="db.password")

    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1, result.stdout
    assert result.stdout.splitlines()[:2] == [
        f"{path}: {CANNOT_USE}",
        f"  database    {url} (cannot be used: below)",
    ]
    assert result.stderr.splitlines() == [
        f"error: {path}: daemon.database: {url}: the server refused the login: password "
        'authentication failed for user "check_login"; check the user in the URL and the '
        f"password ({PASSWORD_SOURCES})"
    ]

    (tmp_path / "db.password").write_text("the-right-password\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "reachable" in result.stdout.splitlines()[1]


def test_check_names_each_way_a_database_cannot_be_used(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    """One line each: what is wrong, and what to change."""
    at = f"127.0.0.1:{postgres_server.port}"
    base = postgres_url.rpartition("/")[0]
    assert probe(tmp_path, f"{base}/no_such_db") == (
        f'database "no_such_db" does not exist on {at}: create it (createdb -O USER NAME), '
        "or fix the URL's database"
    )
    nobody = postgres_url.replace("postgres@", "nobody@")
    assert probe(tmp_path, nobody) == (
        'the server refused the login: role "nobody" does not exist; create the role, or fix '
        "the URL's user"
    )
    assert probe(tmp_path, f"{postgres_url}?sslmode=require") == (
        f"the server at {at} does not offer TLS, which sslmode=require requires: turn ssl on "
        "in its postgresql.conf, or lower sslmode"
    )
    port = free_port()  # nothing listens there
    assert probe(tmp_path, f"postgresql://postgres@127.0.0.1:{port}/w") == (
        f"connection refused by 127.0.0.1:{port}: is PostgreSQL running there, and listening "
        "on that address (listen_addresses) and port?"
    )
    gone = probe(tmp_path, "postgresql://postgres@db.webhookd.invalid/w")
    assert gone.startswith("db.webhookd.invalid does not resolve here ("), gone
    assert gone.endswith("); check the host name"), gone

    # A server that takes the connection and never answers: check gives up in time.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        assert probe(tmp_path, f"postgresql://postgres@127.0.0.1:{port}/w", timeout=0.5) == (
            f"no answer from 127.0.0.1:{port} within 0.5 s: check the host and port, and that "
            "a firewall lets the connection through"
        )


def test_check_connects_over_tls_verifying_a_private_ca(
    tmp_path: Path, tls_postgres: PostgresServer
) -> None:
    """sslmode=verify-full with sslrootcert = the private CA: the certificate's CA and its
    name are both checked. Another CA, or a name the certificate does not hold, fails with
    a TLS error saying which."""
    assert tls_postgres.ca is not None
    tls_postgres.ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    trustme.CA().cert_pem.write_to_path(tmp_path / "other-ca.pem")
    port = tls_postgres.port
    verified = f"postgresql://postgres@{TLS_HOSTNAME}:{port}/postgres?sslmode=verify-full"

    path = postgres_config(tmp_path, f"{verified}&sslrootcert=ca.pem")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    shown = f"{verified}&sslrootcert={tmp_path}/ca.pem"
    assert re.fullmatch(
        rf"  database    {re.escape(shown)} \(PostgreSQL \d+\.\d+, reachable\)",
        result.stdout.splitlines()[1],
    ), result.stdout
    assert "warning" not in result.stdout  # verify-full: nothing to warn about

    path = postgres_config(tmp_path, f"{verified}&sslrootcert=other-ca.pem", name="other.toml")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1, result.stdout
    assert result.stderr.splitlines() == [
        f"error: {path}: daemon.database: {verified}&sslrootcert={tmp_path}/other-ca.pem: TLS: "
        "the server's certificate does not verify against sslrootcert (unable to get local "
        "issuer certificate): set sslrootcert to the CA certificate that issued the server's"
    ]

    by_address = f"postgresql://postgres@127.0.0.1:{port}/postgres?sslrootcert=ca.pem&sslmode="
    path = postgres_config(tmp_path, f"{by_address}verify-full", name="address.toml")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1, result.stdout
    [error] = result.stderr.splitlines()
    assert error.endswith(
        ": TLS: the server's certificate is not issued to the IP address 127.0.0.1, which "
        "sslmode=verify-full checks: connect by a name the certificate holds, or have it "
        "reissued for this one"
    ), error
    # The CA is right, only the name differs: verify-ca, which does not check it, connects.
    assert probe(tmp_path, f"{by_address}verify-ca").startswith("PostgreSQL ")


def test_check_warns_when_tls_to_the_database_does_not_check_the_server(tmp_path: Path) -> None:
    """Over a network, only verify-full keeps a host on the way from posing as the database
    (and reading the password). A database on this machine needs no TLS."""
    (tmp_path / "ca.pem").write_bytes(trustme.CA().cert_pem.bytes())
    fix = "; use sslmode=verify-full with sslrootcert"
    cases = {
        "postgresql://db.example/w": "sslmode=prefer does not check who answers at "
        "db.example: a host on the way can pose as the database and read the password and "
        f"every webhook{fix}",
        "postgresql://db.example/w?sslmode=require": "sslmode=require does not check who "
        "answers at db.example: a host on the way can pose as the database and read the "
        f"password and every webhook{fix}",
        "postgresql://db.example/w?sslmode=verify-ca&sslrootcert=ca.pem": "sslmode=verify-ca "
        "checks the CA of db.example's certificate but not its name: any server with a "
        f"certificate from that CA can pose as the database{fix}",
        "postgresql://db.example/w?sslmode=verify-full&sslrootcert=ca.pem": None,
        "postgresql://127.0.0.1/w?sslmode=disable": None,
        "postgresql://localhost/w": None,
    }
    for url, expected in cases.items():
        path = postgres_config(tmp_path, url)
        found = checks.findings(config.load(path), resolve=False)
        assert found == ([f"{path}: daemon.database: {expected}"] if expected else []), url


def test_a_database_password_file_others_can_read_is_named(tmp_path: Path) -> None:
    password = tmp_path / "db.password"
    password.write_text("pw\n")
    password.chmod(0o644)
    path = postgres_config(
        tmp_path, "postgresql://127.0.0.1/w", database_password_file="db.password"
    )
    owner, group = me(), grp.getgrgid(os.getgid()).gr_name
    assert checks.findings(config.load(path), resolve=False, service_user=me()) == [
        f"{path}: daemon.database_password_file: {password} (mode 0644, owner {owner}, group "
        f"{group}) is readable by every user; chmod o-r it"
    ]
    password.chmod(0o600)
    assert checks.findings(config.load(path), resolve=False, service_user=me()) == []


def test_check_summarises_what_the_history_keeps(tmp_path: Path) -> None:
    """The history's keys as written: [delivery]'s retention, the tenants that differ, the
    size bound, the idempotency window and the largest replay."""
    path = write_config(tmp_path, {"acme": tenant("http://127.0.0.1:9/a")})
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert (
        "  history     7d (with payloads); at most 1GiB; ids 24h; replays up to 100000"
        in result.stdout.splitlines()
    ), result.stdout

    path = write_config(
        tmp_path,
        {
            "acme": tenant("http://127.0.0.1:9/a"),
            "lean": tenant("http://127.0.0.1:9/l", history_payloads=False),
            "none": tenant("http://127.0.0.1:9/n", history_retention="0"),
        },
        daemon={"history_max_bytes": "0", "idempotency_window": "12h", "replay_max": 500},
        delivery={"history_retention": "30d"},
    )
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert (
        "  history     30d (with payloads), 2 tenants otherwise; no size limit; ids 12h; "
        "replays up to 500" in result.stdout.splitlines()
    ), result.stdout


def test_a_proxy_password_file_others_can_read_is_named(tmp_path: Path) -> None:
    """[daemon]'s and a tenant's own, each under its key; the password itself never shows."""
    password = tmp_path / "proxy.password"
    password.write_text("pr0xy-pa55word\n")
    password.chmod(0o644)
    proxy = {"proxy": "http://hooks@127.0.0.1:3128", "proxy_password_file": "proxy.password"}
    path = write_config(
        tmp_path,
        {"acme": tenant("https://hooks.acme.example/", **proxy)},
        daemon={**proxy, "allow_private_endpoints": False},
    )
    owner, group = me(), grp.getgrgid(os.getgid()).gr_name
    shown = f"{password} (mode 0644, owner {owner}, group {group}) is readable by every user"
    assert checks.findings(config.load(path), resolve=False, service_user=me()) == [
        f"{path}: daemon.proxy_password_file: {shown}; chmod o-r it",
        f"{path}: tenants.acme.proxy_password_file: {shown}; chmod o-r it",
    ]
    password.chmod(0o600)
    assert checks.findings(config.load(path), resolve=False, service_user=me()) == []
