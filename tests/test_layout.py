"""The dependencies point one way: the service knows no HTTP server, and the sender and
the views know no store. Checked in a fresh interpreter, so what is loaded is what the
import itself pulls in."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_by(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(done.stdout.split())


@pytest.mark.parametrize(
    ("module", "never"),
    [
        (
            "webhookd.service",
            {"aiohttp.web", "webhookd.api", "webhookd.listener", "webhookd.serve"},
        ),
        ("webhookd.sender", {"webhookd.store", "webhookd.store.sqlite", "webhookd.store.postgres"}),
        ("webhookd.views", {"webhookd.store", "webhookd.service"}),
        ("webhookd.metrics", {"webhookd.api", "webhookd.service"}),
    ],
)
def test_a_module_loads_nothing_of_the_layers_it_must_not_know(
    module: str, never: set[str]
) -> None:
    assert loaded_by(module) & never == set()
