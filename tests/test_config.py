"""config.load on real TOML files: defaults, overrides, paths, secrets, tenants_dir, and the
exact error line for each kind of mistake (file as given, key path, what was expected)."""

from __future__ import annotations

import base64
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme

from webhookd.config import ConfigError, PostgresURL, ProxyConfig, Secret, SecretRef, load
from webhookd.events import CURRENT

ENDPOINT = "https://hooks.acme.example/passfort"

# The tenant keys every test starts from, as TOML literals; a test changes or drops some.
ACME = {"endpoint": f'"{ENDPOINT}"', "secret": '"s3cr3t"', "events": '["*"]'}


def acme(name: str = "acme", **changes: str | None) -> str:
    """A `[tenants.NAME]` table; each change is a TOML literal, or None to leave the key out."""
    keys = {**ACME, **changes}
    lines = [f"{key} = {value}" for key, value in keys.items() if value is not None]
    return f"[tenants.{name}]\n" + "\n".join(lines) + "\n"


# A real certificate: ca_file must load as a bundle.
CA_PEM = trustme.CA().cert_pem.bytes().decode()


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def errors_of(path: str | Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path, environ)
    return caught.value.errors


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work from tmp_path, so a config named `config.toml` is given as just that."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- what a valid file gives ---------------------------------------------------------------------


def test_minimal_config_and_every_default(here: Path) -> None:
    write(here / "config.toml", acme())
    config = load("config.toml", environ={})
    base = here.resolve()

    assert config.path == Path("config.toml")
    assert config.warnings == ()
    d = config.daemon
    assert d.database == base / "webhookd.db"
    assert (d.listen_host, d.listen_port, d.listen) == ("127.0.0.1", 8787, "127.0.0.1:8787")
    assert d.api_token.reveal() == ""
    assert d.tenants_dir == base / "tenants.d"
    assert d.log_format == "auto"
    assert d.log_level == "info"
    assert d.durability == "full"
    assert d.max_connections == 1000
    assert d.source_address == ""
    assert d.allow_private_endpoints is False
    assert d.shutdown_grace == 10.0
    assert d.max_body_bytes == 10485760
    assert d.ca_file is None

    assert config.catalogue.custom == ()
    o = config.delivery
    assert o.batch_size == 100
    assert o.batch_window == 10.0
    assert o.batch_timeout == 5.0
    assert o.timeout == 10.0
    assert o.retry_base == 30.0
    assert o.retry_doublings == 12
    assert o.retry_after_doublings == 86400.0
    assert o.success_statuses == (200,)
    assert o.recent_failures == 10

    assert list(config.tenants) == ["acme"]
    t = config.tenants["acme"]
    assert t.name == "acme"
    assert t.endpoint == ENDPOINT
    assert t.events == ("*",)
    assert t.subscribed == frozenset(CURRENT)
    assert t.secret.reveal() == "s3cr3t"
    assert t.secret_ref == SecretRef("secret")
    assert t.enabled is True
    assert t.batching is False
    assert t.authorization_header is True
    assert t.signing_secret.reveal() == ""
    assert t.source_address == ""
    assert t.delivery == o
    assert t.overrides == ()
    assert t.origin == base / "config.toml"
    assert t.from_api is False


def test_an_empty_file_is_a_daemon_without_tenants(here: Path) -> None:
    write(here / "config.toml", "")
    config = load("config.toml", environ={})
    assert config.tenants == {}
    assert config.daemon.listen == "127.0.0.1:8787"


def test_every_key_set(here: Path) -> None:
    write(here / "ca.pem", CA_PEM)
    signing = "whsec_" + base64.b64encode(b"k" * 24).decode()
    write(
        here / "config.toml",
        f"""
        [daemon]
        database = "/var/lib/webhookd/queue.db"
        listen = "[::1]:9000"
        api_token = "tok"
        tenants_dir = "tenants"
        log_format = "json"
        log_level = "debug"
        durability = "normal"
        max_connections = 50
        source_address = "192.0.2.7"
        allow_private_endpoints = true
        shutdown_grace = 2
        max_body_bytes = 2048
        ca_file = "ca.pem"

        [events]
        custom = ["INVOICE_PAID", "INVOICE_PAID", "INVOICE_VOIDED"]

        [tenants.acme]
        enabled = false
        batching = true
        endpoint = "http://hooks.acme.example:8080/in?x=1"
        secret = "s3cr3t"
        events = ["CHECK_COMPLETED", "INVOICE_PAID", "CHECK_COMPLETED"]
        authorization_header = false
        signing_secret = "{signing}"
        source_address = "2001:db8::1"
        """,
    )
    config = load("config.toml", environ={})
    base = here.resolve()
    d = config.daemon
    assert d.database == Path("/var/lib/webhookd/queue.db")
    assert (d.listen_host, d.listen_port, d.listen) == ("::1", 9000, "[::1]:9000")
    assert d.api_token.reveal() == "tok"
    assert d.tenants_dir == base / "tenants"
    assert (d.log_format, d.log_level, d.durability) == ("json", "debug", "normal")
    assert d.max_connections == 50
    assert d.source_address == "192.0.2.7"
    assert d.allow_private_endpoints is True
    assert d.shutdown_grace == 2.0
    assert isinstance(d.shutdown_grace, float)
    assert d.max_body_bytes == 2048
    assert d.ca_file == base / "ca.pem"
    assert config.catalogue.custom == ("INVOICE_PAID", "INVOICE_VOIDED")
    t = config.tenants["acme"]
    assert (t.enabled, t.batching, t.authorization_header) == (False, True, False)
    assert t.endpoint == "http://hooks.acme.example:8080/in?x=1"
    assert t.events == ("CHECK_COMPLETED", "INVOICE_PAID")
    assert t.subscribed == {"CHECK_COMPLETED", "INVOICE_PAID"}
    assert t.signing_secret.reveal() == signing
    assert t.source_address == "2001:db8::1"


def test_tenants_are_sorted_by_name(here: Path) -> None:
    write(here / "config.toml", acme("zeta") + acme("Alpha") + acme("mid_1-x"))
    assert list(load("config.toml", environ={}).tenants) == ["Alpha", "mid_1-x", "zeta"]


def test_per_tenant_delivery_overrides(here: Path) -> None:
    write(
        here / "config.toml",
        """
        [delivery]
        batch_size = 50
        retry_base = 5
        """
        + acme(batch_window="2", success_statuses="[204, 200, 202, 200]", retry_doublings="3")
        + acme("beta"),
    )
    config = load("config.toml", environ={})
    assert config.delivery.batch_size == 50
    assert config.delivery.retry_base == 5.0
    assert config.delivery.batch_window == 10.0

    a = config.tenants["acme"].delivery
    assert a.batch_window == 2.0
    assert isinstance(a.batch_window, float)
    assert a.success_statuses == (200, 202, 204)
    assert a.retry_doublings == 3
    # Not overridden: the [delivery] value, not the built-in default.
    assert a.batch_size == 50
    assert a.retry_base == 5.0
    assert a.timeout == 10.0
    assert config.tenants["acme"].overrides == (
        "batch_window",
        "retry_doublings",
        "success_statuses",
    )
    assert config.tenants["beta"].delivery == config.delivery
    assert config.tenants["beta"].overrides == ()


def test_relative_paths_resolve_against_the_config_folder(here: Path) -> None:
    etc = here / "etc"
    write(etc / "acme.secret", "from-file\n")
    write(etc / "api.token", "tok-from-file\n")
    write(etc / "ca.pem", CA_PEM)
    write(
        etc / "config.toml",
        """
        [daemon]
        database = "data/webhookd.db"
        tenants_dir = "tenants.d"
        api_token_file = "api.token"
        ca_file = "ca.pem"
        """
        + acme(secret=None, secret_file='"acme.secret"'),
    )
    # Given relative to the working directory, which is not the config's folder.
    config = load("etc/config.toml", environ={})
    base = etc.resolve()
    assert config.daemon.database == base / "data" / "webhookd.db"
    assert config.daemon.tenants_dir == base / "tenants.d"
    assert config.daemon.ca_file == base / "ca.pem"
    assert config.daemon.api_token.reveal() == "tok-from-file"
    assert config.tenants["acme"].secret.reveal() == "from-file"
    assert config.tenants["acme"].origin == base / "config.toml"


# -- secrets -------------------------------------------------------------------------------------


def test_secret_inline(here: Path) -> None:
    write(here / "config.toml", acme(secret='"inline"'))
    tenant = load("config.toml", environ={}).tenants["acme"]
    assert tenant.secret.reveal() == "inline"
    assert tenant.secret_ref == SecretRef("secret", "")


def test_secret_file(here: Path) -> None:
    write(here / "acme.secret", "  from-file  \n", mode=0o600)
    write(here / "config.toml", acme(secret=None, secret_file='"acme.secret"'))
    config = load("config.toml", environ={})
    tenant = config.tenants["acme"]
    assert tenant.secret.reveal() == "from-file"
    assert tenant.secret_ref == SecretRef("secret_file", "acme.secret")
    assert config.warnings == ()


def test_secret_env(here: Path) -> None:
    write(here / "config.toml", acme(secret=None, secret_env='"ACME_SECRET"'))
    tenant = load("config.toml", environ={"ACME_SECRET": "from-env"}).tenants["acme"]
    assert tenant.secret.reveal() == "from-env"
    assert tenant.secret_ref == SecretRef("secret_env", "ACME_SECRET")


@pytest.mark.parametrize(
    ("keys", "environ", "key"),
    [
        ({"secret": '"line\\nbreak"'}, {}, "secret"),
        ({"secret": '"nul\\u0000"'}, {}, "secret"),
        ({"secret": None, "secret_env": '"ACME_SECRET"'}, {"ACME_SECRET": "a\rb"}, "secret_env"),
        ({"secret": None, "secret_file": '"acme.secret"'}, {}, "secret_file"),
    ],
    ids=["inline-newline", "inline-nul", "env-cr", "file-two-lines"],
)
def test_secret_with_a_control_character_is_refused_without_showing_it(
    here: Path, keys: dict[str, Any], environ: dict[str, str], key: str
) -> None:
    # The secret is sent as a header value: a line break would end the header early.
    write(here / "acme.secret", "first\nsecond\n")
    write(here / "config.toml", acme(**keys))
    assert errors_of("config.toml", environ=environ) == [
        f"config.toml: tenants.acme.{key}: contains a control character (a line break?); "
        "not allowed"
    ]


@pytest.mark.parametrize(
    ("keys", "environ", "key"),
    [
        ({"secret": '"s3cr3t "'}, {}, "secret"),
        ({"secret": '"\ts3cr3t"'}, {}, "secret"),
        ({"secret": None, "secret_env": '"ACME_SECRET"'}, {"ACME_SECRET": "s3cr3t "}, "secret_env"),
    ],
    ids=["inline-trailing-space", "inline-leading-tab", "env-trailing-space"],
)
def test_secret_with_outer_whitespace_is_refused(
    here: Path, keys: dict[str, Any], environ: dict[str, str], key: str
) -> None:
    # HTTP parsers drop a header value's outer whitespace: Authorization would differ.
    write(here / "config.toml", acme(**keys))
    assert errors_of("config.toml", environ=environ) == [
        f"config.toml: tenants.acme.{key}: starts or ends with a space or tab; not allowed"
    ]


def test_secret_may_hold_spaces_tabs_and_any_printable_text(here: Path) -> None:
    write(here / "config.toml", acme(secret='"a b\\tc é ✓ \\"q\\""'))
    assert load("config.toml", environ={}).tenants["acme"].secret.reveal() == 'a b\tc é ✓ "q"'


def test_secret_env_defaults_to_the_process_environment(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBHOOKD_TEST_ACME_SECRET", "from-os-environ")
    write(here / "config.toml", acme(secret=None, secret_env='"WEBHOOKD_TEST_ACME_SECRET"'))
    assert load("config.toml").tenants["acme"].secret.reveal() == "from-os-environ"


def test_api_token_file(here: Path) -> None:
    write(here / "api.token", "\n  tok  \n")
    write(here / "config.toml", '[daemon]\napi_token_file = "api.token"\nlisten = "0.0.0.0:1"\n')
    config = load("config.toml", environ={})
    assert config.daemon.api_token.reveal() == "tok"
    assert config.daemon.listen_host == "0.0.0.0"


@pytest.mark.parametrize("listen", ["127.0.0.1:8787", "127.0.0.2:1", "localhost:80", "[::1]:0"])
def test_loopback_listen_needs_no_token(here: Path, listen: str) -> None:
    write(here / "config.toml", f'[daemon]\nlisten = "{listen}"\n')
    assert load("config.toml", environ={}).daemon.api_token.reveal() == ""


@pytest.mark.parametrize("listen", ["0.0.0.0:8787", "[::]:8787", "192.0.2.1:8787"])
def test_non_loopback_listen_with_a_token(here: Path, listen: str) -> None:
    write(here / "config.toml", f'[daemon]\nlisten = "{listen}"\napi_token = "tok"\n')
    assert load("config.toml", environ={}).daemon.api_token.reveal() == "tok"


@pytest.mark.parametrize(("listen", "host"), [("0.0.0.0:8787", "0.0.0.0"), ("[::]:1", "::")])
def test_non_loopback_listen_without_a_token_is_an_error(
    here: Path, listen: str, host: str
) -> None:
    write(here / "config.toml", f'[daemon]\nlisten = "{listen}"\n')
    assert errors_of("config.toml", environ={}) == [
        f"config.toml: daemon.listen: {host} is not a loopback address: set api_token "
        "(or api_token_file) so the API is not open to the network"
    ]


@pytest.mark.parametrize(
    ("daemon", "expected"),
    [
        ('listen = "10.0.0.5:8787"\napi_token = "t"', "http://10.0.0.5:8787"),
        ('listen = "[fd00::5]:8787"\napi_token = "t"', "http://[fd00::5]:8787"),
        ('listen = "0.0.0.0:9000"\napi_token = "t"', f"http://{socket.gethostname()}:9000"),
        (
            'advertise_url = "https://node-a.internal:8443/webhookd/"',
            "https://node-a.internal:8443/webhookd",
        ),
    ],
)
def test_the_api_url_other_instances_reach(here: Path, daemon: str, expected: str) -> None:
    write(here / "config.toml", f"[daemon]\n{daemon}\n")
    assert load("config.toml", environ={}).daemon.api_url == expected


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (
            "ftp://node-a:8787",
            "expected an http(s) URL such as http://10.0.0.5:8787, got 'ftp://node-a:8787'",
        ),
        ("node-a:8787", "expected an http(s) URL such as http://10.0.0.5:8787, got 'node-a:8787'"),
        (
            "http://0.0.0.0:8787",
            "0.0.0.0 is every address, not one to call back; name this machine as the "
            "other instances reach it",
        ),
        ("http://u:p@node-a:8787", "credentials in the URL are not allowed; the API token is sent"),
        (
            "http://node-a:8787/?x=1",
            "a query or fragment cannot be part of the API's address; remove it",
        ),
    ],
)
def test_a_bad_advertise_url_names_file_and_key(here: Path, value: str, error: str) -> None:
    write(here / "config.toml", f'[daemon]\nadvertise_url = "{value}"\n')
    assert errors_of("config.toml", environ={}) == [f"config.toml: daemon.advertise_url: {error}"]


def test_secrets_never_shown(here: Path) -> None:
    signing = "whsec_" + base64.b64encode(b"SIGNING-KEY-0123456789").decode()
    write(here / "beta.secret", "FILE-SECRET-3\n")
    write(
        here / "config.toml",
        """
        [daemon]
        api_token = "API-TOKEN-1"
        """
        + acme(secret='"INLINE-SECRET-2"', signing_secret=f'"{signing}"')
        + acme("beta", secret=None, secret_file='"beta.secret"')
        + acme("gamma", secret=None, secret_env='"GAMMA"'),
    )
    secrets = ["API-TOKEN-1", "INLINE-SECRET-2", "FILE-SECRET-3", "ENV-SECRET-4", signing]
    config = load("config.toml", environ={"GAMMA": "ENV-SECRET-4"})
    assert config.tenants["acme"].signing_secret.reveal() == signing
    shown = [repr(config), str(config)] + [repr(t) for t in config.tenants.values()]
    shown += [f"{t.secret} {t.signing_secret}" for t in config.tenants.values()]
    shown.append(f"{config.daemon.api_token}")
    for text in shown:
        for secret in secrets:
            assert secret not in text
    assert "Secret('***')" in repr(config.tenants["acme"])


def test_secrets_never_in_errors(here: Path) -> None:
    write(here / "empty.secret", "")
    write(
        here / "config.toml",
        """
        [daemon]
        api_token = "API-TOKEN-1"
        api_token_file = "API-TOKEN-2"
        """
        + acme(secret='"INLINE-SECRET-3"', secret_env='"GAMMA"')
        + acme("beta", secret='["LIST-SECRET-5"]')
        + acme("gamma", signing_secret='"whsec_SIGNING!SECRET"')
        + acme("delta", signing_secret='"whsec_U0hPUlQ="')
        + acme("eps", secret='"INLINE-SECRET-6"', endpoint='"ftp://x"', colour='"INLINE"')
        + acme("zeta", secret=None, secret_file='"empty.secret"'),
    )
    with pytest.raises(ConfigError) as caught:
        load("config.toml", environ={"GAMMA": "ENV-SECRET-4"})
    text = str(caught.value)
    assert caught.value.errors == [
        "config.toml: daemon.api_token_file: set api_token or api_token_file, not both",
        "config.toml: tenants.acme.secret: set exactly one of secret, secret_file, secret_env "
        "(found secret, secret_env)",
        "config.toml: tenants.beta.secret: expected a non-empty string",
        "config.toml: tenants.gamma.signing_secret: expected whsec_ followed by a base64 key "
        "(Standard Webhooks)",
        "config.toml: tenants.delta.signing_secret: the key is too short "
        "(at least 16 bytes after base64 decoding)",
        "config.toml: tenants.eps.endpoint: not an http(s) URL",
        "config.toml: tenants.eps.colour: unknown key",
        "config.toml: tenants.zeta.secret_file: 'empty.secret' is empty",
    ]
    assert text == "\n".join(caught.value.errors)
    secrets = ["API-TOKEN-1", "INLINE-SECRET-3", "ENV-SECRET-4", "LIST-SECRET-5"]
    secrets += ["SIGNING!SECRET", "U0hPUlQ=", "INLINE-SECRET-6"]
    for secret in secrets:
        assert secret not in text


# -- the database: a SQLite file, or a PostgreSQL URL with its password kept apart ---------------

PASSWORD_ENV = "WEBHOOKD_DATABASE_PASSWORD"


def database(url: str, **daemon: str) -> str:
    """A [daemon] table with `database = url` and more keys (TOML literals)."""
    lines = [f'database = "{url}"', *(f"{key} = {value}" for key, value in daemon.items())]
    return "[daemon]\n" + "\n".join(lines) + "\n"


def test_database_is_a_sqlite_path_or_a_postgresql_url(here: Path) -> None:
    """A path is SQLite, as before; a postgresql:// (or postgres://) URL is PostgreSQL. The
    URL is kept as asyncpg reads it: the scheme spelled out, the user and database name
    percent-encoded once, the query's file paths resolved against the config's folder."""
    write(here / "certs" / "ca.pem", CA_PEM)
    cases: dict[str, Path | str] = {
        "data/queue.db": here.resolve() / "data" / "queue.db",
        "postgres://webhookd@db.internal:6543/webhooks": "postgresql://webhookd@db.internal:6543/webhooks",
        "postgresql://db.internal/webhooks": "postgresql://db.internal/webhooks",
        "postgresql://u@[2001:db8::5]:5432/webhooks": "postgresql://u@[2001:db8::5]:5432/webhooks",
        "postgresql://web%40hooks@db/web%20hooks": "postgresql://web%40hooks@db/web%20hooks",
        "postgresql://u@db/w?sslmode=verify-full&sslrootcert=certs/ca.pem": (
            f"postgresql://u@db/w?sslmode=verify-full&sslrootcert={here.resolve()}/certs/ca.pem"
        ),
        "postgresql://u@db/w?sslmode=disable": "postgresql://u@db/w?sslmode=disable",
    }
    for given, expected in cases.items():
        write(here / "config.toml", database(given))
        d = load("config.toml", environ={}).daemon
        if isinstance(expected, Path):
            assert d.database == expected
            continue
        assert d.database == PostgresURL(expected), given
        assert str(d.database) == expected
        assert d.database_password_file is None


def test_the_password_comes_from_the_url_a_file_or_the_environment(here: Path) -> None:
    """Wherever it comes from, the password is kept apart from the URL, which is what is
    shown. A file's final line break is not the password's; its spaces are."""
    write(here / "config.toml", database("postgresql://webhookd:p%40ss%2Fw0rd%3A@db/webhooks"))
    d = load("config.toml", environ={}).daemon
    assert d.database == PostgresURL("postgresql://webhookd@db/webhooks", Secret("p@ss/w0rd:"))
    # An @ left unencoded in the password still leaves the host alone.
    write(here / "config.toml", database("postgresql://webhookd:p@ss@db/webhooks"))
    d = load("config.toml", environ={}).daemon
    assert d.database == PostgresURL("postgresql://webhookd@db/webhooks", Secret("p@ss"))

    for content, password in (("  pass word \n", "  pass word "), ("crlf\r\n", "crlf")):
        write(here / "secrets" / "db.password", content)
        write(
            here / "config.toml",
            database(
                "postgresql://webhookd@db/webhooks", database_password_file='"secrets/db.password"'
            ),
        )
        d = load("config.toml", environ={}).daemon
        assert d.database == PostgresURL("postgresql://webhookd@db/webhooks", Secret(password))
        assert d.database_password_file == here.resolve() / "secrets" / "db.password"

    write(here / "config.toml", database("postgresql://webhookd@db/webhooks"))
    d = load("config.toml", environ={PASSWORD_ENV: "from-env"}).daemon
    assert d.database == PostgresURL("postgresql://webhookd@db/webhooks", Secret("from-env"))
    # No password at all: asyncpg's own sources (~/.pgpass, $PGPASSWORD) or none.
    assert load("config.toml", environ={}).daemon.database == PostgresURL(
        "postgresql://webhookd@db/webhooks"
    )


def test_the_database_password_is_set_in_one_place_only(here: Path) -> None:
    write(here / "db.password", "FILE-PASSWORD-2\n")
    url = "postgresql://webhookd:URL-PASSWORD-1@db/webhooks"
    env = {PASSWORD_ENV: "ENV-PASSWORD-3"}
    write(here / "config.toml", database(url))
    assert errors_of("config.toml", env) == [
        "config.toml: daemon.database: the password is set in 2 places (the URL, "
        "$WEBHOOKD_DATABASE_PASSWORD); keep one"
    ]
    write(here / "config.toml", database(url, database_password_file='"db.password"'))
    errors = errors_of("config.toml", env)
    assert errors == [
        "config.toml: daemon.database_password_file: the password is set in 3 places (the "
        "URL, database_password_file, $WEBHOOKD_DATABASE_PASSWORD); keep one"
    ]
    assert not any(s in str(errors) for s in ("PASSWORD-1", "PASSWORD-2", "PASSWORD-3"))


def test_a_database_password_file_must_hold_one_line(here: Path) -> None:
    write(here / "empty.password", "\n")
    write(here / "two.password", "FIRST-LINE-1\nSECOND-LINE-2\n")
    for name, expected in (
        ("empty.password", "'empty.password' is empty"),
        (
            "two.password",
            "'two.password' holds more than one line, or a control character; the password "
            "is the file's one line",
        ),
        ("none.password", "cannot read 'none.password': No such file or directory"),
    ):
        write(
            here / "config.toml",
            database("postgresql://db/webhooks", database_password_file=f'"{name}"'),
        )
        errors = errors_of("config.toml", {})
        assert errors == [f"config.toml: daemon.database_password_file: {expected}"]
        assert "LINE-" not in str(errors)


def test_a_sqlite_database_takes_no_password(here: Path) -> None:
    """database_password_file beside a path is a mistake; the variable may be set for other
    reasons (a shared environment file), and a SQLite file has no use for it."""
    write(here / "db.password", "pw\n")
    write(here / "config.toml", database("webhookd.db", database_password_file='"db.password"'))
    assert errors_of("config.toml", {}) == [
        "config.toml: daemon.database_password_file: only for a PostgreSQL database (database "
        "is a SQLite file's path)"
    ]
    write(here / "config.toml", database("webhookd.db"))
    d = load("config.toml", environ={PASSWORD_ENV: "pw"}).daemon
    assert d.database == here.resolve() / "webhookd.db"


def test_the_database_password_is_never_shown(here: Path) -> None:
    """Not by str() or repr() of the URL or the whole configuration, and not by any error
    about a URL that holds it, however the URL is broken."""
    write(here / "config.toml", database("postgresql://webhookd:URL-PASSWORD-1@db/webhooks"))
    config = load("config.toml", environ={})
    assert isinstance(config.daemon.database, PostgresURL)
    assert config.daemon.database.password.reveal() == "URL-PASSWORD-1"
    for text in (str(config.daemon.database), repr(config.daemon.database), repr(config)):
        assert "URL-PASSWORD-1" not in text
    assert "Secret('***')" in repr(config.daemon.database)

    broken = [
        "postgresql://u:URL-PASSWORD-1@db:port/w",
        "postgresql://u:URL-PASSWORD-1@/w",
        "postgresql://u:URL-PASSWORD-1@db",
        "postgresql://u:URL-PASSWORD-1@db/w?connect_timeout=5",
        "postgresql://u:URL-PASSWORD-1@db/w#f",
        "postgresql://u:URL/PASSWORD-1@db/w",
        "postgresql://u:1234/URL-PASSWORD-1@db/w",
        "postgresql://u:URL-PASSWORD-1@a,b/w",
        "postgresql://u:URL-PASSWORD-1@db/w?sslmode=URL-PASSWORD-1",
        "mysql://u:URL-PASSWORD-1@db/w",
    ]
    for url in broken:
        write(here / "config.toml", database(url))
        errors = errors_of("config.toml", {})
        assert len(errors) == 1 and errors[0].startswith("config.toml: daemon.database: "), errors
        if "sslmode=URL" not in url:  # a value the user typed into sslmode is shown back
            assert "PASSWORD-1" not in errors[0], url


def test_tls_files_in_the_url_must_load(here: Path) -> None:
    """As for ca_file: a CA that does not load would fail at start, far from its key."""
    write(here / "key.pem", "-----BEGIN PRIVATE KEY-----\nnot a cert\n")
    write(
        here / "config.toml", database("postgresql://db/w?sslmode=verify-full&sslrootcert=key.pem")
    )
    [error] = errors_of("config.toml", {})
    assert error.startswith(
        "config.toml: daemon.database: sslrootcert is not a PEM certificate bundle ("
    ), error

    client = trustme.CA().issue_cert("webhookd")
    client.cert_chain_pems[0].write_to_path(here / "client.crt")
    client.private_key_pem.write_to_path(here / "client.key")
    url = "postgresql://db/w?sslmode=require&sslcert=client.crt&sslkey=client.key"
    write(here / "config.toml", database(url))
    d = load("config.toml", environ={}).daemon
    assert d.database == PostgresURL(
        f"postgresql://db/w?sslmode=require&sslcert={here.resolve()}/client.crt"
        f"&sslkey={here.resolve()}/client.key"
    )
    write(here / "config.toml", database(url.replace("client.key", "key.pem")))
    [error] = errors_of("config.toml", {})
    assert error.startswith(
        "config.toml: daemon.database: sslcert and sslkey are not a certificate and its "
        "unencrypted key ("
    ), error


# -- tenants_dir ---------------------------------------------------------------------------------


TENANT_FILE = f'endpoint = "{ENDPOINT}"\nsecret = "s3cr3t"\n'


def test_tenants_dir_files_are_tenants(here: Path) -> None:
    write(here / "config.toml", acme())
    write(here / "tenants.d" / "beta.toml", TENANT_FILE + 'events = ["CHECK_COMPLETED"]\n')
    write(here / "tenants.d" / "gamma.toml", TENANT_FILE + 'events = ["*"]\nbatch_size = 5\n')
    write(here / "tenants.d" / "notes.txt", "not a tenant")
    config = load("config.toml", environ={})
    assert list(config.tenants) == ["acme", "beta", "gamma"]
    beta = config.tenants["beta"]
    assert beta.from_api is True
    assert beta.origin == (here / "tenants.d" / "beta.toml").resolve()
    assert beta.subscribed == {"CHECK_COMPLETED"}
    assert beta.secret.reveal() == "s3cr3t"
    assert config.tenants["gamma"].delivery.batch_size == 5
    assert config.tenants["gamma"].overrides == ("batch_size",)
    assert config.tenants["acme"].from_api is False


def test_missing_tenants_dir_is_fine(here: Path) -> None:
    write(here / "config.toml", '[daemon]\ntenants_dir = "nowhere"\n' + acme())
    config = load("config.toml", environ={})
    assert list(config.tenants) == ["acme"]
    assert config.daemon.tenants_dir == here.resolve() / "nowhere"


def test_empty_tenants_dir_setting_turns_it_off(here: Path) -> None:
    write(here / "config.toml", '[daemon]\ntenants_dir = ""\n')
    write(here / "tenants.d" / "beta.toml", TENANT_FILE + 'events = ["*"]\n')
    config = load("config.toml", environ={})
    assert config.daemon.tenants_dir is None
    assert config.tenants == {}


def test_tenant_in_both_places_is_an_error(here: Path) -> None:
    write(here / "config.toml", acme())
    file = write(here / "tenants.d" / "acme.toml", TENANT_FILE + 'events = ["*"]\n')
    assert errors_of("config.toml", environ={}) == [
        f"{file}: tenant 'acme' is also defined in config.toml (tenants.acme); remove one of them"
    ]


def test_hidden_files_in_tenants_dir_are_not_tenants(here: Path) -> None:
    """An editor's lock file (`.#acme.toml`) would otherwise block every reload."""
    write(here / "config.toml", "")
    write(here / "tenants.d" / "beta.toml", TENANT_FILE + 'events = ["*"]\n')
    write(here / "tenants.d" / ".#beta.toml", "user@host.1234:1700000000")
    assert list(load("config.toml", environ={}).tenants) == ["beta"]


def test_tenants_dir_may_be_the_config_files_own_folder(here: Path) -> None:
    """The main file is not read again as a tenant file named after it."""
    write(here / "webhookd.toml", '[daemon]\ntenants_dir = "."\n')
    write(here / "beta.toml", TENANT_FILE + 'events = ["*"]\n')
    assert list(load("webhookd.toml", environ={}).tenants) == ["beta"]


def test_tenants_dir_that_is_a_file_is_an_error(here: Path) -> None:
    write(here / "config.toml", '[daemon]\ntenants_dir = "tenants"\n')
    write(here / "tenants", "")
    assert errors_of("config.toml", environ={}) == [
        "config.toml: daemon.tenants_dir: 'tenants' is not a folder"
    ]


def test_tenants_dir_errors_name_the_tenant_file(here: Path) -> None:
    write(here / "config.toml", "")
    tenants = here.resolve() / "tenants.d"
    write(tenants / "beta.toml", TENANT_FILE + 'events = ["*"]\nbatch_window = 11\n')
    write(tenants / "bad name.toml", TENANT_FILE + 'events = ["*"]\n')
    write(tenants / "gamma.toml", "endpoint = \n")
    with pytest.raises(ConfigError) as caught:
        load("config.toml", environ={})
    try:
        tomllib.loads("endpoint = \n")
    except tomllib.TOMLDecodeError as exc:
        toml_error = str(exc)
    assert caught.value.errors == [
        f"{tenants}/bad name.toml: the file name is not a valid tenant name",
        f"{tenants}/beta.toml: batch_window: expected a number from 0 to 10, got 11",
        f"{tenants}/gamma.toml: not valid TOML: {toml_error}",
    ]


def test_deprecated_events_in_the_main_file_warn(here: Path) -> None:
    write(
        here / "config.toml",
        acme(events='["COLLECTED_DATA_UPDATED", "PROFILE_STATUS_CHANGED", "CHECK_COMPLETED"]'),
    )
    config = load("config.toml", environ={})
    tenant = config.tenants["acme"]
    # Still delivered as listed.
    assert tenant.events == ("COLLECTED_DATA_UPDATED", "PROFILE_STATUS_CHANGED", "CHECK_COMPLETED")
    assert tenant.subscribed == set(tenant.events)
    assert config.warnings == (
        "config.toml: tenants.acme.events: COLLECTED_DATA_UPDATED is deprecated; "
        "use COLLECTED_DATA_CHANGED",
        "config.toml: tenants.acme.events: PROFILE_STATUS_CHANGED is deprecated",
    )


def test_deprecated_events_in_a_tenants_dir_file_are_modernised(here: Path) -> None:
    write(here / "config.toml", "")
    write(
        here / "tenants.d" / "beta.toml",
        TENANT_FILE + 'events = ["COLLECTED_DATA_UPDATED", "CHECK_COMPLETED"]\n',
    )
    config = load("config.toml", environ={})
    beta = config.tenants["beta"]
    assert beta.events == ("COLLECTED_DATA_CHANGED", "CHECK_COMPLETED")
    assert beta.subscribed == {"COLLECTED_DATA_CHANGED", "CHECK_COMPLETED"}
    assert config.warnings == (
        f"{here / 'tenants.d' / 'beta.toml'}: events: COLLECTED_DATA_UPDATED is deprecated; "
        "subscribed to COLLECTED_DATA_CHANGED instead",
    )


def test_deprecated_events_without_replacement_in_a_tenants_dir_file(here: Path) -> None:
    write(here / "config.toml", "")
    file = write(
        here / "tenants.d" / "beta.toml",
        TENANT_FILE + 'events = ["PROFILE_STATUS_CHANGED", "TASK_IS_COMPLETE_CHANGED"]\n',
    )
    assert errors_of("config.toml", environ={}) == [
        f"{file.resolve()}: events: deprecated event types cannot be chosen: "
        "PROFILE_STATUS_CHANGED, TASK_IS_COMPLETE_CHANGED"
    ]


# -- errors, one line each -----------------------------------------------------------------------

SHORT_KEY = "whsec_" + base64.b64encode(b"x" * 15).decode()
KEY_16 = "whsec_" + base64.b64encode(b"x" * 16).decode()
STATUS_RANGE = "expected status codes from 200 to 299"
ONE_SECRET = "set exactly one of secret, secret_file, secret_env"
PG_FORM = "postgresql://USER@HOST:PORT/DBNAME?sslmode=verify-full&sslrootcert=CA.pem"
PG_PORT = "the port is not a number from 1 to 65535 (in a password, percent-encode / ? # and @)"

ERRORS: list[tuple[str, str, str]] = [
    # (id, the file, the one error line after "config.toml: ")
    # -- unknown keys at every level
    ("top", '[deamon]\nlisten = "127.0.0.1:1"\n', "deamon: unknown key"),
    ("daemon", '[daemon]\nlisen = "127.0.0.1:1"\n', "daemon.lisen: unknown key"),
    ("events", "[events]\ncustm = []\n", "events.custm: unknown key"),
    ("delivery", "[delivery]\nbatch_sise = 1\n", "delivery.batch_sise: unknown key"),
    ("tenant", acme(endpont=f'"{ENDPOINT}"'), "tenants.acme.endpont: unknown key"),
    ("nested", acme() + "[tenants.acme.delivery]\n", "tenants.acme.delivery: unknown key"),
    # -- tables of the wrong type
    ("daemon-table", "daemon = 5\n", "daemon: must be a table"),
    ("tenants-table", 'tenants = "acme"\n', "tenants: must be a table"),
    # -- [daemon]
    (
        "listen-port",
        '[daemon]\nlisten = "localhost"\n',
        "daemon.listen: expected HOST:PORT, got 'localhost'",
    ),
    (
        "listen-host",
        '[daemon]\nlisten = ":8787"\n',
        "daemon.listen: expected HOST:PORT, got ':8787'",
    ),
    (
        "listen-range",
        '[daemon]\nlisten = "127.0.0.1:70000"\n',
        "daemon.listen: port 70000 is out of range",
    ),
    ("listen-type", "[daemon]\nlisten = 8787\n", "daemon.listen: expected a string"),
    (
        "database-empty",
        '[daemon]\ndatabase = ""\n',
        "daemon.database: expected a path, got an empty string",
    ),
    ("database-type", "[daemon]\ndatabase = 1\n", "daemon.database: expected a string"),
    (
        "database-scheme",
        database("mysql://db/webhooks"),
        f"daemon.database: expected a SQLite file's path or a URL such as {PG_FORM}",
    ),
    (
        "database-no-host",
        database("postgresql:///w"),
        f"daemon.database: the URL names no host: {PG_FORM}",
    ),
    (
        "database-no-name",
        database("postgresql://db"),
        f"daemon.database: the URL names no database: {PG_FORM}",
    ),
    (
        "database-no-name-slash",
        database("postgresql://db/"),
        f"daemon.database: the URL names no database: {PG_FORM}",
    ),
    ("database-port", database("postgresql://db:port/w"), f"daemon.database: {PG_PORT}"),
    ("database-port-0", database("postgresql://db:0/w"), f"daemon.database: {PG_PORT}"),
    ("database-port-range", database("postgresql://db:65536/w"), f"daemon.database: {PG_PORT}"),
    ("database-port-empty", database("postgresql://db:/w"), f"daemon.database: {PG_PORT}"),
    (
        "database-hosts",
        database("postgresql://a:5432,b:5432/w"),
        "daemon.database: several hosts (host1,host2) are not supported; give one",
    ),
    (
        "database-host",
        database("postgresql://db$x/w"),
        "daemon.database: 'db$x' is not a valid host name",
    ),
    (
        "database-slash-in-password",
        database("postgresql://u:1234/5678@db/w"),
        "daemon.database: the database name holds a / or an @ (in a password, percent-encode "
        "/ and @ as %2F and %40)",
    ),
    (
        "database-fragment",
        database("postgresql://db/w#x"),
        "daemon.database: a URL fragment (#...) has no meaning here; remove it",
    ),
    (
        "database-parameter",
        database("postgresql://db/w?connect_timeout=5"),
        "daemon.database: the URL parameter 'connect_timeout' is not supported (supported: "
        "sslmode, sslrootcert, sslcert, sslkey)",
    ),
    (
        "database-query-password",
        database("postgresql://db/w?password=x"),
        "daemon.database: password in the URL's query is not supported; set "
        "database_password_file or $WEBHOOKD_DATABASE_PASSWORD",
    ),
    (
        "database-query-shape",
        database("postgresql://db/w?sslmode"),
        "daemon.database: the query (after ?) is not NAME=VALUE pairs joined by &",
    ),
    (
        "database-twice",
        database("postgresql://db/w?sslmode=require&sslmode=disable"),
        "daemon.database: the URL sets sslmode twice",
    ),
    (
        "database-sslmode",
        database("postgresql://db/w?sslmode=strict"),
        "daemon.database: sslmode must be one of disable, allow, prefer, require, verify-ca, "
        "verify-full; got 'strict'",
    ),
    (
        "database-verify-without-ca",
        database("postgresql://db/w?sslmode=verify-full"),
        "daemon.database: sslmode=verify-full needs sslrootcert=PATH: the CA certificate that "
        "signed the server's (for a public CA, the system bundle, e.g. "
        "/etc/ssl/certs/ca-certificates.crt)",
    ),
    (
        "database-ca-unused",
        database("postgresql://db/w?sslrootcert=config.toml"),
        "daemon.database: sslrootcert is not used with sslmode=prefer, which does not check "
        "the server's certificate; set sslmode=verify-full",
    ),
    (
        "database-ca-missing",
        database("postgresql://db/w?sslmode=verify-full&sslrootcert=no.pem"),
        "daemon.database: sslrootcert: no such file: 'no.pem'",
    ),
    (
        "database-key-alone",
        database("postgresql://db/w?sslmode=require&sslkey=config.toml"),
        "daemon.database: sslkey needs sslcert (the client certificate it goes with)",
    ),
    (
        "database-password-file-missing",
        database("postgresql://db/w", database_password_file='"no.password"'),
        "daemon.database_password_file: cannot read 'no.password': No such file or directory",
    ),
    (
        "database-password-file-sqlite",
        database("webhookd.db", database_password_file='"no.password"'),
        "daemon.database_password_file: only for a PostgreSQL database (database is a SQLite "
        "file's path)",
    ),
    (
        "token-both",
        '[daemon]\napi_token = "t"\napi_token_file = "t"\n',
        "daemon.api_token_file: set api_token or api_token_file, not both",
    ),
    (
        "token-file",
        '[daemon]\napi_token_file = "no.token"\n',
        "daemon.api_token_file: cannot read 'no.token': No such file or directory",
    ),
    ("token-type", "[daemon]\napi_token = 1234\n", "daemon.api_token: expected a string"),
    (
        "log-format",
        '[daemon]\nlog_format = "xml"\n',
        "daemon.log_format: expected one of 'auto', 'json', 'console', got 'xml'",
    ),
    (
        "log-level",
        '[daemon]\nlog_level = "verbose"\n',
        "daemon.log_level: expected one of 'debug', 'info', 'warning', 'error', got 'verbose'",
    ),
    (
        "durability",
        '[daemon]\ndurability = "off"\n',
        "daemon.durability: expected one of 'full', 'normal', got 'off'",
    ),
    (
        "conns-str",
        '[daemon]\nmax_connections = "1000"\n',
        "daemon.max_connections: expected an integer",
    ),
    (
        "conns-float",
        "[daemon]\nmax_connections = 10.0\n",
        "daemon.max_connections: expected an integer",
    ),
    (
        "conns-range",
        "[daemon]\nmax_connections = 0\n",
        "daemon.max_connections: expected an integer from 1 to 100000, got 0",
    ),
    (
        "body-range",
        "[daemon]\nmax_body_bytes = 1023\n",
        "daemon.max_body_bytes: expected an integer from 1024 to 1073741824, got 1023",
    ),
    (
        "private-int",
        "[daemon]\nallow_private_endpoints = 1\n",
        "daemon.allow_private_endpoints: expected true or false",
    ),
    (
        "private-str",
        '[daemon]\nallow_private_endpoints = "yes"\n',
        "daemon.allow_private_endpoints: expected true or false",
    ),
    (
        "grace-range",
        "[daemon]\nshutdown_grace = -1\n",
        "daemon.shutdown_grace: expected a number from 0 to 3600, got -1",
    ),
    ("grace-bool", "[daemon]\nshutdown_grace = true\n", "daemon.shutdown_grace: expected a number"),
    (
        "source",
        '[daemon]\nsource_address = "eth0"\n',
        "daemon.source_address: not an IP address: 'eth0'",
    ),
    ("ca-file", '[daemon]\nca_file = "no.pem"\n', "daemon.ca_file: no such file: 'no.pem'"),
    # -- [events]
    (
        "custom-type",
        '[events]\ncustom = "INVOICE_PAID"\n',
        "events.custom: expected a list of event type names",
    ),
    (
        "custom-name",
        '[events]\ncustom = ["invoice_paid"]\n',
        "events.custom: 'invoice_paid' is not an event name (A-Z, 0-9, _; 1 to 64)",
    ),
    (
        "custom-name-line-break",
        '[events]\ncustom = ["INVOICE_PAID\\n"]\n',
        "events.custom: 'INVOICE_PAID\\n' is not an event name (A-Z, 0-9, _; 1 to 64)",
    ),
    (
        "custom-builtin",
        '[events]\ncustom = ["CHECK_COMPLETED"]\n',
        "events.custom: CHECK_COMPLETED is already a built-in event type",
    ),
    (
        "custom-deprecated",
        '[events]\ncustom = ["COLLECTED_DATA_UPDATED"]\n',
        "events.custom: COLLECTED_DATA_UPDATED is already a built-in event type",
    ),
    # -- [delivery]
    (
        "window",
        "[delivery]\nbatch_window = 11\n",
        "delivery.batch_window: expected a number from 0 to 10, got 11",
    ),
    (
        "window-neg",
        "[delivery]\nbatch_window = -0.5\n",
        "delivery.batch_window: expected a number from 0 to 10, got -0.5",
    ),
    ("window-str", '[delivery]\nbatch_window = "10"\n', "delivery.batch_window: expected a number"),
    ("size-str", '[delivery]\nbatch_size = "100"\n', "delivery.batch_size: expected an integer"),
    ("size-bool", "[delivery]\nbatch_size = true\n", "delivery.batch_size: expected an integer"),
    (
        "size-range",
        "[delivery]\nbatch_size = 1001\n",
        "delivery.batch_size: expected an integer from 1 to 1000, got 1001",
    ),
    (
        "timeout-zero",
        "[delivery]\ntimeout = 0\n",
        "delivery.timeout: expected a number greater than 0 and at most 600, got 0",
    ),
    (
        "batch-timeout",
        "[delivery]\nbatch_timeout = 601\n",
        "delivery.batch_timeout: expected a number greater than 0 and at most 600, got 601",
    ),
    (
        "base-zero",
        "[delivery]\nretry_base = 0\n",
        "delivery.retry_base: expected a number greater than 0 and at most 604800, got 0",
    ),
    (
        "doublings",
        "[delivery]\nretry_doublings = 31\n",
        "delivery.retry_doublings: expected an integer from 0 to 30, got 31",
    ),
    (
        "after",
        "[delivery]\nretry_after_doublings = 0\n",
        "delivery.retry_after_doublings: "
        "expected a number greater than 0 and at most 2592000, got 0",
    ),
    (
        "recent",
        "[delivery]\nrecent_failures = -1\n",
        "delivery.recent_failures: expected an integer from 0 to 1000, got -1",
    ),
    (
        "history-retention-word",
        '[delivery]\nhistory_retention = "a week"\n',
        'delivery.history_retention: expected a duration such as "7d", "24h", "30m", "45s" '
        "or a number of seconds, got 'a week'",
    ),
    (
        "history-retention-negative",
        "[delivery]\nhistory_retention = -1\n",
        "delivery.history_retention: expected a duration from 0 s to 3650 days, got -1",
    ),
    (
        "history-retention-tenant",
        acme(history_retention='"7 days"'),
        'tenants.acme.history_retention: expected a duration such as "7d", "24h", "30m", '
        "\"45s\" or a number of seconds, got '7 days'",
    ),
    (
        "history-payloads",
        acme(history_payloads='"no"'),
        "tenants.acme.history_payloads: expected true or false",
    ),
    (
        "history-max-bytes-unit",
        '[daemon]\nhistory_max_bytes = "1 GB or so"\n',
        'daemon.history_max_bytes: expected a size such as "1GiB", "500MB" or a number of '
        "bytes, got '1 GB or so'",
    ),
    (
        "history-max-bytes-tiny",
        '[daemon]\nhistory_max_bytes = "10KiB"\n',
        "daemon.history_max_bytes: expected 0 (no limit) or at least 1MiB, got '10KiB'",
    ),
    (
        "idempotency-window-zero",
        '[daemon]\nidempotency_window = "0"\n',
        "daemon.idempotency_window: expected a duration from 1 s to 3650 days, got '0'",
    ),
    (
        "replay-max",
        "[daemon]\nreplay_max = 0\n",
        "daemon.replay_max: expected an integer from 1 to 10000000, got 0",
    ),
    (
        "statuses-3xx",
        "[delivery]\nsuccess_statuses = [200, 301]\n",
        "delivery.success_statuses: 301 cannot be a success: redirects are never followed",
    ),
    (
        "statuses-500",
        "[delivery]\nsuccess_statuses = [500]\n",
        f"delivery.success_statuses: {STATUS_RANGE}, got 500",
    ),
    (
        "statuses-str",
        '[delivery]\nsuccess_statuses = ["200"]\n',
        "delivery.success_statuses: expected integer status codes from 200 to 299, got '200'",
    ),
    (
        "statuses-empty",
        "[delivery]\nsuccess_statuses = []\n",
        "delivery.success_statuses: expected a non-empty list of HTTP status codes",
    ),
    (
        "statuses-int",
        "[delivery]\nsuccess_statuses = 200\n",
        "delivery.success_statuses: expected a non-empty list of HTTP status codes",
    ),
    # -- tenant names
    (
        "name-space",
        acme('"bad name"'),
        'tenants."bad name": tenant names are 1 to 64 of A-Z a-z 0-9 _ -',
    ),
    (
        "name-dot",
        acme('"acme.eu"'),
        'tenants."acme.eu": tenant names are 1 to 64 of A-Z a-z 0-9 _ -',
    ),
    (
        "name-long",
        acme("a" * 65),
        f"tenants.{'a' * 65}: tenant names are 1 to 64 of A-Z a-z 0-9 _ -",
    ),
    ("name-unicode", acme('"acmé"'), 'tenants."acmé": tenant names are 1 to 64 of A-Z a-z 0-9 _ -'),
    # -- tenant keys
    (
        "endpoint-scheme",
        acme(endpoint='"ftp://hooks.acme.example/"'),
        "tenants.acme.endpoint: not an http(s) URL",
    ),
    ("endpoint-relative", acme(endpoint='"/hooks"'), "tenants.acme.endpoint: not an http(s) URL"),
    (
        "endpoint-legacy-ipv4",
        acme(endpoint='"http://127.1:9000/x"'),
        "tenants.acme.endpoint: '127.1' is a legacy numeric IPv4 form; write the address in full",
    ),
    (
        "endpoint-integer-ipv4",
        acme(endpoint='"http://2130706433/x"'),
        "tenants.acme.endpoint: '2130706433' is a legacy numeric IPv4 form; "
        "write the address in full",
    ),
    (
        "endpoint-port",
        acme(endpoint='"https://hooks.acme.example:99999/"'),
        "tenants.acme.endpoint: not an http(s) URL",
    ),
    (
        "endpoint-userinfo",
        acme(endpoint='"https://u:p@hooks.acme.example/"'),
        "tenants.acme.endpoint: credentials in the URL are not allowed; use the tenant secret",
    ),
    (
        "endpoint-fragment",
        acme(endpoint='"https://hooks.acme.example/#x"'),
        "tenants.acme.endpoint: a URL fragment is never sent; remove it",
    ),
    (
        "endpoint-host-empty-label",
        acme(endpoint='"https://hooks..acme.example/"'),
        "tenants.acme.endpoint: 'hooks..acme.example' is not a valid host name (each "
        "dot-separated label 1 to 63 characters)",
    ),
    (
        "endpoint-host-character",
        acme(endpoint='"https://hooks$acme.example/"'),
        "tenants.acme.endpoint: 'hooks$acme.example' is not a valid host name",
    ),
    ("endpoint-type", acme(endpoint="1"), "tenants.acme.endpoint: expected a string"),
    (
        "endpoint-missing",
        acme(endpoint=None),
        "tenants.acme.endpoint: required (the URL webhooks are sent to)",
    ),
    (
        "events-missing",
        acme(events=None),
        'tenants.acme.events: required (a list of event types, or ["*"])',
    ),
    (
        "events-empty",
        acme(events="[]"),
        'tenants.acme.events: expected a non-empty list of event types, or ["*"]',
    ),
    (
        "events-star",
        acme(events='"*"'),
        'tenants.acme.events: expected a non-empty list of event types, or ["*"]',
    ),
    (
        "events-unknown",
        acme(events='["CHECK_COMPLETED", "INVOICE_PAID"]'),
        "tenants.acme.events: unknown event type 'INVOICE_PAID' (add it to [events] custom?)",
    ),
    (
        "events-near-miss",
        acme(events='["check_completed"]'),
        "tenants.acme.events: unknown event type 'check_completed' (did you mean CHECK_COMPLETED?)",
    ),
    ("events-type", acme(events="[1]"), "tenants.acme.events: expected event type names (strings)"),
    ("enabled-int", acme(enabled="1"), "tenants.acme.enabled: expected true or false"),
    ("batching-str", acme(batching='"yes"'), "tenants.acme.batching: expected true or false"),
    (
        "auth-header",
        acme(authorization_header='"false"'),
        "tenants.acme.authorization_header: expected true or false",
    ),
    (
        "tenant-source",
        acme(source_address='"10.0.0.300"'),
        "tenants.acme.source_address: not an IP address: '10.0.0.300'",
    ),
    (
        "tenant-window",
        acme(batch_window="11"),
        "tenants.acme.batch_window: expected a number from 0 to 10, got 11",
    ),
    ("tenant-size", acme(batch_size='"10"'), "tenants.acme.batch_size: expected an integer"),
    (
        "tenant-statuses",
        acme(success_statuses="[302]"),
        "tenants.acme.success_statuses: 302 cannot be a success: redirects are never followed",
    ),
    (
        "signing-prefix",
        acme(signing_secret='"abc"'),
        "tenants.acme.signing_secret: expected whsec_ followed by a base64 key (Standard Webhooks)",
    ),
    (
        "signing-base64",
        acme(signing_secret='"whsec_abc"'),
        "tenants.acme.signing_secret: the part after whsec_ is not valid base64",
    ),
    (
        "signing-short",
        acme(signing_secret=f'"{SHORT_KEY}"'),
        "tenants.acme.signing_secret: the key is too short "
        "(at least 16 bytes after base64 decoding)",
    ),
    ("signing-type", acme(signing_secret="1"), "tenants.acme.signing_secret: expected a string"),
    # -- where the secret comes from
    (
        "secret-none",
        acme(secret=None),
        f"tenants.acme.secret: {ONE_SECRET}",
    ),
    (
        "secret-two",
        acme(secret_env='"X"'),
        f"tenants.acme.secret: {ONE_SECRET} (found secret, secret_env)",
    ),
    (
        "secret-three",
        acme(secret_file='"f"', secret_env='"X"'),
        f"tenants.acme.secret: {ONE_SECRET} (found secret, secret_file, secret_env)",
    ),
    ("secret-empty", acme(secret='""'), "tenants.acme.secret: expected a non-empty string"),
    ("secret-type", acme(secret="1234"), "tenants.acme.secret: expected a non-empty string"),
    (
        "secret-env",
        acme(secret=None, secret_env='"NOT_SET"'),
        "tenants.acme.secret_env: environment variable NOT_SET is not set or empty",
    ),
    (
        "secret-file",
        acme(secret=None, secret_file='"no.secret"'),
        "tenants.acme.secret_file: cannot read 'no.secret': No such file or directory",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_line(here: Path, text: str, expected: str) -> None:
    write(here / "config.toml", text)
    assert errors_of("config.toml", environ={}) == [f"config.toml: {expected}"]


def test_history_keys_default_and_read_as_durations_and_sizes(here: Path) -> None:
    write(here / "config.toml", acme())
    config = load("config.toml", environ={})
    assert config.daemon.history_max_bytes == 1 << 30
    assert config.daemon.idempotency_window == 86400.0
    assert config.daemon.replay_max == 100_000
    assert config.delivery.history_retention == 7 * 86400.0
    assert config.delivery.history_payloads is True

    write(
        here / "config.toml",
        '[daemon]\nhistory_max_bytes = "500MB"\nidempotency_window = "12h"\n'
        "replay_max = 5000\n"
        '[delivery]\nhistory_retention = "30d"\nhistory_payloads = false\n'
        + acme()
        + acme("nohistory", history_retention='"0"')
        + acme("short", history_retention="90", history_payloads="true"),
    )
    config = load("config.toml", environ={})
    assert config.daemon.history_max_bytes == 500_000_000
    assert config.daemon.idempotency_window == 12 * 3600.0
    assert config.daemon.replay_max == 5000
    tenants = config.tenants
    assert tenants["acme"].delivery.history_retention == 30 * 86400.0
    assert tenants["acme"].delivery.history_payloads is False
    assert tenants["nohistory"].delivery.history_retention == 0.0
    assert tenants["short"].delivery.history_retention == 90.0
    assert tenants["short"].delivery.history_payloads is True
    assert tenants["short"].overrides == ("history_retention", "history_payloads")


@pytest.mark.parametrize(("size", "expected"), [('"0"', None), ("0", None), ('"1GiB"', 1 << 30)])
def test_history_max_bytes_zero_is_no_limit(here: Path, size: str, expected: int | None) -> None:
    write(here / "config.toml", f"[daemon]\nhistory_max_bytes = {size}\n" + acme())
    assert load("config.toml", environ={}).daemon.history_max_bytes == expected


def test_config_refuses_a_tenant_name_with_a_trailing_line_break(tmp_path: Path) -> None:
    """docs/configuration.md#tenantsname: "Tenant names: `[A-Za-z0-9_-]{1,64}`." and "Unknown keys,
    wrong types and bad values are errors that name the file (as given) and the key path ... and
    stop startup". `^[A-Za-z0-9_-]{1,64}$` matched with `re.match` would let a final newline
    through: `[tenants."acme\\n"]` would load, and `webhookd check` print OK.
    """
    path = tmp_path / "config.toml"
    path.write_text(
        '[tenants."acme\\n"]\nendpoint = "https://hooks.acme.example/h"\n'
        'secret = "s3cr3t"\nevents = ["*"]\n'
    )
    with pytest.raises(ConfigError) as caught:
        loaded = load(path)
        pytest.fail(f"loaded tenants {list(loaded.tenants)!r}")
    assert any("tenants" in error for error in caught.value.errors), caught.value.errors


def test_a_16_byte_signing_key_is_enough(here: Path) -> None:
    write(here / "config.toml", acme(signing_secret=f'"{KEY_16}"'))
    assert load("config.toml", environ={}).tenants["acme"].signing_secret.reveal() == KEY_16


def test_errors_name_the_file_as_given(tmp_path: Path) -> None:
    path = write(tmp_path / "conf" / "webhookd.toml", acme(endpoint='"nope"'))
    expected = "tenants.acme.endpoint: not an http(s) URL"
    assert errors_of(path, environ={}) == [f"{path}: {expected}"]
    assert errors_of(str(path), environ={}) == [f"{path}: {expected}"]
    relative = os.path.relpath(path)
    assert errors_of(relative, environ={}) == [f"{relative}: {expected}"]


def test_every_error_is_reported_at_once(here: Path) -> None:
    write(
        here / "config.toml",
        '[daemon]\nlisen = "x"\nmax_connections = 0\n[delivery]\nbatch_window = 11\n'
        + acme(endpoint='"nope"', enabled="1", events='["NOPE"]'),
    )
    with pytest.raises(ConfigError) as caught:
        load("config.toml", environ={})
    assert caught.value.errors == [
        "config.toml: daemon.max_connections: expected an integer from 1 to 100000, got 0",
        "config.toml: daemon.lisen: unknown key",
        "config.toml: delivery.batch_window: expected a number from 0 to 10, got 11",
        "config.toml: tenants.acme.endpoint: not an http(s) URL",
        "config.toml: tenants.acme.events: unknown event type 'NOPE' (add it to [events] custom?)",
        "config.toml: tenants.acme.enabled: expected true or false",
    ]
    assert str(caught.value) == "\n".join(caught.value.errors)


def test_invalid_toml(here: Path) -> None:
    text = acme() + "batching = tru\n"
    write(here / "config.toml", text)
    with pytest.raises(tomllib.TOMLDecodeError) as decode:
        tomllib.loads(text)
    assert errors_of("config.toml", environ={}) == [f"config.toml: not valid TOML: {decode.value}"]


def test_duplicate_key_is_invalid_toml(here: Path) -> None:
    write(here / "config.toml", acme() + 'secret = "again"\n')
    errors = errors_of("config.toml", environ={})
    assert len(errors) == 1
    assert errors[0].startswith("config.toml: not valid TOML: ")


def test_missing_file(here: Path) -> None:
    assert errors_of("nowhere.toml", environ={}) == ["nowhere.toml: file not found"]


def test_custom_events_can_be_subscribed(here: Path) -> None:
    write(
        here / "config.toml",
        '[events]\ncustom = ["INVOICE_PAID"]\n' + acme(events='["INVOICE_PAID"]') + acme("b"),
    )
    config = load("config.toml", environ={})
    assert config.tenants["acme"].subscribed == {"INVOICE_PAID"}
    assert config.tenants["b"].subscribed == frozenset(CURRENT) | {"INVOICE_PAID"}


# -- an egress proxy -----------------------------------------------------------------------------


def test_proxy_with_a_user_and_its_password_file(here: Path) -> None:
    write(here / "proxy-password", "pa55\n")
    write(
        here / "config.toml",
        '[daemon]\nproxy = "http://hooks@proxy.internal:3128"\n'
        'proxy_password_file = "proxy-password"\nproxy_checks_addresses = true\n'
        + acme()
        + acme("own", proxy='"http://10.0.0.9:8080"')
        + acme("direct", proxy='""'),
    )
    cfg = load("config.toml")
    proxy = cfg.daemon.proxy
    assert proxy is not None
    assert (proxy.url, proxy.host, proxy.port, proxy.username) == (
        "http://hooks@proxy.internal:3128",
        "proxy.internal",
        3128,
        "hooks",
    )
    assert proxy.password == Secret("pa55") and proxy.checks_addresses
    assert proxy.password_file == here / "proxy-password"
    assert "pa55" not in repr(cfg)
    tenants = cfg.tenants
    assert tenants["acme"].proxy is None  # the daemon's applies
    own = tenants["own"].proxy
    assert own is not None and (own.url, own.checks_addresses) == ("http://10.0.0.9:8080", False)
    assert tenants["direct"].proxy == ProxyConfig("")  # direct, whatever the daemon's


@pytest.mark.parametrize(
    ("daemon", "error"),
    [
        (
            'proxy = "http://hooks:hunter2@proxy.internal:3128"',
            "config.toml: daemon.proxy: a password in the proxy URL is not allowed (the URL may "
            "be printed); put it in proxy_password_file",
        ),
        (
            'proxy = "https://proxy.internal:3128"',
            "config.toml: daemon.proxy: https:// proxies (TLS to the proxy) are not supported; "
            "use http://HOST:PORT (the tunnel to an https endpoint is TLS from end to end all "
            "the same)",
        ),
        (
            'proxy = "http://proxy.internal"',
            "config.toml: daemon.proxy: expected http://HOST:PORT or http://USER@HOST:PORT "
            "(the port is required)",
        ),
        (
            'proxy = "socks5://proxy.internal:1080"',
            "config.toml: daemon.proxy: expected http://HOST:PORT or http://USER@HOST:PORT",
        ),
        (
            'proxy = "http://proxy.internal:3128/path"',
            "config.toml: daemon.proxy: expected http://HOST:PORT or http://USER@HOST:PORT "
            "(no path, query or fragment)",
        ),
        (
            'proxy = "http://proxy.internal:3128"\nproxy_password_file = "proxy-password"',
            "config.toml: daemon.proxy_password_file: the proxy URL names no user "
            "(http://USER@HOST:PORT): a password alone cannot be sent",
        ),
        (
            'proxy = "http://hooks@proxy.internal:3128"\nproxy_password_file = "missing"',
            "config.toml: daemon.proxy_password_file: cannot read 'missing': No such file or "
            "directory",
        ),
        (
            'proxy_password_file = "proxy-password"',
            'config.toml: daemon.proxy_password_file: only with a proxy (set proxy = "http://'
            'HOST:PORT")',
        ),
        (
            "proxy_checks_addresses = 1",
            "config.toml: daemon.proxy_checks_addresses: expected true or false",
        ),
    ],
    ids=["password", "https", "no-port", "scheme", "path", "no-user", "missing", "alone", "bool"],
)
def test_proxy_errors_name_the_key_and_never_echo_the_url(
    here: Path, daemon: str, error: str
) -> None:
    write(here / "proxy-password", "pa55\n")
    write(here / "config.toml", f"[daemon]\n{daemon}\n" + acme())
    errors = errors_of("config.toml")
    assert error in errors, errors
    assert not any("hunter2" in e for e in errors)


def test_a_tenant_proxy_is_checked_like_the_daemons(here: Path) -> None:
    write(
        here / "config.toml",
        acme(proxy='"http://u:hunter2@proxy.internal:3128"')
        + acme("other", proxy='""', proxy_checks_addresses="true"),
    )
    errors = errors_of("config.toml")
    assert errors == [
        "config.toml: tenants.acme.proxy: a password in the proxy URL is not allowed (the URL "
        "may be printed); put it in proxy_password_file",
        'config.toml: tenants.other.proxy_checks_addresses: only with a proxy (set proxy = "'
        'http://HOST:PORT")',
    ]


def test_a_tenant_of_the_api_cannot_choose_a_proxy(here: Path) -> None:
    write(here / "config.toml", "")
    write(
        here / "tenants.d" / "acme.toml",
        "\n".join(f"{k} = {v}" for k, v in ACME.items()) + '\nproxy = "http://10.0.0.9:8080"\n',
    )
    assert errors_of("config.toml") == [
        f"{here / 'tenants.d' / 'acme.toml'}: proxy: set in the configuration file only (the "
        "API's tenants use [daemon] proxy)"
    ]
