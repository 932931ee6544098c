"""A deadline for every test, so one that hangs fails in minutes and the run goes on.

A test (setup, call and teardown together) still running after `TEST_DEADLINE_S` has
the stacks of its event loop's pending tasks printed, then every one of them cancelled:
the awaiting test fails with CancelledError and the next test runs. If the loop does not
get free (a test blocked outside it), every thread's stack is printed after `HARD_DEADLINE_S`
and the run exits with status 1, rather than waiting for CI's own limit with nothing said.

pytest-timeout does not fit: its signal method cannot interrupt uvloop's wait, and its
thread method ends the whole run at the first hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator

import pytest

TEST_DEADLINE_S = float(os.environ.get("WEBHOOKD_TEST_DEADLINE_S", "240"))
HARD_DEADLINE_S = TEST_DEADLINE_S + 120
RECANCEL_EVERY_S = 20.0

_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_config: list[pytest.Config] = []
_failed: list[str] = []  # reports of the run's failures so far, said before a hard exit


def tracked(factory: Callable[[], asyncio.AbstractEventLoop]) -> asyncio.AbstractEventLoop:
    """A new loop from `factory`, which the watchdog may cancel tasks on."""
    loop = factory()
    _loops.add(loop)
    return loop


def _uncaptured() -> contextlib.AbstractContextManager[None]:
    """Output straight to the terminal (or CI's log), past pytest's capture."""
    capture = _config[0].pluginmanager.getplugin("capturemanager") if _config else None
    return capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()


def _cancel_everything(loop: asyncio.AbstractEventLoop, name: str) -> None:
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    with _uncaptured():
        print(f"\n+++ watchdog: {name} passed {TEST_DEADLINE_S:.0f} s; "
              f"cancelling {len(pending)} tasks +++", file=sys.stderr)  # fmt: skip
        for task in pending:
            task.print_stack(limit=12, file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for task in pending:
        task.cancel()


class _Deadline:
    def __init__(self, name: str) -> None:
        self.name = name
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="test-watchdog", daemon=True)

    def _watch(self) -> None:
        if self.done.wait(TEST_DEADLINE_S):
            return
        waited = TEST_DEADLINE_S
        while waited < HARD_DEADLINE_S:
            for loop in list(_loops):
                if loop.is_running() and not loop.is_closed():
                    loop.call_soon_threadsafe(_cancel_everything, loop, self.name)
            if self.done.wait(RECANCEL_EVERY_S):
                return
            waited += RECANCEL_EVERY_S
        # What pytest captured so far would be lost with the process: say it uncaptured.
        with _uncaptured():
            print(f"\n+++ watchdog: {self.name} still running after {HARD_DEADLINE_S:.0f} s; "
                  "every thread's stack, then exit +++", file=sys.stderr)  # fmt: skip
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            for failure in _failed:
                print(failure, file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)


def pytest_configure(config: pytest.Config) -> None:
    _config.append(config)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _failed.append(f"\n+++ failed before: {report.nodeid} ({report.when}) +++\n"
                       f"{report.longreprtext}\n{report.capstdout[-4000:]}")  # fmt: skip


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    deadline = _Deadline(item.nodeid)
    deadline.thread.start()
    try:
        yield
    finally:
        deadline.done.set()
