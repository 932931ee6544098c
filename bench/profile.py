"""Optional py-spy sampling of the daemon during a measured phase (`--profile`).

py-spy is not a project dependency: `.venv/bin/pip install py-spy` to use it. Samples are
written in py-spy's collapsed-stack format next to latest.json and summarised here: the
functions the event-loop thread spends its samples in (self and inclusive).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Sampler:
    """`py-spy record` attached to a pid until `stop()`; then `summary()`."""

    def __init__(self, pid: int, out: Path, mode: str = "wall", rate: int = 250) -> None:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out = out
        self.proc = subprocess.Popen(
            [
                binary,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--threads",
                # Sampling without pausing the daemon; native stacks need it paused.
                *([] if mode == "native" else ["--nonblocking"]),
                # wall: every thread that is not idle (a thread waiting for the GIL counts);
                # gil: only the thread holding the GIL, i.e. where Python CPU time goes.
                # native: wall, plus C frames (sqlite, uvloop, the kernel boundary).
                *(["--gil"] if mode == "gil" else []),
                *(["--native"] if mode == "native" else []),
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _short(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3", "daemon/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def _daemon_line(frames: list[str]) -> str | None:
    """The innermost frame in webhookd's own code, with its line: who asked for this work."""
    for frame in reversed(frames):
        match = FRAME.match(frame.strip())
        path = "/" + match["file"] if match else ""
        if "/webhookd/" in path and not path.endswith("__main__.py"):
            name = path.rsplit("/webhookd/", 1)[1]
            return f"{match['func']} ({name}:{match['line']})" if match else None
    return None


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    """Per thread: samples; for the two busiest threads, the top functions by self time,
    by inclusive time, and the daemon source lines that the samples are attributable to.
    """
    threads: Counter[str] = Counter()
    own: dict[str, Counter[str]] = {}
    inclusive: dict[str, Counter[str]] = {}
    lines: dict[str, Counter[str]] = {}
    if not path.exists():
        return {"error": f"{path} was not written"}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread, raw = frames[0], frames[1:]
        frames = [_short(f) for f in raw]
        threads[thread] += count
        line_of = _daemon_line(raw) or "(outside webhookd code)"
        lines.setdefault(thread, Counter())[line_of] += count
        if frames:
            own.setdefault(thread, Counter())[frames[-1]] += count
            for frame in set(frames):
                inclusive.setdefault(thread, Counter())[frame] += count
    total = sum(threads.values())
    result: dict[str, Any] = {
        "samples": total,
        "threads": {name: n for name, n in threads.most_common()},
    }
    for thread, samples in threads.most_common(2):
        result.setdefault("top", {})[thread] = {
            "samples": samples,
            "self": [(f, n, round(100 * n / samples, 1)) for f, n in own[thread].most_common(top)],
            "inclusive": [
                (f, n, round(100 * n / samples, 1)) for f, n in inclusive[thread].most_common(top)
            ],
            "daemon_lines": [
                (f, n, round(100 * n / samples, 1)) for f, n in lines[thread].most_common(top)
            ],
        }
    return result


def format_summary(name: str, summary: dict[str, Any], top: int = 10) -> str:
    """Self time and daemon lines, `top` of each (the JSON keeps inclusive time too)."""
    if "error" in summary:
        return f"profile {name}: {summary['error']}"
    lines = [f"profile {name}: {summary['samples']} samples; threads {summary['threads']}"]
    for thread, info in summary.get("top", {}).items():
        lines.append(f"  {thread}: {info['samples']} samples")
        lines.append("    self:")
        lines += [f"      {pct:5.1f}%  {frame}" for frame, _, pct in info["self"][:top]]
        lines.append("    by innermost webhookd line:")
        lines += [f"      {pct:5.1f}%  {frame}" for frame, _, pct in info["daemon_lines"][:top]]
    return "\n".join(lines)
