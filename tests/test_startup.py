"""Every failure to start ends `webhookd run` promptly, non-zero, with one line that names
the cause and what to do: a port in use, a database held by another daemon, unwritable,
damaged or of a newer schema, an unreadable secret, a bad config.

Each case runs the daemon as a subprocess with a deadline: before the fix, a port in use
left it running forever (the database's threads kept the process alive, so under
systemd the unit hung until TimeoutStartSec).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Process, free_port, tenant, write_config
from webhookd.store.sqlite import SCHEMA_VERSION

DEADLINE_S = 15.0


def run(config: Path) -> tuple[int, list[dict[str, Any]], str]:
    """`webhookd run` to its end: (exit code, JSON log events, everything printed)."""
    done = subprocess.run(
        [sys.executable, "-m", "webhookd", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,  # a daemon that does not exit fails the test here
        check=False,
    )
    output = done.stdout + done.stderr
    events = []
    for line in output.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return done.returncode, events, output


def the_refusal(config: Path) -> str:
    """The one error line of a run that could not start."""
    code, events, output = run(config)
    assert code == 1, output
    errors = [e for e in events if e.get("level") == "error"]
    assert [e["event"] for e in errors] == ["cannot_start"], output
    return str(errors[0]["error"])


def config_for(directory: Path, **daemon: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(
        directory,
        {"t": tenant("https://hooks.example/t")},
        daemon={"log_format": "json", **daemon},
    )


def test_a_port_in_use_is_named_with_the_key_to_change(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        config = config_for(tmp_path, listen=f"127.0.0.1:{port}")
        error = the_refusal(config)
    assert f"127.0.0.1:{port} is already in use" in error
    assert f"set listen in [daemon] of {config}" in error


def test_an_address_this_machine_lacks_is_named(tmp_path: Path) -> None:
    error = the_refusal(config_for(tmp_path, listen="192.0.2.1:8787", api_token="t0k3n-abc"))
    assert "192.0.2.1:8787 is not an address of this machine" in error


def test_a_database_held_by_another_daemon_is_refused(
    tmp_path: Path, process_factory: Callable[..., Process]
) -> None:
    database = tmp_path / "shared" / "webhookd.db"
    first = process_factory(config_for(tmp_path / "a", database=str(database)))
    first.start()
    assert first.proc is not None
    error = the_refusal(config_for(tmp_path / "b", database=str(database)))
    assert error == (
        f"the database {database} is in use by another webhookd (pid {first.proc.pid}); "
        "stop that one first, or give this one its own database in [daemon]"
    )
    # The first one is untouched, and once it is gone the database is free again
    # (kill -9 included: the kernel drops the lock with its holder).
    first.kill9()
    second = process_factory(config_for(tmp_path / "b", database=str(database)))
    second.start()
    assert second.terminate() == 0


def test_a_damaged_database_is_named_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "webhookd.db").write_bytes(b"this is not SQLite at all\n" * 200)
    error = the_refusal(config_for(tmp_path))
    assert f"{tmp_path / 'webhookd.db'} is not a webhookd database, or it is damaged" in error
    assert "restore it from a backup" in error


def test_a_database_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "webhookd.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    error = the_refusal(config_for(tmp_path))
    assert "newer than this webhookd understands" in error
    assert "run a newer webhookd" in error


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on a read-only filesystem (the tests run as root, whom modes do not stop)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert mounted.returncode == 0, f"mount failed (the tests need root): {mounted.stderr}"
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def test_an_unwritable_database_folder_is_named(tmp_path: Path, read_only_folder: Path) -> None:
    error = the_refusal(config_for(tmp_path, database=str(read_only_folder / "webhookd.db")))
    assert "Read-only file system" in error
    assert f"must be able to create and write files in {read_only_folder}" in error


def test_an_unreadable_secret_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "secret-dir").mkdir()
    tenants = {}
    for name, where in (("a", "missing.secret"), ("b", "secret-dir")):
        table = tenant(f"https://hooks.example/{name}")
        del table["secret"]
        tenants[name] = {**table, "secret_file": where}
    config = write_config(tmp_path, tenants, daemon={"log_format": "json"})
    code, _, output = run(config)
    assert code == 1, output
    assert f"{config}: tenants.a.secret_file:" in output, output
    assert f"{config}: tenants.b.secret_file:" in output, output


def test_a_bad_config_is_named_by_file_and_key(tmp_path: Path) -> None:
    config = config_for(tmp_path, listen_on="127.0.0.1:1")
    code, _, output = run(config)
    assert code == 1
    assert output.strip() == f"error: {config}: daemon.listen_on: unknown key"


def test_an_unreachable_postgresql_database_is_one_line_without_its_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql://webhookd:DB-PASSWORD-1@127.0.0.1:{free_port()}/webhooks"
    code, events, output = run(config_for(tmp_path, database=url))
    assert code == 1, output
    [error] = [e["error"] for e in events if e.get("event") == "cannot_start"]
    assert error.startswith("cannot open the database postgresql://webhookd@127.0.0.1:"), error
    assert "connection refused" in error and "database in [daemon]" in error, error
    assert "DB-PASSWORD-1" not in output
