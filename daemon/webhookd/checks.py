"""What a valid configuration can still get wrong on this machine, each finding naming the
setting to change.

`config` refuses what cannot be meant (a bad URL, an unknown key). The checks here find
settings that are valid but cannot work: an endpoint the private-address rule blocks at
every attempt, an http:// endpoint where the secret should not travel in clear, a
`source_address` no interface has, a `secret_file` the service user cannot read, a
PostgreSQL connection whose TLS does not check who answers. They are warnings, never
errors: `webhookd check` prints them and exits 0, `run` logs them as `config_warning`
(without the DNS lookups, which may be slow and change by the hour).

`probe_database` is `check`'s connection to a PostgreSQL database: its version, or one line
saying why it cannot be used and what to do (an error: `check` exits 1).
"""

from __future__ import annotations

import asyncio
import grp
import ipaddress
import math
import os
import pwd
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from webhookd import http1
from webhookd.config import (
    DATABASE_PASSWORD_ENV,
    Config,
    PostgresURL,
    TenantConfig,
    is_ip,
    is_loopback,
)
from webhookd.logs import one_line
from webhookd.sender import is_blocked

# The user systemd runs the daemon as: User= in systemd/webhookd.service (a test holds the
# two together). Secret files must be readable by this user, and by no one else.
SERVICE_USER = "webhookd"
UNIT = "(User= in systemd/webhookd.service)"
# getaddrinfo cannot be cancelled: lookups run in daemon threads, and `check` waits this
# long per round of RESOLVERS lookups, at most RESOLVE_LIMIT_S in all.
RESOLVE_TIMEOUT_S = 2.0
RESOLVERS = 16
RESOLVE_LIMIT_S = 10.0

ALLOW_PRIVATE = "set allow_private_endpoints = true in [daemon] to deliver to it"
# `check` gives a PostgreSQL database this long to connect, log in and answer one query.
DATABASE_TIMEOUT_S = 5.0
PASSWORD_SOURCES = f"database_password_file, ${DATABASE_PASSWORD_ENV} or the URL"


def findings(
    cfg: Config,
    *,
    resolve: bool = True,
    service_user: str = SERVICE_USER,
    timeout: float = RESOLVE_TIMEOUT_S,
) -> list[str]:
    """Every warning for `cfg`, daemon-wide ones first, then tenant by tenant. With `resolve`,
    enabled tenants' endpoint names are looked up in DNS as deliveries will look them up."""
    found: list[str] = []
    if isinstance(cfg.daemon.database, PostgresURL):
        found += _database_tls(cfg, cfg.daemon.database)
    reader = ServiceUser.named(service_user)
    if cfg.daemon.database_password_file is not None:
        found += _private_file(
            f"{cfg.path}: daemon.database_password_file",
            cfg.daemon.database_password_file,
            reader,
        )
    proxies = [(f"{cfg.path}: daemon.proxy_password_file", cfg.daemon.proxy)] + [
        (where(cfg, t, "proxy_password_file"), t.proxy) for t in cfg.tenants.values()
    ]
    for at, proxy in proxies:
        if proxy is not None and proxy.password_file is not None:
            found += _private_file(at, proxy.password_file, reader)
    if cfg.daemon.source_address:
        found += _source_address(f"{cfg.path}: daemon.source_address", cfg.daemon.source_address)
    targets = {t.name: http1.parse_target(t.endpoint) for t in cfg.tenants.values()}
    lookups: dict[tuple[str, int], list[str] | str] = {}
    if resolve:
        names = {
            (target.host, target.port)
            for name, target in targets.items()
            if cfg.tenants[name].enabled and not is_ip(target.host)
        }
        lookups = resolve_all(names, timeout)
    for tenant in cfg.tenants.values():
        target = targets[tenant.name]
        found += _endpoint(cfg, tenant, target, lookups, resolve=resolve, timeout=timeout)
        found += _plain_http(cfg, tenant, target)
        if tenant.source_address:
            found += _source_address(where(cfg, tenant, "source_address"), tenant.source_address)
        if tenant.secret_ref.kind == "secret_file":
            found += _secret_file(cfg, tenant, reader)
    return found


def where(cfg: Config, tenant: TenantConfig, key: str) -> str:
    """The file and key path of a tenant's key, as config errors name them."""
    if tenant.from_api:
        return f"{tenant.origin}: {key}"
    return f"{cfg.path}: tenants.{tenant.name}.{key}"


# -- endpoints -------------------------------------------------------------------------------


def _endpoint(
    cfg: Config,
    tenant: TenantConfig,
    target: http1.Target,
    lookups: dict[tuple[str, int], list[str] | str],
    *,
    resolve: bool,
    timeout: float,
) -> list[str]:
    """The private-address rule, applied as the sender applies it at connect time."""
    at = where(cfg, tenant, "endpoint")
    host = target.host
    if is_ip(host):
        if cfg.daemon.allow_private_endpoints or not is_blocked(host):
            return []
        what = f"{host} is {_kind(host)}"
    else:
        if not (resolve and tenant.enabled):
            return []
        found = lookups.get((host, target.port))
        if found is None:
            return [
                f"{at}: {host} did not resolve within {timeout:g} s here (slow or unreachable "
                'DNS?); deliveries fail with "DNS: cannot resolve" while it does not'
            ]
        if isinstance(found, str):
            return [
                f"{at}: {host} does not resolve here ({found}): every attempt fails with "
                f'"DNS: cannot resolve {host}" until it does; check the host name'
            ]
        # The sender connects to any address the rule allows: only all-blocked is fatal.
        if cfg.daemon.allow_private_endpoints or not all(is_blocked(a) for a in found):
            return []
        addresses = ", ".join(sorted(set(found)))
        what = f"{host} resolves only to non-public addresses ({addresses})"
    return [
        f"{at}: {what}, which allow_private_endpoints = false refuses: every attempt fails "
        f'with "blocked: resolves to private address …"; {ALLOW_PRIVATE}'
    ]


def _kind(host: str) -> str:
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "multicast", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    return "not a public address"


def resolve_all(
    names: Iterable[tuple[str, int]], timeout: float = RESOLVE_TIMEOUT_S
) -> dict[tuple[str, int], list[str] | str]:
    """Each (host, port) -> its addresses, or why it has none. A name missing from the answer
    did not resolve in time. Lookups run side by side in daemon threads: a hung resolver
    holds neither the answer past the deadline nor the process's exit."""
    pending = sorted(names)
    if not pending:
        return {}
    results: dict[tuple[str, int], list[str] | str] = {}
    lock = threading.Lock()
    work = iter(pending)

    def resolver() -> None:
        while True:
            with lock:
                key = next(work, None)
            if key is None:
                return
            try:
                infos = socket.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
                answer: list[str] | str = [str(info[4][0]) for info in infos]
            except (OSError, UnicodeError) as exc:
                answer = getattr(exc, "strerror", None) or str(exc)
            with lock:
                results[key] = answer

    count = min(RESOLVERS, len(pending))
    threads = [threading.Thread(target=resolver, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    rounds = math.ceil(len(pending) / count)
    deadline = time.monotonic() + min(timeout * rounds, RESOLVE_LIMIT_S)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return dict(results)


def _plain_http(cfg: Config, tenant: TenantConfig, target: http1.Target) -> list[str]:
    """http:// sends the shared secret in clear, in the body and in Authorization. Fine for a
    receiver on this machine or in development; not where the setup says production."""
    if target.tls or is_loopback(target.host):
        return []
    at = where(cfg, tenant, "endpoint")
    if tenant.signing_secret:
        return [
            f"{at}: http:// with a signing_secret: the secret and every webhook travel "
            "unencrypted (a signature proves who sent them, not who read them); use https://"
        ]
    if not is_loopback(cfg.daemon.listen_host):
        return [
            f"{at}: http:// while the API listens on {cfg.daemon.listen} (not loopback): the "
            f"tenant's secret travels unencrypted to {target.host}; use https://"
        ]
    return []


def plain_http_unwarned(cfg: Config) -> list[str]:
    """Tenants whose secret travels in clear over a network, beyond those warned about."""
    names = []
    for t in cfg.tenants.values():
        target = http1.parse_target(t.endpoint)
        if not target.tls and not is_loopback(target.host) and not _plain_http(cfg, t, target):
            names.append(t.name)
    return names


# -- source addresses ------------------------------------------------------------------------


def _source_address(at: str, address: str) -> list[str]:
    """A source address must be one of this machine's: binding to it (port 0, nothing sent)
    fails exactly as each delivery's connect would."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as exc:
            return [
                f"{at}: no interface of this machine has {address} ({exc.strerror}): every "
                "attempt sent from it fails; use one of its addresses (ip -brief address) or "
                "remove the setting"
            ]
    return []


# -- secret files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceUser:
    """The user the daemon will run as, looked up once: `uid` is None when this machine has
    no such user."""

    name: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()

    @classmethod
    def named(cls, name: str) -> ServiceUser:
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            return cls(name)
        groups = tuple(os.getgrouplist(user.pw_name, user.pw_gid))
        return cls(name, user.pw_uid, user.pw_gid, groups)


def _secret_file(cfg: Config, tenant: TenantConfig, user: ServiceUser) -> list[str]:
    shown = tenant.secret_ref.where
    path = cfg.path.resolve().parent / Path(shown).expanduser()
    return _private_file(where(cfg, tenant, "secret_file"), path, user, shown=shown)


def _private_file(at: str, path: Path, user: ServiceUser, *, shown: str = "") -> list[str]:
    """The file at `path` (`shown` as the config gives it) must be readable by the service
    user, and by no one else.

    Judged by mode and owner (ACLs and the folders on the way are not looked at). Without
    such a user on this machine, the service user is taken to be another user than the
    file's owner (who prepared the file is rarely who the daemon runs as), perhaps a member
    of the file's group.
    """
    try:
        info = path.stat()
    except OSError:
        return []  # the load read it a moment ago; gone since, the next load says so
    mode = stat.S_IMODE(info.st_mode)
    if user.uid is None:
        if not mode & (stat.S_IRGRP | stat.S_IROTH):
            problem = (
                f"is readable by {_user_name(info.st_uid)} only, and the service runs as "
                f"{user.name} {UNIT}; with no such user here, a user other than "
                f"{_user_name(info.st_uid)} was assumed, who could not read it: the daemon "
                "would not start; chown the file to the user the daemon runs as"
            )
        elif mode & stat.S_IROTH:
            problem = "is readable by every user; chmod o-r it"
        else:
            problem = (
                f"is readable by the group {_group_name(info.st_gid)}: keep only the service "
                "user in that group, or chmod g-r it"
            )
    elif not _readable_by(info, user):
        problem = (
            f"is not readable by {user.name}, the user the service runs as {UNIT}: the daemon "
            f"would not start; chown {user.name} it, or chgrp {user.name} it and chmod 0640 it"
        )
    elif mode & stat.S_IROTH:
        problem = "is readable by every user; chmod o-r it"
    elif mode & stat.S_IRGRP and info.st_gid != user.gid:
        problem = (
            f"is readable by the group {_group_name(info.st_gid)}; chgrp {user.name} it, or "
            "chmod g-r it"
        )
    else:
        return []
    owner, group = _user_name(info.st_uid), _group_name(info.st_gid)
    described = f"{shown or path} (mode {mode:04o}, owner {owner}, group {group})"
    return [f"{at}: {described} {problem}"]


def _readable_by(info: os.stat_result, user: ServiceUser) -> bool:
    """As the kernel decides: the owner's bits for the owner, else the group's for a member."""
    if user.uid == 0:
        return True
    if info.st_uid == user.uid:
        return bool(info.st_mode & stat.S_IRUSR)
    if info.st_gid in user.groups:
        return bool(info.st_mode & stat.S_IRGRP)
    return bool(info.st_mode & stat.S_IROTH)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# -- the PostgreSQL database -----------------------------------------------------------------


def _database_tls(cfg: Config, database: PostgresURL) -> list[str]:
    """Over a network, only sslmode=verify-full makes sure the password and the webhooks go
    to the database and no one else: the other modes let a host on the way pose as it."""
    parts = urlsplit(database.url)
    host = parts.hostname or ""
    sslmode = parse_qs(parts.query).get("sslmode", ["prefer"])[0]
    if is_loopback(host) or sslmode == "verify-full":
        return []
    at = f"{cfg.path}: daemon.database"
    if sslmode in ("verify-ca", "require") and "sslrootcert" in parts.query:
        what = (
            f"sslmode={sslmode} checks the CA of {host}'s certificate but not its name: "
            "any server with a certificate from that CA can pose as the database"
        )
    else:
        what = (
            f"sslmode={sslmode} does not check who answers at {host}: a host on the way can "
            "pose as the database and read the password and every webhook"
        )
    return [f"{at}: {what}; use sslmode=verify-full with sslrootcert"]


@dataclass(frozen=True)
class DatabaseProbe:
    """What connecting to the database showed: its version ("PostgreSQL 15.10"), or why it
    cannot be used and what to do, in one line."""

    version: str = ""
    error: str = ""


def probe_database(database: PostgresURL, timeout: float = DATABASE_TIMEOUT_S) -> DatabaseProbe:
    """Connect as the daemon would (the URL, the password apart), ask the server's version.

    The name is looked up first in a daemon thread, as for endpoints: the event loop's own
    lookup cannot be cancelled, and asyncio.run() would wait for a hung one at its end.
    """
    parts = urlsplit(database.url)
    host, port = parts.hostname or "", parts.port or 5432
    if not is_ip(host):
        found = resolve_all([(host, port)], timeout).get((host, port))
        if found is None:
            return DatabaseProbe(
                error=f"{host} did not resolve within {timeout:g} s here (slow or unreachable "
                "DNS?); check the host name and the resolver"
            )
        if isinstance(found, str):
            return DatabaseProbe(
                error=f"{host} does not resolve here ({found}); check the host name"
            )

    async def within_timeout() -> str:
        async with asyncio.timeout(timeout):
            return await _server_version(database)

    try:
        version = asyncio.run(within_timeout())
    except Exception as exc:  # whatever it is, `check` reports it in a line
        return DatabaseProbe(error=database_error(exc, database, timeout))
    return DatabaseProbe(version=version)


async def _server_version(database: PostgresURL) -> str:
    import asyncpg  # only `check` and the PostgreSQL engine need it

    connection = await asyncpg.connect(database.url, password=database.password.reveal() or None)
    try:
        text = await connection.fetchval("SELECT version()")
    finally:
        await connection.close()
    # "PostgreSQL 15.10 (Debian 15.10-0+deb12u1) on x86_64-pc-linux-gnu, compiled by ..."
    return " ".join(str(text).split()[:2])


# ssl.SSLCertVerificationError.verify_code for a certificate issued to another name.
NAME_MISMATCH = {62: "name", 64: "IP address"}  # X509_V_ERR_HOSTNAME/IP_ADDRESS_MISMATCH


def database_error(exc: BaseException, database: PostgresURL, timeout: float) -> str:
    """Why connecting to `database` failed, and what to do, in one line. Built from our
    own URL (never with the password) and the error's text, which asyncpg and the server
    write without it: the password travels apart from the URL."""
    import asyncpg

    parts = urlsplit(database.url)
    host, port = parts.hostname or "", parts.port or 5432
    at = f"{host}:{port}"
    sslmode = parse_qs(parts.query).get("sslmode", ["prefer"])[0]
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        if exc.verify_code in NAME_MISMATCH:
            return (
                f"TLS: the server's certificate is not issued to the "
                f"{NAME_MISMATCH[exc.verify_code]} {host}, which sslmode=verify-full checks: "
                "connect by a name the certificate holds, or have it reissued for this one"
            )
        return (
            f"TLS: the server's certificate does not verify against sslrootcert ({reason}): "
            "set sslrootcert to the CA certificate that issued the server's"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS with {at} failed ({exc.reason or exc}); check the server's ssl settings"
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return (
            f"the server refused the login: {exc}; check the user in the URL and the password "
            f"({PASSWORD_SOURCES})"
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        if "pg_hba.conf" in str(exc):
            return f"the server refused the login: {exc}; add a line for it to pg_hba.conf"
        return f"the server refused the login: {exc}; create the role, or fix the URL's user"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"{exc} on {at}: create it (createdb -O USER NAME), or fix the URL's database"
    if isinstance(exc, asyncpg.PostgresError):
        return f"the server refused: {exc} (SQLSTATE {exc.sqlstate})"
    if isinstance(exc, TimeoutError):
        return (
            f"no answer from {at} within {timeout:g} s: check the host and port, and that a "
            "firewall lets the connection through"
        )
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"connection refused by {at}: is PostgreSQL running there, and listening on that "
            "address (listen_addresses) and port?"
        )
    if isinstance(exc, socket.gaierror):
        return f"{host} does not resolve here ({exc.strerror}); check the host name"
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return (
            f"the server at {at} does not offer TLS, which sslmode={sslmode} requires: turn "
            "ssl on in its postgresql.conf, or lower sslmode"
        )
    if isinstance(exc, OSError):
        return f"cannot connect to {at}: {exc.strerror or exc}"
    return f"cannot use it: {one_line(exc)}"
