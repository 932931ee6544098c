"""A real PostgreSQL server for tests and benchmarks, from Debian's `postgresql` binaries.

`PostgresServer` runs `initdb` into a temporary folder, then `pg_ctl` to start and stop the
server: trust authentication, listening on 127.0.0.1 on a free port, its Unix socket inside
the folder, `fsync` and `synchronous_commit` left on (the store's durability is what tests
check, so the server must keep it). Under root, as tests run here and in CI, `initdb` and
`postgres` refuse to run, so they run as the `postgres` user (`runuser`) on a folder it owns.
With `ssl=True` the server also speaks TLS, with a certificate for `TLS_HOSTNAME` from its
own private CA (`server.ca`, made with trustme). `create_role` adds a role that must log in
with a password.

Fixtures (registered in tests/conftest.py):
  postgres_server  one server for the whole session, started by the first test that asks
  postgres_url     a fresh empty database per test (dropped afterwards): its URL
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import trustme

MISSING = (
    "PostgreSQL's server binaries are not installed (no /usr/lib/postgresql/*/bin/initdb): "
    "install Debian's postgresql (.ci/run does)"
)
START_TIMEOUT_S = 120  # pg_ctl -w: generous, the machine is shared with other test runs
# The one name the `ssl=True` server's certificate holds: connecting to 127.0.0.1 instead is
# a name the certificate does not hold (verify-full refuses it, verify-ca does not).
TLS_HOSTNAME = "localhost"


class PostgresMissing(RuntimeError):
    pass


def bin_dir() -> Path:
    """The newest installed version's bin folder, e.g. /usr/lib/postgresql/15/bin."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    if not found:
        raise PostgresMissing(MISSING)

    def version(path: Path) -> tuple[int, ...]:
        name = path.parent.name
        return tuple(int(part) for part in name.split(".")) if name[:1].isdigit() else (0,)

    return max(found, key=version)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder; `start()`, `stop()`, `restart()`.

    `settings` are written to postgresql.conf (e.g. {"shared_buffers": "128MB"}); the
    defaults keep the server small, since several test runs share the machine. `ssl` turns
    TLS on, with a certificate for TLS_HOSTNAME signed by `self.ca` (set by `init()`).
    """

    SETTINGS: Mapping[str, str] = {"shared_buffers": "16MB", "max_connections": "100"}

    def __init__(self, settings: Mapping[str, str] | None = None, *, ssl: bool = False) -> None:
        self.bin = bin_dir()
        self.settings = {**self.SETTINGS, **(settings or {})}
        self.ssl = ssl
        self.ca: trustme.CA | None = None
        self.as_root = os.geteuid() == 0
        # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, which the postgres
        # user cannot enter. The socket path must also stay under 107 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="webhookd-pg-"))
        self.data = self.directory / "data"
        self.socket_dir = self.directory / "socket"
        self.log_path = self.directory / "server.log"
        self.port = 0
        self.running = False
        self._databases = itertools.count(1)

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    # -- life cycle ------------------------------------------------------------------------

    def init(self) -> None:
        """`initdb`, and the settings; the server is not started."""
        self.socket_dir.mkdir()
        self.log_path.touch()
        if self.as_root:
            owner = pwd.getpwnam("postgres")
            for path in (self.directory, self.socket_dir, self.log_path):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        # --no-sync only spares initdb's own flush of the files it writes (a throwaway
        # folder); the server started on them fsyncs every commit as in production.
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "--no-sync")  # fmt: skip
        self.port = free_port()
        settings = {
            **self.settings,
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "on",
            "synchronous_commit": "on",
        }
        if self.ssl:
            self._write_certificate()
            settings["ssl"] = "on"  # server.crt and server.key in the data folder: the defaults
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/postgres.py\n")
            for name, value in settings.items():
                conf.write(f"{name} = {value}\n")
        self._write_port()

    def start(self) -> None:
        """Start and wait until it accepts connections. A port taken meanwhile by another
        process (the machine is shared) is replaced by a new free one, a few times."""
        if self.running:
            return
        for attempt in range(5):
            try:
                self._run("pg_ctl", "start", "-w", "-t", str(START_TIMEOUT_S),
                          "-D", str(self.data), "-l", str(self.log_path))  # fmt: skip
            except subprocess.CalledProcessError:
                if attempt == 4 or not self._port_taken():
                    raise
                self.port = free_port()
                self._write_port()
                continue
            self.running = True
            return

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" (clients disconnected, clean shutdown) or "immediate"
        (no shutdown checkpoint: the next start recovers from the WAL, as after a crash)."""
        if not self.running:
            return
        self._run("pg_ctl", "stop", "-w", "-t", str(START_TIMEOUT_S), "-m", mode,
                  "-D", str(self.data))  # fmt: skip
        self.running = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def remove(self) -> None:
        """Stop the server if it runs, and delete its folder."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- databases -------------------------------------------------------------------------

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` with psql (driver-free, so fixtures need no event loop); its output."""
        command = [str(self.bin / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                   "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
                   "-c", sql]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"psql {sql!r}: {done.stderr.strip()}")
        return done.stdout

    def create_database(self) -> str:
        """A new empty database (test_1, test_2, …); its name."""
        name = f"test_{next(self._databases)}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a test that failed half-way may leave connections open; they must not
        # keep its database (and its rows) around for the rest of the session.
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def create_role(self, name: str, password: str) -> None:
        """A login role that must give `password` (SCRAM) over TCP; `postgres` stays trusted.

        Its pg_hba.conf line goes first, so it wins over initdb's `trust` for everyone.
        """
        quoted = password.replace("'", "''")
        self.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{quoted}'")
        hba = self.data / "pg_hba.conf"
        hba.write_text(f"host all {name} 127.0.0.1/32 scram-sha-256\n{hba.read_text()}")
        self.reload()

    def reload(self) -> None:
        """Have the server read its configuration files again, and wait until it has (a
        reload is a signal: pg_reload_conf() returns before the server acts on it)."""
        before = self.psql("SELECT pg_conf_load_time()")
        self.psql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.psql("SELECT pg_conf_load_time()") == before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not reload:\n{self.log_tail()}")
            time.sleep(0.01)

    # -- helpers ---------------------------------------------------------------------------

    def _write_certificate(self) -> None:
        self.ca = trustme.CA()
        issued = self.ca.issue_cert(TLS_HOSTNAME)
        files = {
            self.data / "server.crt": b"".join(pem.bytes() for pem in issued.cert_chain_pems),
            self.data / "server.key": issued.private_key_pem.bytes(),
        }
        for path, data in files.items():
            path.write_bytes(data)
            path.chmod(0o600)  # the server refuses a key others can read
            if self.as_root:
                owner = pwd.getpwnam("postgres")
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise subprocess.CalledProcessError(
                done.returncode,
                command,
                done.stdout,
                f"{done.stderr}\n--- server log (tail) ---\n{self.log_tail()}",
            )

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _write_port(self) -> None:
        # postgresql.auto.conf is read after postgresql.conf, so its port wins; rewriting
        # it keeps one port line however often the port changes.
        auto = self.data / "postgresql.auto.conf"
        text = "".join(
            line for line in auto.read_text().splitlines(True) if not line.startswith("port =")
        )
        auto.write_text(f"{text}port = {self.port}\n")

    def _port_taken(self) -> bool:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", self.port))
            except OSError:
                return True
        return False


def started_server(
    settings: Mapping[str, str] | None = None, *, ssl: bool = False
) -> PostgresServer:
    """A new server, initialised and started (the caller `remove()`s it)."""
    server = PostgresServer(settings, ssl=ssl)
    try:
        server.init()
        server.start()
    except BaseException:
        server.remove()
        raise
    return server


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test session, started by the first test that uses it.

    Tests may stop, start or restart it; each `postgres_url` starts it again if a test
    left it stopped.
    """
    try:
        server = started_server()
    except PostgresMissing:
        server = None  # failed outside the except block, so no traceback comes with it
    if server is None:
        pytest.fail(MISSING, pytrace=False)
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's server, dropped after the test."""
    postgres_server.start()
    name = postgres_server.create_database()
    yield postgres_server.database_url(name)
    postgres_server.start()  # the test may have stopped it
    postgres_server.drop_database(name)
