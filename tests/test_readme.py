"""The README works as written: its demo's shell blocks, run in order in real shells against
the daemon `make run` starts and the development receiver, do what the README says.

The blocks are read from README.md itself, so a change to a command there is a change to
what this test runs. Each "terminal" of the demo is a real process: terminal 1 runs
`make run` in a copy of the checkout's files (its `.venv` linked to this one), terminal 2
the receiver, terminal 3 one bash that keeps its environment between blocks, as a
person's terminal does. The demo's fixed ports (8787, 9000) are the README's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
API = "http://127.0.0.1:8787"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def shell_blocks(title: str) -> list[str]:
    """The ```sh blocks of a README section, in order, with their indentation removed."""
    blocks = re.findall(r"^( *)```sh\n(.*?)^\1```$", section(title), re.M | re.S)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) for indent, body in blocks]


class Terminal:
    """One bash, fed block after block; its variables and PATH carry over, like a person's."""

    def __init__(self, cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD")}
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # not this venv's: the README's job
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, block: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run `block` as typed; (exit status of its last command, everything printed)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        marker = f"__done_{time.monotonic_ns()}__"
        self.proc.stdin.write(f"{block}\necho; echo {marker} $?\n")
        self.proc.stdin.flush()
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(marker):
                return int(line.split()[1]), "".join(lines)
            lines.append(line)
        raise AssertionError(f"block did not finish in {timeout}s: {block!r}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class Background:
    """A command left running in its own terminal (its own process group, for Ctrl-C)."""

    def __init__(self, command: str, cwd: Path, log: Path) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD")}
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", command],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ctrl_c(self, timeout: float = 20.0) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def wait_until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


def status(tenant: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{API}/v1/tenants/{tenant}/status", timeout=5) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Path]:
    """The files `make run` needs, as a fresh clone has them, with this checkout's venv."""
    for name in ("Makefile", "pyproject.toml", "config.example.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    for port in (8787, 9000):
        assert not listening(port), f"port {port} is taken; the README's demo needs it"
    yield tmp_path


def test_the_five_minute_demo_works_as_written(checkout: Path) -> None:
    blocks = shell_blocks("A five-minute demo")
    daemon_block, receiver_block, first, batched, stalled, retry, overview = blocks
    assert daemon_block == "make run"

    daemon = Background(daemon_block, checkout, checkout / "terminal-1.log")
    receiver = Background(receiver_block, checkout, checkout / "terminal-2.log")
    terminal = Terminal(checkout)
    try:
        wait_until(lambda: listening(8787) and listening(9000), what="daemon and receiver")
        # make run tells how to reach the CLI, in the words terminal 3 then uses.
        assert ". .venv/bin/activate" in daemon.output()

        code, out = terminal.run(first)
        assert code == 0, out
        assert json.loads(out.strip().splitlines()[-1])["webhooks"][0]["status"] == "queued"
        wait_until(lambda: "sequence 1," in receiver.output(), what="the first delivery")

        code, out = terminal.run(batched)
        assert code == 0, out
        answers = json.loads(out.strip().splitlines()[-1])["webhooks"]
        assert [a["status"] for a in answers] == ["queued", "queued", "not_subscribed"]
        wait_until(lambda: "/demo-batched: 2 webhook" in receiver.output(), what="the batch")
        code, out = terminal.run(batched)  # "send the same request again"
        assert [a["status"] for a in json.loads(out.strip().splitlines()[-1])["webhooks"]] == [
            "duplicate",
            "duplicate",
            "not_subscribed",
        ]

        assert receiver.ctrl_c() in (0, 130, -2)  # "Stop the receiver (Ctrl-C)"
        code, out = terminal.run(stalled)
        assert code == 0, out
        assert "queued: id" in out and "sequence 2" in out, out
        assert "tenant" in out and "demo" in out, out
        wait_until(lambda: status("demo")["queue"] == "stalled", what="demo stalled")
        code, out = terminal.run(stalled.splitlines()[-1].split("#")[-1].replace("or:", ""))
        assert code == 0 and "stalled (1 waiting)" in out and "connection refused" in out, out

        receiver = Background(receiver_block, checkout, checkout / "terminal-2b.log")
        wait_until(lambda: listening(9000), what="the receiver again")
        code, out = terminal.run(retry)
        assert code == 0, out
        wait_until(lambda: "sequence 2," in receiver.output(), timeout=5, what="the retry")

        code, out = terminal.run(overview)
        assert code == 0, out
        rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if line}
        assert rows["demo"] == "empty" and rows["demo-batched"] == "empty", out

        daemon.ctrl_c()  # "Stop the daemon with Ctrl-C"
        assert '"stopped"' in daemon.output() or "stopped" in daemon.output()
    finally:
        terminal.close()
        receiver.kill()
        daemon.kill()
