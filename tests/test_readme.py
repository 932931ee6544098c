"""The README works as written: its demo's shell blocks, run in order in real shells against
the daemon `make run` starts and the development receiver, do what the README says.

The blocks are read from README.md itself, so a change to a command there is a change to
what this test runs. Each "terminal" of the demo is a real process: terminal 1 runs
`make run` in a copy of the checkout's files (its `.venv` linked to this one), terminal 2
the receiver, terminal 3 one bash that keeps its environment between blocks, as a
person's terminal does. The demo's fixed ports (8787, 9000) are the README's.
"""

from __future__ import annotations

import asyncio
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
from aiohttp import web

from tests.conftest import ROOT, Process, Receiver, tenant, wait_for, write_config

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


def status(name: str) -> dict[str, Any]:
    return api_status(name)


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Path]:
    """The files `make run` needs, as a fresh clone has them, with this checkout's venv."""
    for name in ("Makefile", "pyproject.toml", "config.example.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    # As on a fresh clone, `make` finds the venv up to date (its stamp newer than
    # pyproject.toml) and does not reinstall into this checkout's venv from the copy.
    stamp = (ROOT / ".venv" / ".installed").stat().st_mtime
    copied = tmp_path / "pyproject.toml"
    os.utime(copied, (stamp - 1, min(copied.stat().st_mtime, stamp - 1)))
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
        # The receiver prints on arrival; the daemon records the 200 a moment later.
        wait_until(lambda: status("demo")["queue"] == "empty", timeout=5, what="demo empty")

        code, out = terminal.run(overview)
        assert code == 0, out
        rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if line}
        assert rows["demo"] == "empty" and rows["demo-batched"] == "empty", out

        # The tenant API's example (Configuration) in the same terminal, on the same daemon.
        (tenant_api,) = shell_blocks("Configuration")
        code, out = terminal.run(tenant_api)
        assert code == 0, out
        assert "https://hooks.acme.example/v2" in out, out
        assert not (checkout / "tenants.d" / "acme.toml").exists()  # removed at the end

        daemon.ctrl_c()  # "Stop the daemon with Ctrl-C"
        assert '"stopped"' in daemon.output() or "stopped" in daemon.output()
    finally:
        terminal.close()
        receiver.kill()
        daemon.kill()


def commands(block: str) -> list[tuple[str, str | None]]:
    """Each line of a block: (the command, its CLI equivalent from `# or: webhookd …`)."""
    pairs = []
    for line in block.splitlines():
        command, _, comment = line.partition("  #")
        cli = comment[comment.index("webhookd") :].strip() if "webhookd" in comment else None
        pairs.append((command.strip(), cli))
    return pairs


def inline_commands(text: str) -> list[str]:
    return re.findall(r"`((?:curl -s|webhookd) [^`]+)`", text)


async def test_the_stalled_tenant_walk_through_works_as_written(
    tmp_path: Path, receiver: Receiver, process_factory: Callable[..., Process]
) -> None:
    """Every command of "When a tenant is stalled", and its CLI equivalent, run against a
    daemon on the README's address with a stalled `acme` (`<id>` is the parked one's)."""
    assert not listening(8787), "port 8787 is taken; the README's commands need it"
    receiver.always("/acme", 503)
    config = write_config(
        tmp_path,
        {"acme": tenant(receiver.url("/acme")), "globex": tenant(receiver.url("/globex"))},
        daemon={"listen": "127.0.0.1:8787"},
        delivery={"retry_base": 60.0},  # stalled for the whole walk-through
    )
    daemon = process_factory(config)
    await asyncio.to_thread(daemon.start)
    terminal = Terminal(tmp_path)

    async def shell(block: str) -> tuple[int, str]:
        return await asyncio.to_thread(terminal.run, block)

    await shell(f"export PATH={ROOT / '.venv/bin'}:$PATH WEBHOOKD_CONFIG={config}")
    steps = shell_blocks("When a tenant is stalled")
    find, read, retry, peek_skip_parked, requeue = steps
    text = section("When a tenant is stalled")

    async def run(command: str) -> str:
        code, out = await shell(command)
        assert code == 0, (command, out)
        return out

    async def stalled(count: int) -> None:
        await wait_for(
            lambda: (
                api_status("acme").get("queue") == "stalled"
                and api_status("acme")["waiting"] == count
            )
        )

    try:
        await run(
            "curl -s -X POST localhost:8787/v1/tenants/globex/webhooks "
            "-H 'Content-Type: application/json' -d "
            '\'{"event": "TASK_CREATED"}\''
        )
        await run(
            "curl -s -X POST localhost:8787/v1/tenants/acme/webhooks "
            "-H 'Content-Type: application/json' -d "
            '\'[{"event": "TASK_CREATED"}, {"event": "TASK_CREATED"}]\''
        )
        await stalled(2)

        # 1. Find it.
        for command, cli in commands(find):
            for line in (command, cli):
                assert line is not None
                rows = {r.split()[0]: r for r in (await run(line)).splitlines() if r}
                assert "stalled" in rows["acme"] and "HTTP 503" in rows["acme"], rows
                assert "empty" in rows["globex"], rows
        # 2. Read its failures.
        (text_view, cli), (as_json, _) = commands(read)
        for line in (text_view, cli):
            assert line is not None
            out = await run(line)
            assert "stalled (2 waiting)" in out and "HTTP 503" in out, out
        assert json.loads(await run(as_json))["recent_failures"][0]["status"] == 503
        # 3. Fix or retry, then the inline refresh, pause and resume.
        receiver.always("/acme", 200)
        for command, cli in commands(retry):
            for line in (command, cli):
                assert line is not None
                await run(line)
        await wait_for(lambda: receiver.sequences("/acme") == [1, 2])
        for line in inline_commands(text[text.index("3. **Fix") : text.index("4. **Skip")]):
            await run(line)
        assert api_status("acme")["recent_failures"] == []
        assert api_status("acme")["paused"] is False

        # 4. Skip a poison webhook: the curl commands on one, the CLI on another.
        async def poison(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            return web.Response(status=400 if b"poison" in body else 200)

        receiver.always("/acme", poison)
        for via in ("curl", "cli"):
            await run(
                "curl -s -X POST localhost:8787/v1/tenants/acme/webhooks "
                "-H 'Content-Type: application/json' -d "
                f'\'[{{"event": "TASK_CREATED", "id": "poison-{via}", '
                '"data": {"poison": true}}, {"event": "TASK_CREATED"}]\''
            )
            await stalled(2)
            for command, cli in commands(peek_skip_parked):
                line = command if via == "curl" else cli
                assert line is not None
                out = await run(line)
                assert f"poison-{via}" in out or "parked" in out, out
            await wait_for(lambda: api_status("acme")["waiting"] == 0)
        parked = [p["id"] for p in api_get("/v1/tenants/acme/parked")["parked"]]
        assert parked == ["poison-curl", "poison-cli"]
        receiver.always("/acme", 200)  # the customer can take them now
        ((command, cli),) = commands(requeue)
        assert cli is not None
        await run(command.replace("<id>", "poison-curl"))
        await run(cli.replace("<id>", "poison-cli"))
        await wait_for(lambda: api_get("/v1/tenants/acme/parked")["parked"] == [])
        await wait_for(
            lambda: [w["id"] for w in receiver.at("/acme")[-1].webhooks] == ["poison-cli"]
        )
    finally:
        terminal.close()
    assert await asyncio.to_thread(daemon.terminate) == 0


def api_get(path: str) -> Any:
    with urllib.request.urlopen(API + path, timeout=5) as answer:
        return json.loads(answer.read())


def api_status(tenant_name: str) -> dict[str, Any]:
    return api_get(f"/v1/tenants/{tenant_name}/status")  # type: ignore[no-any-return]
