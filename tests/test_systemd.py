"""The systemd unit and the sd_notify protocol, against a real daemon process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, Process, tenant, write_config
from tests.test_readme import shell_blocks
from webhookd import config as config_mod

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


# -- "Run as a service", step by step ------------------------------------------------------------


def service_steps() -> list[str]:
    """The README's "Run as a service" commands, as written, up to the first `systemctl`."""
    steps = []
    for line in shell_blocks("Run as a service")[0].splitlines():
        if line.startswith("systemctl"):
            break
        steps.append(line)
    return steps


def account(path: Path, name: str) -> list[str]:
    """The fields of `name`'s line in a passwd or group file."""
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise AssertionError(f"{name} is not in {path}")


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def test_run_as_a_service_steps_work_as_written(tmp_path: Path) -> None:
    """Every step of the README's "Run as a service" up to `systemctl`, run as root on a
    scratch root instead of this machine's. Each line is run as written, except that:

    - every path under /etc, /opt and /var is moved under the scratch root, and the
      checkout is a copy of this one (its sources, pyproject.toml and README);
    - `systemd-sysusers` gets `--root` (it writes the scratch root's passwd and group);
    - `webhookd` as an owner or group (`-g`, `chgrp`) is its number from the scratch root's
      passwd and group, since this machine's tools look names up in its own;
    - `python3` is the interpreter running the tests, and pip installs with `--no-deps`:
      the dependencies come from the tests' environment (a .pth file), which spares
      downloading them again; webhookd itself is built and installed as the README says;
    - `$EDITOR` is not run (the file `init` wrote is checked as it is).
    """
    assert os.geteuid() == 0, "the service steps run as root (as the README says)"
    root = tmp_path / "root"
    checkout = tmp_path / "src" / "webhookd"
    checkout.mkdir(parents=True)
    shutil.copytree(
        ROOT / "daemon",
        checkout / "daemon",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WEBHOOKD_CONFIG")}
    deps = next(p for p in sys.path if p.endswith("site-packages"))

    def in_scratch(step: str) -> str:
        step = re.sub(r"(?<![\w/.-])/(etc|opt|var)/", rf"{root}/\1/", step)
        step = step.replace("/path/to/webhookd", str(checkout))
        step = re.sub(r"^python3 ", f"{sys.executable} ", step)
        step = re.sub(r"^systemd-sysusers\b", f"systemd-sysusers --root={root}", step)
        step = re.sub(r"(/bin/pip install) ", r"\1 --no-deps ", step)
        if "webhookd" in step and (root / "etc" / "group").exists():
            gid = account(root / "etc" / "group", "webhookd")[2]
            step = re.sub(r"((?:-g|chgrp) )webhookd\b", rf"\g<1>{gid}", step)
        return step

    steps = service_steps()
    assert steps[0].startswith("python3 -m venv /opt/webhookd"), steps
    for step in steps:
        if step.startswith("$EDITOR"):
            continue
        command = in_scratch(step)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, (step, command, result.stdout, result.stderr)
        if step.startswith("python3 -m venv"):
            venv_site = next((root / "opt" / "webhookd" / "lib").glob("python3*/site-packages"))
            (venv_site / "tests-dependencies.pth").write_text(deps + "\n")

    # The installed copy is a copy: its own package, the starter template included.
    installed = next((root / "opt" / "webhookd" / "lib").glob("python3*/site-packages/webhookd"))
    assert (installed / "starter.toml").is_file()

    # The user and group, from systemd/webhookd.sysusers.
    user = account(root / "etc" / "passwd", "webhookd")
    group = account(root / "etc" / "group", "webhookd")
    uid, gid = int(user[2]), int(group[2])
    assert (int(user[3]), user[5], user[6]) == (gid, "/var/lib/webhookd", "/usr/sbin/nologin")
    assert 0 < uid < 1000, user  # a system user

    # Owned by root, readable by the daemon's group only, as the README says.
    etc = root / "etc" / "webhookd"
    assert owner_and_mode(etc) == (0, gid, 0o750)
    assert owner_and_mode(etc / "config.toml") == (0, gid, 0o640)
    assert owner_and_mode(etc / "acme.secret") == (0, gid, 0o640)
    assert sorted(p.name for p in etc.iterdir()) == ["acme.secret", "config.toml"]
    cfg = config_mod.load(etc / "config.toml")
    state = root / "var" / "lib" / "webhookd"
    assert (cfg.daemon.database, cfg.daemon.tenants_dir) == (
        state / "webhookd.db",
        state / "tenants.d",
    )
    assert cfg.daemon.api_token and not cfg.daemon.allow_private_endpoints
    # The state folder is the unit's to make at start (StateDirectory=), for the user alone.
    assert not state.exists()
    s = unit_settings()
    assert (s["StateDirectory"], s["StateDirectoryMode"]) == (["webhookd"], ["0700"])
    assert (s["User"], s["Group"]) == (["webhookd"], ["webhookd"])

    sysusers = root / "etc" / "sysusers.d" / "webhookd.conf"
    unit = root / "etc" / "systemd" / "system" / "webhookd.service"
    for installed_file, source in ((sysusers, "webhookd.sysusers"), (unit, "webhookd.service")):
        assert owner_and_mode(installed_file) == (0, 0, 0o644)
        assert installed_file.read_bytes() == (ROOT / "systemd" / source).read_bytes()
    # The unit's documentation is a file these steps made.
    (documentation,) = s["Documentation"]
    assert (root / documentation.removeprefix("file:/")).is_file()


def test_the_unit_points_at_nothing_an_installation_lacks() -> None:
    """Documentation= is the config file the unit runs with (`webhookd init` wrote it,
    every key commented); the comments name no file of the source tree."""
    s = unit_settings()
    assert s["Documentation"] == ["file:/etc/webhookd/config.toml"]
    assert s["ExecStart"][0].endswith(" -c /etc/webhookd/config.toml")
    for name in ("webhookd.service", "webhookd.sysusers"):
        text = (ROOT / "systemd" / name).read_text()
        for missing in ("README", "config.example.toml", "SPEC"):
            assert missing not in text, (name, missing)
