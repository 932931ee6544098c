"""TOML configuration -> frozen dataclasses, strictly validated.

Every error names the file (as given) and the key path, and says what was expected:
``config.toml: tenants.acme.endpoint: not an http(s) URL``. Unknown keys are errors, so a
misspelled key never silently falls back to a default.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import math
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from webhookd.events import ALL_EVENTS, EVENT_NAME, Catalogue
from webhookd.http1 import ascii_host

# Used with fullmatch: `$` would also match before a final line break.
TENANT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What no header value may hold (tab aside): secrets and producer ids end up in headers.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
SIGNING_SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]+")
API_TOKEN = re.compile(r"[!-~]+")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Where the PostgreSQL password may come from besides the URL and database_password_file.
DATABASE_PASSWORD_ENV = "WEBHOOKD_DATABASE_PASSWORD"
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# The URL query parameters passed on to asyncpg. It sends any other one to the server as a
# setting at connect (`connect_timeout` too, which the server then refuses), so an unknown
# one is an error here rather than a failed start there.
URL_PARAMETERS = ("sslmode", "sslrootcert", "sslcert", "sslkey")
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

T = TypeVar("T")


class ConfigError(Exception):
    """One or more configuration errors, each already prefixed with file and key path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Secret:
    """A secret value that never shows itself in a repr, a log line or an f-string."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class DeliveryOptions:
    """`[delivery]` defaults; any of them may be overridden in a tenant's table."""

    batch_size: int = 100
    batch_window: float = 10.0
    batch_timeout: float = 5.0
    timeout: float = 10.0
    retry_base: float = 30.0
    retry_doublings: int = 12
    retry_after_doublings: float = 86400.0
    success_statuses: tuple[int, ...] = (200,)
    recent_failures: int = 10
    # History (issue 13): seconds a webhook's history record is kept once it left the
    # queue (0: no history at all), and whether the record keeps its data (replay needs it).
    history_retention: float = 7 * 86400.0
    history_payloads: bool = True


DELIVERY_KEYS = tuple(f.name for f in fields(DeliveryOptions))


@dataclass(frozen=True)
class DaemonConfig:
    database: Path | PostgresURL = Path("webhookd.db")
    listen_host: str = "127.0.0.1"
    listen_port: int = 8787
    api_token: Secret = field(default_factory=lambda: Secret(""))
    tenants_dir: Path | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    durability: Literal["full", "normal"] = "full"
    max_connections: int = 1000
    source_address: str = ""
    allow_private_endpoints: bool = False
    shutdown_grace: float = 10.0
    max_body_bytes: int = 10 * 1024 * 1024
    ca_file: Path | None = None
    api_max_connections: int = 1000
    api_header_timeout: float = 10.0
    api_idle_timeout: float = 15.0
    # Where the PostgreSQL password was read from (its permissions are `check`'s question).
    database_password_file: Path | None = None
    # PostgreSQL with several instances: how long a tenant's lease lasts unrenewed.
    lease_seconds: float = 10.0
    # PostgreSQL with several instances: the URL the others reach this API at ("": derived).
    advertise_url: str = ""
    # History (issue 13): its size bound, every tenant together (None: no size limit); how
    # long a producer id is remembered at least after its acceptance; the largest replay.
    history_max_bytes: int | None = 1 << 30
    idempotency_window: float = 86400.0
    replay_max: int = 100_000
    # `proxy`, `proxy_password_file`, `proxy_checks_addresses`; None: deliveries go direct.
    proxy: ProxyConfig | None = None
    # The pages at /ui/ (issue 15): how long a sign-in lasts.
    ui_session_ttl: float = 8 * 3600.0
    # Portal links: the HMAC key (from `portal_key_file`; empty: no links can be made), how
    # long a link lasts, whether a link may edit the tenant's configuration, the origins
    # that may frame the portal page (CSP frame-ancestors), and the address links start with
    # ("": the address the request for the link came to).
    portal_key: Secret = field(default_factory=lambda: Secret(""))
    portal_key_file: Path | None = None
    portal_link_ttl: float = 3600.0
    portal_can_edit: bool = False
    portal_frame_ancestors: tuple[str, ...] = ()
    portal_base_url: str = ""

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    @property
    def api_url(self) -> str:
        """Where the other instances reach this API: `advertise_url`, or the listen address
        when it is one (the host name when it is a wildcard such as 0.0.0.0)."""
        if self.advertise_url:
            return self.advertise_url
        host = self.listen_host
        if host in WILDCARD_HOSTS:
            host = socket.gethostname()
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.listen_port}"


# Listen addresses that are every interface rather than one: not an address to call back.
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")


@dataclass(frozen=True)
class PostgresURL:
    """`[daemon] database` as a PostgreSQL URL. The password is kept apart (from the URL,
    `database_password_file` or `$WEBHOOKD_DATABASE_PASSWORD`) and never printed: str()
    and repr() show the URL without it."""

    url: str  # postgresql://user@host:port/dbname?sslmode=…, never with a password
    password: Secret = field(default_factory=lambda: Secret(""))

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class ProxyConfig:
    """An egress proxy (`proxy` with `proxy_password_file` and `proxy_checks_addresses`).
    The password is kept apart, never in `url`; an empty `url` (a tenant's `proxy = ""`)
    means direct."""

    url: str  # http://USER@HOST:PORT or http://HOST:PORT, never with a password
    host: str = ""  # IDNA-encoded, no brackets
    port: int = 0
    username: str = ""
    password: Secret = field(default_factory=lambda: Secret(""))
    password_file: Path | None = None
    checks_addresses: bool = False


DIRECT = ProxyConfig("")
PROXY_KEYS = ("proxy", "proxy_password_file", "proxy_checks_addresses")

# The keys each table accepts. `_Table.finish` refuses any other key, and any of these the
# loader did not read; docs/configuration.md documents exactly these (tests/test_docs.py).
TOP_LEVEL_KEYS = ("daemon", "events", "delivery", "tenants")
DAEMON_KEYS = (
    "database",
    "database_password_file",
    "listen",
    "api_token",
    "api_token_file",
    "tenants_dir",
    "log_format",
    "log_level",
    "durability",
    "max_connections",
    "source_address",
    "allow_private_endpoints",
    "shutdown_grace",
    "max_body_bytes",
    "ca_file",
    *PROXY_KEYS,
    "api_max_connections",
    "api_header_timeout",
    "api_idle_timeout",
    "lease_seconds",
    "advertise_url",
    "history_max_bytes",
    "idempotency_window",
    "replay_max",
    "ui_session_ttl",
    "portal_key_file",
    "portal_link_ttl",
    "portal_can_edit",
    "portal_frame_ancestors",
    "portal_base_url",
)
EVENTS_KEYS = ("custom",)
# A tenant's own keys; its table (and a tenants_dir file, and the tenant API's JSON) also
# takes every [delivery] key and, in the configuration file only, the proxy keys.
TENANT_KEYS = (
    "enabled",
    "batching",
    "endpoint",
    "secret",
    "secret_file",
    "secret_env",
    "events",
    "authorization_header",
    "signing_secret",
    "source_address",
)
TENANT_TABLE_KEYS = (*TENANT_KEYS, *PROXY_KEYS, *DELIVERY_KEYS)


@dataclass(frozen=True)
class SecretRef:
    """Where a tenant's secret comes from: `secret` (inline), `secret_file` or `secret_env`."""

    kind: Literal["secret", "secret_file", "secret_env"]
    # The file path or variable name; empty for an inline secret (its value is not kept here).
    where: str = ""


@dataclass(frozen=True)
class TenantConfig:
    name: str
    endpoint: str
    events: tuple[str, ...]
    subscribed: frozenset[str]
    secret: Secret
    secret_ref: SecretRef
    enabled: bool = True
    batching: bool = False
    authorization_header: bool = True
    signing_secret: Secret = field(default_factory=lambda: Secret(""))
    source_address: str = ""
    # The tenant's own proxy (DIRECT for `proxy = ""`); None: [daemon] proxy, if any.
    proxy: ProxyConfig | None = None
    delivery: DeliveryOptions = field(default_factory=DeliveryOptions)
    # Keys set explicitly in the tenant's own table, so the API can show them as written.
    overrides: tuple[str, ...] = ()
    # The file that defines the tenant; `from_api` when it lives in tenants_dir.
    origin: Path = Path()
    from_api: bool = False


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonConfig
    delivery: DeliveryOptions
    catalogue: Catalogue
    tenants: Mapping[str, TenantConfig]
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Reading typed values with key paths


class _Table:
    """One TOML table being read: takes typed keys, records errors, rejects leftovers."""

    def __init__(self, source: str, path: str, raw: Any, errors: list[str]) -> None:
        self.source = source
        self.path = path
        self.errors = errors
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.error(None, "must be a table")
            raw = {}
        self.raw: dict[str, Any] = raw
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        # Quoted as TOML quotes it when the key is not bare, so "acme.eu" is one key.
        part = name if BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)
        return f"{self.path}.{part}" if self.path else part

    def error(self, name: str | None, message: str) -> None:
        """Record an error at key `name`, or (None) at this table itself."""
        where = self.key(name) if name is not None else self.path
        self.errors.append(f"{self.source}: {where}: {message}")

    def has(self, name: str) -> bool:
        return name in self.raw

    def sub(self, name: str) -> _Table:
        self.seen.add(name)
        return _Table(self.source, self.key(name), self.raw.get(name), self.errors)

    def get(self, name: str, default: T, convert: Callable[[Any], T]) -> T:
        """The value of `name` through `convert` (which raises ValueError with a message)."""
        self.seen.add(name)
        if name not in self.raw:
            return default
        try:
            return convert(self.raw[name])
        except ValueError as exc:
            self.error(name, str(exc))
            return default

    def finish(self, known: Collection[str]) -> None:
        """Refuse every key of the table but those in `known` that were read: a key the
        loader reads is accepted only once listed (the lists below, which
        docs/configuration.md documents and tests/test_docs.py checks it against)."""
        accepted = self.seen.intersection(known)
        for name in sorted(set(self.raw) - accepted):
            self.error(name, "unknown key")


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _int(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}, got {value}")
        return value

    return convert


def _number(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("expected a number")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {number}")
        too_low = number <= low if low_open else number < low
        if too_low or number > high:
            bounds = (
                f"greater than {_plain(low)} and at most {_plain(high)}"
                if low_open
                else f"from {_plain(low)} to {_plain(high)}"
            )
            raise ValueError(f"expected a number {bounds}, got {_plain(number)}")
        return number

    return convert


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}
SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?", re.IGNORECASE)


def _duration(low: float, high: float) -> Callable[[Any], float]:
    """A duration in seconds: a number of seconds, or a string such as "7d", "24h", "90m",
    "30s", "2w" or "0"."""

    def convert(value: Any) -> float:
        if isinstance(value, str):
            match = DURATION.fullmatch(value.strip())
            if match is None:
                raise ValueError(
                    f'expected a duration such as "7d", "24h", "30m", "45s" or a number '
                    f"of seconds, got {value!r}"
                )
            seconds = float(match[1]) * DURATION_UNITS[match[2] or "s"]
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError('expected a duration such as "7d", "24h" or a number of seconds')
        else:
            seconds = float(value)
        if not math.isfinite(seconds) or not low <= seconds <= high:
            raise ValueError(
                f"expected a duration from {_plain(low)} s to {_plain(high / 86400)} days, "
                f"got {value!r}"
            )
        return seconds

    return convert


def _max_bytes(value: Any) -> int | None:
    """A size in bytes ("1GiB", "500MB", 1073741824); 0 means no size limit (None)."""
    if isinstance(value, str):
        match = SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                f'expected a size such as "1GiB", "500MB" or a number of bytes, got {value!r}'
            )
        size = int(float(match[1]) * SIZE_UNITS[(match[2] or "").upper()])
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ValueError('expected a size such as "1GiB", "500MB" or a number of bytes')
    else:
        size = value
    if size < 0 or size > 1 << 50:
        raise ValueError(f"expected a size from 0 (no limit) to 1PiB, got {value!r}")
    if 0 < size < 1 << 20:
        raise ValueError(f"expected 0 (no limit) or at least 1MiB, got {value!r}")
    return size or None


def _plain(number: float) -> str:
    """A number as a person writes it: 600, 0.5, 2592000 (never 2.592e+06)."""
    if math.isfinite(number) and number == int(number):
        return str(int(number))
    return repr(number)


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            expected = ", ".join(repr(c) for c in choices)
            raise ValueError(f"expected one of {expected}, got {value!r}")
        return str(value)

    return convert


def _ip_or_empty(value: Any) -> str:
    text = _str(value)
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"not an IP address: {text!r}") from None
    return text


def _statuses(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of HTTP status codes")
    for status in value:
        if isinstance(status, bool) or not isinstance(status, int):
            raise ValueError(f"expected integer status codes from 200 to 299, got {status!r}")
        if 300 <= status <= 399:
            raise ValueError(f"{status} cannot be a success: redirects are never followed")
        if not 200 <= status <= 299:
            raise ValueError(f"expected status codes from 200 to 299, got {status}")
    return tuple(sorted(set(value)))


def endpoint_url(value: Any) -> str:
    text = _str(value)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError("not an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    if _legacy_ipv4(parts.hostname):
        raise ValueError(
            f"{parts.hostname!r} is a legacy numeric IPv4 form; write the address in full"
        )
    if parts.username or parts.password:
        raise ValueError("credentials in the URL are not allowed; use the tenant secret")
    try:
        # The stdlib codec checks an ASCII name's label lengths; an international name is
        # encoded as deliveries will encode it (IDNA 2008).
        host = ascii_host(parts.hostname).encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(
            f"{parts.hostname!r} is not a valid host name (each dot-separated label 1 to 63 "
            "characters)"
        ) from None
    if not _HOST.fullmatch(host) and not is_ip(host):
        raise ValueError(f"{parts.hostname!r} is not a valid host name")
    if parts.fragment:
        raise ValueError("a URL fragment is never sent; remove it")
    return text


_HOST = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def advertise_url(value: Any) -> str:
    """`[daemon] advertise_url`: an http(s) URL of this instance's API as the other
    instances reach it (a path prefix allowed, for a proxy in front); no trailing slash."""
    text = _str(value).strip()
    if not text:
        return ""
    expected = "expected an http(s) URL such as http://10.0.0.5:8787"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"{expected}, got {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{expected}, got {text!r}")
    if parts.hostname in WILDCARD_HOSTS:
        raise ValueError(
            f"{parts.hostname} is every address, not one to call back; "
            "name this machine as the other instances reach it"
        )
    if parts.username or parts.password:
        raise ValueError("credentials in the URL are not allowed; the API token is sent")
    if parts.query or parts.fragment:
        raise ValueError("a query or fragment cannot be part of the API's address; remove it")
    return text.rstrip("/")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _legacy_ipv4(host: str) -> bool:
    """`127.1`, `2130706433`, `0x7f.1`: numbers libc takes for an address but we refuse to
    send to (the HTTP client rejects them, and they are a classic SSRF disguise)."""
    if is_ip(host):
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def parse_listen(value: Any) -> tuple[str, int]:
    text = _str(value)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# The loader


@dataclass
class _Context:
    """What parsing one tenant needs from the rest of the file."""

    source: str
    base_dir: Path
    catalogue: Catalogue
    delivery: DeliveryOptions
    errors: list[str]
    warnings: list[str]
    environ: Mapping[str, str]


# `load(..., tenants_from=...)` default: the folder the file names.
AS_CONFIGURED: Any = object()


def load(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    *,
    tenants_from: Path | None = AS_CONFIGURED,
) -> Config:
    """Read, validate and resolve a configuration file (and its tenants_dir).

    `tenants_from` reads the API's tenant files from another folder than the file names: a
    reload keeps the running tenants_dir (a restart-only key) until the restart.
    """
    config_path = Path(os.fspath(path))
    raw = _read_toml(config_path)
    return from_dict(
        raw,
        config_path,
        environ=os.environ if environ is None else environ,
        tenants_from=tenants_from,
    )


def _read_toml(config_path: Path) -> dict[str, Any]:
    source = os.fspath(config_path)
    try:
        return tomllib.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None


@dataclass(frozen=True)
class ClientConfig:
    """What the client commands (send, status, retry, ...) need to reach the daemon."""

    listen_host: str
    listen_port: int
    api_token: Secret


def load_client(path: str | os.PathLike[str]) -> ClientConfig:
    """Read only `listen` and `api_token` (or `api_token_file`) from a configuration file.

    An operator's shell may lack what the daemon reads for its tenants (a `secret_env`
    variable, a `secret_file` only the service user may read); the client needs none of it.
    """
    config_path = Path(os.fspath(path))
    raw = _read_toml(config_path)
    errors: list[str] = []
    table = _Table(os.fspath(config_path), "", raw, errors).sub("daemon")
    host, port = table.get("listen", ("127.0.0.1", 8787), parse_listen)
    token = _api_token(table, config_path.resolve().parent)
    if errors:
        raise ConfigError(errors)
    return ClientConfig(host, port, Secret(token))


def load_catalogue(path: str | os.PathLike[str]) -> Catalogue:
    """Read only `[events]` from a configuration file: the catalogue `webhookd events` lists
    (as for `load_client`, nothing a tenant needs is read)."""
    config_path = Path(os.fspath(path))
    raw = _read_toml(config_path)
    errors: list[str] = []
    catalogue = _catalogue(_Table(os.fspath(config_path), "", raw, errors).sub("events"))
    if errors:
        raise ConfigError(errors)
    return catalogue


def from_dict(
    raw: dict[str, Any],
    config_path: Path,
    environ: Mapping[str, str],
    *,
    tenants_from: Path | None = AS_CONFIGURED,
) -> Config:
    source = os.fspath(config_path)
    base_dir = config_path.resolve().parent
    errors: list[str] = []
    warnings: list[str] = []
    root = _Table(source, "", raw, errors)

    daemon = _daemon(root.sub("daemon"), base_dir, environ)
    catalogue = _catalogue(root.sub("events"))
    delivery = _delivery(root.sub("delivery"), DeliveryOptions())
    ctx = _Context(source, base_dir, catalogue, delivery, errors, warnings, environ)

    tenants: dict[str, TenantConfig] = {}
    tenants_table = root.sub("tenants")
    for name in tenants_table.raw:
        tenants_table.seen.add(name)
        table = tenants_table.sub(name)
        if not TENANT_NAME.fullmatch(name):
            table.error(None, "tenant names are 1 to 64 of A-Z a-z 0-9 _ -")
            continue
        tenant = parse_tenant(name, table, ctx, origin=config_path.resolve(), from_api=False)
        if tenant is not None:
            tenants[name] = tenant
    root.finish(TOP_LEVEL_KEYS)

    directory = daemon.tenants_dir if tenants_from is AS_CONFIGURED else tenants_from
    if isinstance(daemon.database, PostgresURL):
        # On PostgreSQL, tenants made through the API live in the database (api_tenants),
        # shared by every instance: the service reads them there, never from tenants_dir.
        directory = None
    if directory is not None and directory.is_dir():
        for tenant_source, tenant in _load_tenants_dir(directory, ctx):
            if tenant.name in tenants:
                errors.append(
                    f"{tenant_source}: tenant {tenant.name!r} is also defined in {source} "
                    f"(tenants.{tenant.name}); remove one of them"
                )
            else:
                tenants[tenant.name] = tenant

    if errors:
        raise ConfigError(errors)
    return Config(
        path=config_path,
        daemon=daemon,
        delivery=delivery,
        catalogue=catalogue,
        tenants=dict(sorted(tenants.items())),
        warnings=tuple(warnings),
    )


def _daemon(table: _Table, base_dir: Path, environ: Mapping[str, str]) -> DaemonConfig:
    defaults = DaemonConfig()

    database, password_file = _database(table, base_dir, environ)
    host, port = table.get("listen", ("127.0.0.1", 8787), parse_listen)
    token = _api_token(table, base_dir)
    if not token and not is_loopback(host):
        table.error(
            "listen",
            f"{host} is not a loopback address: set api_token (or api_token_file) "
            "so the API is not open to the network",
        )

    def optional_path(value: Any) -> Path | None:
        text = _str(value)
        return _path(base_dir, text) if text else None

    default_dir: Path | None = base_dir / "tenants.d"
    tenants_dir = table.get("tenants_dir", default_dir, optional_path)
    try:
        if tenants_dir is not None and tenants_dir.exists() and not tenants_dir.is_dir():
            table.error("tenants_dir", f"{table.raw['tenants_dir']!r} is not a folder")
    except OSError as exc:  # a name too long for the file system, say
        table.error("tenants_dir", f"cannot use {str(tenants_dir)[:80]!r}: {exc.strerror}")
        tenants_dir = None
    ca_file = table.get("ca_file", None, optional_path)
    if ca_file is not None:
        _check_ca_file(table, ca_file)
    portal_key_file, portal_key = _portal_key(table, base_dir)
    config = DaemonConfig(
        database=database,
        listen_host=host,
        listen_port=port,
        api_token=Secret(token),
        tenants_dir=tenants_dir,
        log_format=table.get("log_format", "auto", _choice("auto", "json", "console")),  # type: ignore[arg-type]
        log_level=table.get("log_level", "info", _choice(*LOG_LEVELS)),
        durability=table.get("durability", "full", _choice("full", "normal")),  # type: ignore[arg-type]
        max_connections=table.get("max_connections", 1000, _int(1, 100_000)),
        source_address=table.get("source_address", "", _ip_or_empty),
        allow_private_endpoints=table.get("allow_private_endpoints", False, _bool),
        shutdown_grace=table.get("shutdown_grace", 10.0, _number(0, 3600)),
        max_body_bytes=table.get("max_body_bytes", defaults.max_body_bytes, _int(1024, 1 << 30)),
        ca_file=ca_file,
        api_max_connections=table.get("api_max_connections", 1000, _int(1, 100_000)),
        api_header_timeout=table.get("api_header_timeout", 10.0, _number(0.1, 3600)),
        api_idle_timeout=table.get("api_idle_timeout", 15.0, _number(0.1, 86400)),
        database_password_file=password_file,
        lease_seconds=table.get("lease_seconds", 10.0, _number(2, 600)),
        advertise_url=table.get("advertise_url", "", advertise_url),
        history_max_bytes=table.get("history_max_bytes", defaults.history_max_bytes, _max_bytes),
        idempotency_window=table.get("idempotency_window", 86400.0, _duration(1, 86400 * 3650)),
        replay_max=table.get("replay_max", 100_000, _int(1, 10_000_000)),
        proxy=_proxy(table, base_dir),
        ui_session_ttl=table.get("ui_session_ttl", 8 * 3600.0, _duration(60, 30 * 86400)),
        portal_key=Secret(portal_key),
        portal_key_file=portal_key_file,
        portal_link_ttl=table.get("portal_link_ttl", 3600.0, _duration(60, 30 * 86400)),
        portal_can_edit=table.get("portal_can_edit", False, _bool),
        portal_frame_ancestors=table.get("portal_frame_ancestors", (), frame_ancestors),
        portal_base_url=table.get("portal_base_url", "", portal_base_url),
    )
    table.finish(DAEMON_KEYS)
    return config


# The shortest portal key taken: an HMAC-SHA256 key of fewer bytes is guessable sooner.
PORTAL_KEY_MIN = 32


def _portal_key(table: _Table, base_dir: Path) -> tuple[Path | None, str]:
    """`portal_key_file`: its path and the key (the file's one line, at least
    PORTAL_KEY_MIN characters); (None, "") when unset, with any error recorded."""
    file_text = table.get("portal_key_file", "", _str)
    if not file_text:
        return None, ""
    path, key = _password_file(table, "portal_key_file", base_dir, file_text)
    if key is not None and len(key) < PORTAL_KEY_MIN:
        table.error(
            "portal_key_file",
            f"{file_text!r} holds {len(key)} characters; a portal key is at least "
            f"{PORTAL_KEY_MIN} (head -c 32 /dev/urandom | base64 > portal.key)",
        )
        key = None
    return path, key or ""


# An origin as CSP's frame-ancestors takes it: scheme://host[:port], a host wildcard allowed.
FRAME_ANCESTOR = re.compile(r"https?://(\*\.)?[A-Za-z0-9.-]+(:\d{1,5})?")


def frame_ancestors(value: Any) -> tuple[str, ...]:
    """`portal_frame_ancestors`: the origins allowed to embed the portal page."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('expected a list of origins, e.g. ["https://app.example.com"]')
    for origin in value:
        if origin != "'self'" and not FRAME_ANCESTOR.fullmatch(origin):
            raise ValueError(
                f"{origin[:80]!r} is not an origin (https://HOST or https://HOST:PORT, "
                "no path; or 'self')"
            )
    return tuple(value)


def portal_base_url(value: Any) -> str:
    """`portal_base_url`: http(s)://HOST[:PORT][/PREFIX], where the portal links point."""
    text = _str(value).strip().rstrip("/")
    if not text:
        return ""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError(f"expected http(s)://HOST[:PORT][/PATH], got {text[:80]!r}")
    return text


# ---------------------------------------------------------------------------------------------
# An egress proxy: its URL, and its password kept apart


def _proxy(table: _Table, base_dir: Path, *, tenant: bool = False) -> ProxyConfig | None:
    """`proxy` and its two companion keys in `table`. In [daemon], None when no proxy is
    set; in a tenant, None when the tenant sets none (the daemon's applies) and DIRECT for
    an explicit `proxy = ""`."""
    url = table.get("proxy", "", proxy_url)
    file_text = table.get("proxy_password_file", "", _str)
    checks = table.get("proxy_checks_addresses", False, _bool)
    if not url:
        for key, given in (("proxy_password_file", file_text), ("proxy_checks_addresses", checks)):
            if given:
                table.error(key, 'only with a proxy (set proxy = "http://HOST:PORT")')
        if tenant and table.has("proxy") and not isinstance(table.raw["proxy"], str):
            return None  # the error is recorded
        return DIRECT if tenant and table.has("proxy") else None
    parts = urlsplit(url)
    username = unquote(parts.username or "")
    password = ""
    password_file = None
    if file_text:
        if not username:
            table.error(
                "proxy_password_file",
                "the proxy URL names no user (http://USER@HOST:PORT): a password alone "
                "cannot be sent",
            )
        password_file, read = _password_file(table, "proxy_password_file", base_dir, file_text)
        password = read or ""
    return ProxyConfig(
        url=url,
        host=ascii_host(parts.hostname or ""),
        port=parts.port or 0,
        username=username,
        password=Secret(password),
        password_file=password_file,
        checks_addresses=checks,
    )


def _password_file(
    table: _Table, key: str, base_dir: Path, file_text: str
) -> tuple[Path | None, str | None]:
    """A password file named by `key`: its path, and the password (its one line), or None
    with the error recorded under `key` (unreadable, empty, several lines)."""
    try:
        path = _path(base_dir, file_text)
        # The final line break an editor adds is not the password's; spaces are.
        text = _read_file_text(path).removesuffix("\n").removesuffix("\r")
    except ValueError as exc:
        table.error(key, f"cannot read {file_text!r}: {exc}")
        return None, None
    if not text:
        table.error(key, f"{file_text!r} is empty")
        return path, None
    if CONTROL_CHARACTERS.search(text):
        table.error(
            key,
            f"{file_text!r} holds more than one line, or a control character; the password "
            "is the file's one line",
        )
        return path, None
    return path, text


def proxy_url(value: Any) -> str:
    """`proxy`: http://HOST:PORT or http://USER@HOST:PORT, or "" (none; in a tenant: direct).

    Raises ValueError with a message that never repeats the URL: it may hold a password."""
    text = _str(value).strip()
    if not text:
        return ""
    form = "expected http://HOST:PORT or http://USER@HOST:PORT"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{form} (the port is not a number from 1 to 65535)") from None
    if parts.password is not None:
        raise ValueError(
            "a password in the proxy URL is not allowed (the URL may be printed); put it in "
            "proxy_password_file"
        )
    if parts.scheme == "https":
        raise ValueError(
            "https:// proxies (TLS to the proxy) are not supported; use http://HOST:PORT "
            "(the tunnel to an https endpoint is TLS from end to end all the same)"
        )
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(form)
    if not port:
        raise ValueError(f"{form} (the port is required)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{form} (no path, query or fragment)")
    username = unquote(parts.username or "")
    if CONTROL_CHARACTERS.search(username) or (parts.username is not None and not username):
        raise ValueError("the user name is empty or holds a control character")
    try:
        host = ascii_host(parts.hostname).encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{parts.hostname!r} is not a valid host name") from None
    if not _HOST.fullmatch(host) and not is_ip(host):
        raise ValueError(f"{parts.hostname!r} is not a valid host name")
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{quote(username, safe='')}@" if username else ""
    return f"http://{user}{netloc}"


# ---------------------------------------------------------------------------------------------
# The database: a SQLite file, or a PostgreSQL URL whose password is kept apart


def _database(
    table: _Table, base_dir: Path, environ: Mapping[str, str]
) -> tuple[Path | PostgresURL, Path | None]:
    """`database` (a path or a postgresql:// URL), and the password file it was given."""

    def convert(value: Any) -> Path | PostgresURL:
        text = _str(value)
        if not text:
            raise ValueError("expected a path, got an empty string")
        if URL_SCHEME.match(text):
            return postgres_url(text, base_dir)
        return _path(base_dir, text)

    default: Path | PostgresURL = base_dir / "webhookd.db"
    database = table.get("database", default, convert)
    file_text = table.get("database_password_file", "", _str)
    if not isinstance(database, PostgresURL):
        given = table.raw.get("database")
        if file_text and not (isinstance(given, str) and URL_SCHEME.match(given)):
            table.error(
                "database_password_file",
                "only for a PostgreSQL database (database is a SQLite file's path)",
            )
        return database, None  # $WEBHOOKD_DATABASE_PASSWORD is not SQLite's business

    passwords: dict[str, str] = {}  # where it is set -> the password
    if database.password:
        passwords["the URL"] = database.password.reveal()
    password_file = None
    if file_text:
        password_file, text = _password_file(table, "database_password_file", base_dir, file_text)
        if text is not None:
            passwords["database_password_file"] = text
    if environ.get(DATABASE_PASSWORD_ENV):
        passwords[f"${DATABASE_PASSWORD_ENV}"] = environ[DATABASE_PASSWORD_ENV]
    if len(passwords) > 1:
        table.error(
            "database_password_file" if file_text else "database",
            f"the password is set in {len(passwords)} places ({', '.join(passwords)}); keep one",
        )
    password = next(iter(passwords.values()), "")
    return replace(database, password=Secret(password)), password_file


def postgres_url(text: str, base_dir: Path) -> PostgresURL:
    """A `postgresql://` URL, checked and rewritten: the password taken out (into the
    result's `password`), the file paths in its query made absolute against `base_dir`.

    Raises ValueError with a message that never repeats the URL: it may hold a password.
    """
    form = "postgresql://USER@HOST:PORT/DBNAME?sslmode=verify-full&sslrootcert=CA.pem"
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise ValueError(f"expected a SQLite file's path or a URL such as {form}")
    # rpartition, as urlsplit does for the host: an unencoded @ in a password stays in it.
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if "," in hostport:
        raise ValueError("several hosts (host1,host2) are not supported; give one")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or hostport.endswith(":"):
        raise ValueError(
            "the port is not a number from 1 to 65535 (in a password, percent-encode / ? # and @)"
        )
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"the URL names no host: {form}")
    if not (_HOST.fullmatch(host) or is_ip(host)):
        raise ValueError(f"{host!r} is not a valid host name")
    raw_database = parts.path.removeprefix("/")
    if not raw_database:
        raise ValueError(f"the URL names no database: {form}")
    if "/" in raw_database or "@" in raw_database:
        raise ValueError(
            "the database name holds a / or an @ (in a password, percent-encode / and @ as "
            "%2F and %40)"
        )
    if parts.fragment:
        raise ValueError("a URL fragment (#...) has no meaning here; remove it")
    user, _, password = userinfo.partition(":")
    query = _url_query(parts.query, base_dir)
    netloc = f"{quote(unquote(user), safe='')}@{hostport}" if user else hostport
    url = f"postgresql://{netloc}/{quote(unquote(raw_database), safe='')}"
    if query:
        url += "?" + urlencode(query, quote_via=quote, safe="/")
    return PostgresURL(url, Secret(unquote(password)))


def _url_query(query: str, base_dir: Path) -> dict[str, str]:
    """The URL's query parameters, checked; their paths made absolute."""
    params = _url_parameters(query)
    sslmode = params.get("sslmode", "prefer")
    if sslmode not in SSLMODES:
        raise ValueError(f"sslmode must be one of {', '.join(SSLMODES)}; got {sslmode!r}")
    verifies = sslmode in ("verify-ca", "verify-full")
    if verifies and "sslrootcert" not in params:
        raise ValueError(
            f"sslmode={sslmode} needs sslrootcert=PATH: the CA certificate that signed the "
            "server's (for a public CA, the system bundle, e.g. "
            "/etc/ssl/certs/ca-certificates.crt)"
        )
    if "sslrootcert" in params and sslmode not in ("require", "verify-ca", "verify-full"):
        raise ValueError(
            f"sslrootcert is not used with sslmode={sslmode}, which does not check the "
            "server's certificate; set sslmode=verify-full"
        )
    if "sslkey" in params and "sslcert" not in params:
        raise ValueError("sslkey needs sslcert (the client certificate it goes with)")
    for name in ("sslrootcert", "sslcert", "sslkey"):
        if name in params:
            path = _path(base_dir, params[name])
            if not path.is_file():
                raise ValueError(f"{name}: no such file: {params[name]!r}")
            params[name] = os.fspath(path)
    _load_tls_files(params)
    return params


def _url_parameters(query: str) -> dict[str, str]:
    """NAME=VALUE pairs, each one of URL_PARAMETERS, once."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise ValueError("the query (after ?) is not NAME=VALUE pairs joined by &") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in ("password", "passfile"):
            raise ValueError(
                f"{name} in the URL's query is not supported; set database_password_file or "
                f"${DATABASE_PASSWORD_ENV}"
            )
        if name not in URL_PARAMETERS:
            raise ValueError(
                f"the URL parameter {name!r} is not supported (supported: "
                f"{', '.join(URL_PARAMETERS)})"
            )
        if name in params:
            raise ValueError(f"the URL sets {name} twice")
        params[name] = value
    return params


def _load_tls_files(params: Mapping[str, str]) -> None:
    """The certificates must load now: at start-up, a bad one would fail far from its key."""
    if "sslrootcert" in params:
        try:
            ssl.create_default_context().load_verify_locations(cafile=params["sslrootcert"])
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(f"sslrootcert is not a PEM certificate bundle ({exc})") from None
    if "sslcert" in params:
        try:
            # An empty password, as asyncpg gives: an encrypted key cannot be used.
            ssl.create_default_context().load_cert_chain(
                params["sslcert"], params.get("sslkey"), password=""
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(
                f"sslcert and sslkey are not a certificate and its unencrypted key ({exc})"
            ) from None


def _path(base_dir: Path, text: str) -> Path:
    """A path from the file: `~` expanded, relative ones against the config file's folder.

    Raises ValueError (with a message for the user) for a path that cannot be one.
    """
    if "\0" in text:
        raise ValueError("a path cannot contain a NUL character")
    try:
        return base_dir / Path(text).expanduser()
    except RuntimeError:  # ~someone who does not exist
        raise ValueError(f"cannot expand {text.split('/', 1)[0]!r}: no such user") from None


def _api_token(table: _Table, base_dir: Path) -> str:
    """`api_token` or the contents of `api_token_file` (errors recorded on the table)."""
    token = table.get("api_token", "", _str)
    token_file = table.get("api_token_file", "", _str)
    if token and token_file:
        table.error("api_token_file", "set api_token or api_token_file, not both")
    elif token_file:
        try:
            token = _read_secret_text(_path(base_dir, token_file))
        except ValueError as exc:
            table.error("api_token_file", f"cannot read {token_file!r}: {exc}")
        else:
            if not token:
                table.error("api_token_file", f"{token_file!r} is empty")
    if token and not API_TOKEN.fullmatch(token):
        # Clients send it in a header: what a header cannot carry as is would lock them out.
        table.error(
            "api_token_file" if token_file else "api_token",
            "use printable ASCII without spaces or line breaks (it is sent in a header)",
        )
    return token


def _check_ca_file(table: _Table, ca_file: Path) -> None:
    """The bundle must load now: at start-up, a bad one would fail far from its key."""
    try:
        found = ca_file.is_file()
    except OSError as exc:  # a name too long for the file system, say
        table.error("ca_file", f"cannot use {str(ca_file)[:80]!r}: {exc.strerror}")
        return
    if not found:
        table.error("ca_file", f"no such file: {table.raw['ca_file']!r}")
        return
    try:
        ssl.create_default_context().load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        table.error("ca_file", f"{table.raw['ca_file']!r} is not a PEM certificate bundle ({exc})")


def _read_secret_text(path: Path) -> str:
    """A token or secret file's contents, stripped; ValueError with a reason otherwise."""
    return _read_file_text(path).strip()


def _read_file_text(path: Path) -> str:
    """A secret file's contents as they are; ValueError with a reason otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None


def _catalogue(table: _Table) -> Catalogue:
    def custom(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ValueError("expected a list of event type names")
        for event in value:
            if not isinstance(event, str) or not EVENT_NAME.fullmatch(event):
                raise ValueError(f"{event!r} is not an event name (A-Z, 0-9, _; 1 to 64)")
            if Catalogue().is_known(event):
                raise ValueError(f"{event} is already a built-in event type")
        return tuple(dict.fromkeys(value))

    catalogue = Catalogue(custom=table.get("custom", (), custom))
    table.finish(EVENTS_KEYS)
    return catalogue


def _delivery(table: _Table, base: DeliveryOptions, *, only_known: bool = True) -> DeliveryOptions:
    """Delivery options from `table`, starting from `base`. Reads only [delivery] keys."""
    values: dict[str, Any] = {}
    converters: dict[str, Callable[[Any], Any]] = {
        "batch_size": _int(1, 1000),
        "batch_window": _number(0, 10),
        "batch_timeout": _number(0, 600, low_open=True),
        "timeout": _number(0, 600, low_open=True),
        "retry_base": _number(0, 86400 * 7, low_open=True),
        "retry_doublings": _int(0, 30),
        "retry_after_doublings": _number(0, 86400 * 30, low_open=True),
        "success_statuses": _statuses,
        "recent_failures": _int(0, 1000),
        "history_retention": _duration(0, 86400 * 3650),
        "history_payloads": _bool,
    }
    for key, convert in converters.items():
        values[key] = table.get(key, getattr(base, key), convert)
    if only_known:
        table.finish(DELIVERY_KEYS)
    return DeliveryOptions(**values)


def parse_tenant(
    name: str, table: _Table, ctx: _Context, *, origin: Path, from_api: bool
) -> TenantConfig | None:
    """Validate one tenant table; None (with errors recorded) when it is invalid."""
    errors_before = len(ctx.errors)
    endpoint = table.get("endpoint", "", endpoint_url)
    if not table.has("endpoint"):
        table.error("endpoint", "required (the URL webhooks are sent to)")

    events = _events(table, ctx, from_api=from_api)
    secret, secret_ref = _secret(table, ctx)

    signing = table.get("signing_secret", "", _signing_secret)
    tenant = TenantConfig(
        name=name,
        endpoint=endpoint,
        events=events,
        subscribed=frozenset(),
        secret=Secret(secret),
        secret_ref=secret_ref,
        enabled=table.get("enabled", True, _bool),
        batching=table.get("batching", False, _bool),
        authorization_header=table.get("authorization_header", True, _bool),
        signing_secret=Secret(signing),
        source_address=table.get("source_address", "", _ip_or_empty),
        proxy=_tenant_proxy(table, ctx, from_api=from_api),
        delivery=_delivery(table, ctx.delivery, only_known=False),
        overrides=tuple(k for k in DELIVERY_KEYS if k in table.raw),
        origin=origin,
        from_api=from_api,
    )
    table.finish(TENANT_TABLE_KEYS)
    if len(ctx.errors) > errors_before:
        return None
    subscribed = ctx.catalogue.resolve(events)
    return replace(tenant, subscribed=subscribed)


def _tenant_proxy(table: _Table, ctx: _Context, *, from_api: bool) -> ProxyConfig | None:
    if from_api:
        for key in PROXY_KEYS:
            if table.has(key):
                # A proxy is an address the private-address rule does not check: only the
                # configuration file, never the tenant API, chooses one.
                table.seen.add(key)
                table.error(
                    key, "set in the configuration file only (the API's tenants use [daemon] proxy)"
                )
        return None
    return _proxy(table, ctx.base_dir, tenant=True)


def _signing_secret(value: Any) -> str:
    text = _str(value)
    if text and not SIGNING_SECRET.fullmatch(text):
        raise ValueError("expected whsec_ followed by a base64 key (Standard Webhooks)")
    if text:
        try:
            key = base64.b64decode(text.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            raise ValueError("the part after whsec_ is not valid base64") from None
        if len(key) < 16:
            raise ValueError("the key is too short (at least 16 bytes after base64 decoding)")
    return text


def _events(table: _Table, ctx: _Context, *, from_api: bool) -> tuple[str, ...]:
    if not table.has("events"):
        table.error("events", 'required (a list of event types, or ["*"])')
        return ()

    def convert(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise ValueError('expected a non-empty list of event types, or ["*"]')
        for event in value:
            if not isinstance(event, str):
                raise ValueError("expected event type names (strings)")
            if event != ALL_EVENTS and not ctx.catalogue.is_known(event):
                hint = ctx.catalogue.unknown_hint(event) or " (add it to [events] custom?)"
                raise ValueError(f"unknown event type {event!r}{hint}")
        return tuple(dict.fromkeys(value))

    nothing: tuple[str, ...] = ()
    events = table.get("events", nothing, convert)
    deprecated = [e for e in events if ctx.catalogue.is_deprecated(e)]
    if deprecated and from_api:
        modern, refused = ctx.catalogue.modernise(events)
        if refused:
            table.error("events", "deprecated event types cannot be chosen: " + ", ".join(refused))
        elif "COLLECTED_DATA_UPDATED" in events:
            ctx.warnings.append(
                f"{table.source}: {table.key('events')}: COLLECTED_DATA_UPDATED is deprecated; "
                "subscribed to COLLECTED_DATA_CHANGED instead"
            )
        return tuple(modern)
    for event in deprecated:
        replacement = "COLLECTED_DATA_CHANGED" if event == "COLLECTED_DATA_UPDATED" else None
        hint = f"; use {replacement}" if replacement else ""
        ctx.warnings.append(f"{table.source}: {table.key('events')}: {event} is deprecated{hint}")
    return events


def _secret(table: _Table, ctx: _Context) -> tuple[str, SecretRef]:
    secret, ref = _secret_value(table, ctx)
    if CONTROL_CHARACTERS.search(secret):
        # It travels in the Authorization header, where a line break would end the header.
        table.error(ref.kind, "contains a control character (a line break?); not allowed")
    elif secret != secret.strip(" \t"):
        # HTTP parsers drop a header value's outer whitespace: the receiver would read
        # another secret in Authorization than the one in the body.
        table.error(ref.kind, "starts or ends with a space or tab; not allowed")
    return secret, ref


def _secret_value(table: _Table, ctx: _Context) -> tuple[str, SecretRef]:
    given = [k for k in ("secret", "secret_file", "secret_env") if table.has(k)]
    for key in ("secret", "secret_file", "secret_env"):
        table.seen.add(key)
    if len(given) != 1:
        table.error(
            "secret",
            "set exactly one of secret, secret_file, secret_env"
            + (f" (found {', '.join(given)})" if given else ""),
        )
        return "", SecretRef("secret")
    key = given[0]
    value = table.raw[key]
    if not isinstance(value, str) or not value:
        table.error(key, "expected a non-empty string")
        return "", SecretRef("secret")
    if key == "secret":
        return value, SecretRef("secret")
    if key == "secret_env":
        secret = ctx.environ.get(value, "")
        if not secret:
            table.error(key, f"environment variable {value} is not set or empty")
        return secret, SecretRef("secret_env", value)
    try:
        path = _path(ctx.base_dir, value)
        secret = _read_secret_text(path)
    except (ValueError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        table.error(key, f"cannot read {value!r}: {reason}")
        return "", SecretRef("secret_file", value)
    if not secret:
        table.error(key, f"{value!r} is empty")
    # Who else can read it, and whether the service user can, is webhookd.checks' question.
    return secret, SecretRef("secret_file", value)


def _load_tenants_dir(directory: Path, ctx: _Context) -> list[tuple[str, TenantConfig]]:
    tenants: list[tuple[str, TenantConfig]] = []
    main_file = Path(ctx.source).resolve()
    for file in sorted(directory.glob("*.toml")):
        if file.name.startswith("."):
            continue  # an editor's lock or backup file (.#acme.toml), not a tenant
        if file.resolve() == main_file:
            continue  # tenants_dir is the main file's own folder
        name = file.stem
        source = os.fspath(file)
        if not TENANT_NAME.fullmatch(name):
            ctx.errors.append(f"{source}: the file name is not a valid tenant name")
            continue
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            ctx.errors.append(f"{source}: cannot read: {exc}")
            continue
        except tomllib.TOMLDecodeError as exc:
            ctx.errors.append(f"{source}: not valid TOML: {exc}")
            continue
        tenant_ctx = _Context(
            source, ctx.base_dir, ctx.catalogue, ctx.delivery, ctx.errors, ctx.warnings, ctx.environ
        )
        table = _Table(source, "", raw, ctx.errors)
        tenant = parse_tenant(name, table, tenant_ctx, origin=file.resolve(), from_api=True)
        if tenant is not None:
            tenants.append((source, tenant))
    return tenants


# ---------------------------------------------------------------------------------------------
# Tenants made through the API: validated like the file, written to tenants_dir


def parse_api_tenant(
    name: str,
    raw: Any,
    config: Config,
    *,
    source: str,
    environ: Mapping[str, str] | None = None,
    origin: Path | None = None,
) -> tuple[TenantConfig, list[str]]:
    """Validate a tenant table sent to the API (or CLI); raises ConfigError with key paths.

    Deprecated event types are refused, except COLLECTED_DATA_UPDATED, which becomes
    COLLECTED_DATA_CHANGED. Returns the tenant and any warnings. `origin` is where it is
    stored: `tenants_dir/NAME.toml` unless given (on PostgreSQL, `api_tenant_origin`).
    """
    if not TENANT_NAME.fullmatch(name):
        raise ConfigError([f"{source}: tenant names are 1 to 64 of A-Z a-z 0-9 _ -"])
    errors: list[str] = []
    warnings: list[str] = []
    if origin is None:
        assert config.daemon.tenants_dir is not None
        origin = (config.daemon.tenants_dir / f"{name}.toml").resolve()
    ctx = _Context(
        source,
        config.path.resolve().parent,
        config.catalogue,
        config.delivery,
        errors,
        warnings,
        os.environ if environ is None else environ,
    )
    table = _Table(source, "", raw, errors)
    tenant = parse_tenant(name, table, ctx, origin=origin, from_api=True)
    if errors or tenant is None:
        raise ConfigError(errors or [f"{source}: invalid tenant"])
    return tenant, warnings


def tenant_table(tenant: TenantConfig, *, redact: bool) -> dict[str, Any]:
    """The tenant as a TOML table (as written in a tenants_dir file), secrets optionally masked."""
    table: dict[str, Any] = {
        "enabled": tenant.enabled,
        "batching": tenant.batching,
        "endpoint": tenant.endpoint,
    }
    ref = tenant.secret_ref
    if ref.kind == "secret":
        table["secret"] = "***" if redact else tenant.secret.reveal()
    else:
        table[ref.kind] = ref.where
    table["events"] = list(tenant.events)
    table["authorization_header"] = tenant.authorization_header
    if tenant.signing_secret:
        table["signing_secret"] = "***" if redact else tenant.signing_secret.reveal()
    if tenant.source_address:
        table["source_address"] = tenant.source_address
    if tenant.proxy is not None:
        table["proxy"] = tenant.proxy.url
        if tenant.proxy.password_file is not None:
            table["proxy_password_file"] = os.fspath(tenant.proxy.password_file)
        if tenant.proxy.checks_addresses:
            table["proxy_checks_addresses"] = True
    for key in tenant.overrides:
        value = getattr(tenant.delivery, key)
        table[key] = list(value) if isinstance(value, tuple) else value
    return table


def api_tenant_origin(name: str) -> Path:
    """Where an API tenant stored in the database (PostgreSQL) is said to be, in errors and
    findings: `api_tenants/NAME` (the table, and the tenant's row in it)."""
    return Path("api_tenants") / name


def tenant_toml(table: Mapping[str, Any]) -> str:
    """A tenant table as the TOML text a tenants_dir file holds (without its header line),
    as the database stores it on PostgreSQL."""
    import tomli_w

    return tomli_w.dumps(dict(table))


def parse_stored_tenant(
    name: str, text: str, config: Config, *, environ: Mapping[str, str] | None = None
) -> tuple[TenantConfig, list[str]]:
    """An API tenant as the database stores it (TOML text), validated against this
    instance's configuration (catalogue, [delivery] defaults, secret files and variables).
    Raises ConfigError, each error naming `api_tenants.NAME` and the key."""
    source = f"api_tenants.{name}"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    return parse_api_tenant(
        name, raw, config, source=source, environ=environ, origin=api_tenant_origin(name)
    )


def write_tenant_file(directory: Path, name: str, table: Mapping[str, Any]) -> Path:
    """Write `directory/name.toml` atomically (temp file, fsync, rename) with mode 0600."""
    import tomli_w

    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{name}.toml"
    temporary = directory / f".{name}.toml.tmp"
    text = (
        f"# Tenant {name}, written by the webhookd tenant API. It may hold a secret: mode 0600.\n"
        + tomli_w.dumps(dict(table))
    )
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover temporary file keeps its mode through O_CREAT
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, target)
    _fsync_dir(directory)
    return target


def remove_tenant_file(directory: Path, name: str) -> None:
    (directory / f"{name}.toml").unlink(missing_ok=True)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The main file's tenants as one digest: several instances on one database compare theirs

# Fixed and public: the digest must be the same on every instance for the same tenants. The
# secrets enter it only through PBKDF2 over all of them at once, so the digest (in the
# `instances` table, readable by whoever reads the database) gives no usable way to test a
# guessed secret.
DIGEST_SALT = b"webhookd tenants digest v1"
DIGEST_ITERATIONS = 100_000


def tenants_digest(config: Config) -> str:
    """A digest of the main file's tenants as they deliver: endpoint, events (and what they
    resolve to), flags, effective delivery settings and secrets. Left out: tenants made
    through the API (shared through the database), where a secret is read from (a path or
    variable may differ per host, its value may not) and `source_address` (an address of
    the host). Hex SHA-256; takes about 0.1 s (run it in a thread)."""
    public: list[dict[str, Any]] = []
    secrets: list[list[str]] = []
    for name, tenant in sorted(config.tenants.items()):
        if tenant.from_api:
            continue
        public.append(
            {
                "tenant": name,
                "endpoint": tenant.endpoint,
                "events": list(tenant.events),
                "subscribed": sorted(tenant.subscribed),
                "enabled": tenant.enabled,
                "batching": tenant.batching,
                "authorization_header": tenant.authorization_header,
                "delivery": {
                    key: list(value) if isinstance(value, tuple) else value
                    for key, value in vars(tenant.delivery).items()
                },
            }
        )
        secrets.append([name, tenant.secret.reveal(), tenant.signing_secret.reveal()])
    canonical = json.dumps(public, sort_keys=True, separators=(",", ":")).encode()
    sealed = hashlib.pbkdf2_hmac(
        "sha256",
        json.dumps(secrets, separators=(",", ":")).encode(),
        DIGEST_SALT,
        DIGEST_ITERATIONS,
    )
    return hashlib.sha256(canonical + b"\0" + sealed).hexdigest()
