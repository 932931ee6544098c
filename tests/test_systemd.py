"""The systemd unit and the sd_notify protocol, against a real daemon process."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, Process, tenant, write_config

UNIT = ROOT / "systemd" / "webhookd.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: .ci/run installs the systemd package"
    # verify checks that ExecStart exists, so point it at this checkout's console script.
    script = Path(sys.executable).parent / "webhookd"
    unit = tmp_path / "webhookd.service"
    unit.write_text(UNIT.read_text().replace("/opt/webhookd/bin/webhookd", str(script)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "webhookd" in line
    ]
    assert result.returncode == 0, result.stderr
    assert complaints == []


def test_unit_declares_what_the_spec_requires() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == ["/opt/webhookd/bin/webhookd run -c /etc/webhookd/config.toml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["StateDirectory"] == ["webhookd"]
    assert s["ConfigurationDirectory"] == ["webhookd"]
    assert s["User"] == ["webhookd"]
    for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert s[hardening] == ["yes"], hardening
    assert s["ProtectSystem"] == ["strict"]
    assert "@system-service" in s["SystemCallFilter"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    # TimeoutStopSec must leave room for the default shutdown_grace of 10 s.
    assert int(s["TimeoutStopSec"][0].rstrip("s")) > 10
    assert s["WatchdogSec"]
    sysusers = (ROOT / "systemd" / "webhookd.sysusers").read_text()
    assert re.search(r"^u webhookd ", sysusers, re.M)


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []

    def collect(self, until: Callable[[list[dict[str, str]]], bool], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not until(self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"notifications so far: {self.messages}")
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(fields)

    def states(self) -> list[str]:
        order = ("READY", "RELOADING", "STOPPING")
        return [k for m in self.messages for k in order if k in m]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.sock.close()


def test_ready_reloading_ready_stopping_and_watchdog(
    tmp_path: Path, notify: NotifySocket, process_factory: Callable[..., Process]
) -> None:
    config = write_config(tmp_path, {"acme": tenant("http://127.0.0.1:9/acme")})
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    daemon = process_factory(config, env)
    daemon.start()
    notify.collect(lambda m: "READY" in notify.states())
    ready = next(m for m in notify.messages if "READY" in m)
    assert ready["READY"] == "1"
    assert ready["STATUS"] == "1 tenant, 0 waiting, 0 stalled"
    # WATCHDOG_USEC=200 ms: pings every 100 ms while the loop and the database answer.
    notify.collect(lambda m: sum("WATCHDOG" in x for x in m) >= 3, timeout=5)

    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    notify.collect(lambda m: notify.states().count("READY") >= 2)
    reloading = next(m for m in notify.messages if "RELOADING" in m)
    assert int(reloading["MONOTONIC_USEC"]) > 0

    assert daemon.terminate() == 0
    notify.collect(lambda m: "STOPPING" in notify.states())
    assert notify.states() == ["READY", "RELOADING", "READY", "STOPPING"]


def test_no_notify_socket_is_fine(tmp_path: Path, process_factory: Callable[..., Process]) -> None:
    config = write_config(tmp_path, {"acme": tenant("http://127.0.0.1:9/acme")})
    daemon = process_factory(config, {"NOTIFY_SOCKET": ""})
    daemon.start()
    assert daemon.terminate() == 0


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


@pytest.mark.parametrize(
    ("given", "expected", "warned"),
    [((256, 8192), (8192, 8192), False), ((256, 512), (512, 512), True)],
    ids=["raised-to-the-hard-limit", "hard-limit-below-max-connections"],
)
def test_the_soft_open_files_limit_is_raised_to_the_hard_one(
    tmp_path: Path,
    process_factory: Callable[..., Process],
    given: tuple[int, int],
    expected: tuple[int, int],
    warned: bool,
) -> None:
    """A shell's soft limit (often 1024) would cap outgoing connections below the default
    max_connections (1000) plus the database and API clients; the hard limit is the
    operator's real bound. Too low a hard limit is named in the log at start-up."""
    config = write_config(tmp_path, tenants={"acme": tenant("http://127.0.0.1:9/x")})
    daemon = process_factory(config, nofile=given)
    daemon.start()
    assert daemon.proc is not None
    assert open_files_limit(daemon.proc.pid) == expected
    assert daemon.terminate() == 0
    events = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    low = [e for e in events if e["event"] == "open_files_limit_low"]
    assert [(e["limit"], e["max_connections"]) for e in low] == ([(512, 1000)] if warned else [])
