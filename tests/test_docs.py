"""The documentation holds together: every relative link in README.md and docs/ leads to a
file of the repository (and to a heading of it, for a `#fragment`), and the reference pages
cover exactly what the code has: docs/configuration.md every key the config loader accepts
(from the loader's own lists, the ones it refuses other keys with) and config.example.toml
sets, docs/cli.md every command and option of the parser, docs/metrics.md every metric the
daemon exports.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

from tests.conftest import ROOT
from webhookd import config
from webhookd.__main__ import build_parser

DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines, fence = [], ""
    for line in text.splitlines():
        stripped = line.lstrip()
        if fence:
            if stripped.startswith(fence):
                fence = ""
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            continue
        lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but '-' and '_' dropped (inline
    code's backticks, link brackets and URLs included), spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a file's headings; a repeated heading gets -1, -2, … as on GitHub."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        heading = re.match(r" {0,3}#{1,6}\s+(.+?)\s*#*\s*$", line)
        if heading is None:
            continue
        base = slug(heading.group(1))
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline Markdown link outside code (fenced or inline)."""
    found = []
    text = path.read_text(encoding="utf-8")
    prose = set(prose_lines(text))
    for number, line in enumerate(text.splitlines(), 1):
        if line not in prose:
            continue
        without_code = re.sub(r"(`+).*?\1", "", line)
        found += [(number, m.group(1)) for m in LINK.finditer(without_code)]
    return found


def broken_links(path: Path) -> list[str]:
    """Each relative link of `path` that does not resolve, as `file:line: target: why`."""
    problems = []
    for number, target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http(s)://, mailto:: not fetched
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{where}: no such file {linked.relative_to(ROOT.resolve())}")
        elif not linked.resolve().is_relative_to(ROOT.resolve()):
            problems.append(f"{where}: outside the repository")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            problems.append(f"{where}: {linked.name} has no heading with anchor #{fragment}")
    return problems


def test_every_relative_link_resolves_to_a_file_and_heading_of_the_repository() -> None:
    files = markdown_files()
    assert DOCS / "README.md" in files and len(files) >= 8, files
    problems = [problem for path in files for problem in broken_links(path)]
    assert problems == [], "broken links:\n" + "\n".join(problems)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    """The check itself: a page with one good link and two broken ones names the two."""
    page = DOCS / "_link_check_probe.md"
    page.write_text(
        "# Probe\n\n[good](configuration.md#batch_window) [self](#probe)\n"
        "[gone](no-such-page.md) [nowhere](configuration.md#no-such-heading)\n"
        "`[in code](also-gone.md)`\n```\n[fenced](fenced-gone.md)\n```\n"
    )
    try:
        problems = broken_links(page)
    finally:
        page.unlink()
    assert len(problems) == 2, problems
    assert "no-such-page.md: no such file" in problems[0]
    assert "no heading with anchor #no-such-heading" in problems[1]


def test_no_page_points_outside_the_repository_or_at_the_specification() -> None:
    """The README and docs/ are read on their own: no `../shared/…` link, no SPEC.md."""
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        assert "SPEC.md" not in text and "shared/" not in text, path


# -- configuration keys ----------------------------------------------------------------------


def documented_keys() -> dict[str, set[str]]:
    """The keys docs/configuration.md documents, per table: each `### \\`key\\`` heading under
    a `## [table]` heading (`[tenants.NAME]` for the tenant table)."""
    sections: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in prose_lines(CONFIGURATION.read_text(encoding="utf-8")):
        if section := re.match(r"## \[([a-z_.A-Z]+)\]\s*$", line):
            current = sections.setdefault(section.group(1), set())
        elif line.startswith("## "):
            current = None
        elif key := re.match(r"### `([a-z_]+)`\s*$", line):
            assert current is not None, f"{line!r} is not under a ## [table] heading"
            current.add(key.group(1))
    return sections


def loader_keys() -> dict[str, set[str]]:
    """What the loader accepts, per table: the lists `_Table.finish` refuses other keys by.
    A tenant's table also takes every [delivery] key, documented under [delivery]."""
    return {
        "daemon": set(config.DAEMON_KEYS),
        "events": set(config.EVENTS_KEYS),
        "delivery": set(config.DELIVERY_KEYS),
        "tenants.NAME": set(config.TENANT_TABLE_KEYS) - set(config.DELIVERY_KEYS),
    }


def test_every_key_the_loader_accepts_is_documented_and_every_documented_key_is_accepted() -> None:
    documented, accepted = documented_keys(), loader_keys()
    tables = {"tenants.NAME" if t == "tenants" else t for t in config.TOP_LEVEL_KEYS}
    assert set(documented) == tables == set(accepted), sorted(documented)
    problems = []
    for table in sorted(accepted):
        for key in sorted(accepted[table] - documented.get(table, set())):
            problems.append(f"[{table}] {key}: accepted by the loader, not in configuration.md")
        for key in sorted(documented.get(table, set()) - accepted[table]):
            problems.append(f"[{table}] {key}: in configuration.md, refused by the loader")
    assert problems == [], "\n".join(problems)


def test_every_key_of_the_example_file_is_documented() -> None:
    example = tomllib.loads((ROOT / "config.example.toml").read_text(encoding="utf-8"))
    documented = documented_keys()
    tenant_keys = documented["tenants.NAME"] | documented["delivery"]
    assert set(example) <= set(config.TOP_LEVEL_KEYS), sorted(example)
    problems = []
    for table in ("daemon", "events", "delivery"):
        problems += [
            f"[{table}] {key}" for key in example.get(table, {}) if key not in documented[table]
        ]
    for name, tenant in example.get("tenants", {}).items():
        problems += [f"[tenants.{name}] {key}" for key in tenant if key not in tenant_keys]
    assert problems == [], "in config.example.toml, not in configuration.md: " + ", ".join(problems)


def test_the_loader_refuses_a_key_it_reads_but_does_not_list(tmp_path: Path) -> None:
    """The lists are the loader's gate, not a copy of it: an unlisted key is an unknown key,
    whatever reads it (here a [delivery] key the daemon table does not list)."""
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nbatch_size = 5\n[delivery]\nlisten = "127.0.0.1:1"\n')
    try:
        config.load(path)
    except config.ConfigError as exc:
        assert any("daemon.batch_size: unknown key" in e for e in exc.errors), exc.errors
        assert any("delivery.listen: unknown key" in e for e in exc.errors), exc.errors
    else:
        raise AssertionError("keys of another table were accepted")


# -- the command line and the metrics ---------------------------------------------------------


def section_text(path: Path, heading: str) -> str:
    """The text under a `### heading` up to the next heading of level 2 or 3."""
    text = path.read_text(encoding="utf-8")
    start = text.index(f"\n### {heading}\n")
    following = re.search(r"\n#{2,3} ", text[start + 1 :])
    return text[start : start + 1 + following.start() if following else len(text)]


def test_every_command_and_option_of_the_cli_is_documented() -> None:
    cli = DOCS / "cli.md"
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    problems = []
    for name, sub in commands.choices.items():
        try:
            text = section_text(cli, f"`webhookd {name}`")
        except ValueError:
            problems.append(f"webhookd {name}: no ### `webhookd {name}` heading")
            continue
        for action in sub._actions:
            # An option by any of its spellings (`-c CONFIG` for --config), an argument by
            # its metavar (TENANT, ID).
            names = action.option_strings or [str(action.metavar or action.dest)]
            if action.choices and not action.option_strings:
                names = [f"webhookd {name} {choice}" for choice in action.choices]
            if "--help" not in names and not any(n in text for n in names):
                problems.append(f"webhookd {name} {names[-1]}: not in its section")
            if not action.option_strings and action.choices:  # tenant show|set|rm
                for choice in action.choices:
                    if f"webhookd {name} {choice}" not in text:
                        problems.append(f"webhookd {name} {choice}: not in its section")
    assert problems == [], "\n".join(problems)


def test_every_metric_the_daemon_exports_is_documented_and_no_other() -> None:
    """Metric families as metrics.py builds them (a counter's name gets `_total` when it is
    exported) against the `### \\`webhookd_…\\`` headings of docs/metrics.md."""
    source = (ROOT / "daemon" / "webhookd" / "metrics.py").read_text(encoding="utf-8")
    exported = {
        name + ("_total" if kind == "Counter" else "")
        for kind, name in re.findall(r"(Gauge|Counter|Histogram)MetricFamily\(\s*\"(\w+)\"", source)
    }
    assert len(exported) >= 25, exported
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^### `(webhookd_\w+)`", text, re.M))
    assert exported - documented == set(), "exported, not documented"
    assert documented - exported == set(), "documented, not exported"


def test_every_route_of_the_app_has_its_section_in_the_http_reference_and_no_other() -> None:
    """The routes as the API modules declare them (`web.get("/path", handler)`, …), path
    parameters written as the reference writes them ({tenant} as {t}, {id:.+} as {id}),
    against the `### \\`METHOD /path\\`` headings of docs/http-api.md."""
    routes = set()
    for module in sorted((ROOT / "daemon" / "webhookd").rglob("*.py")):
        source = module.read_text(encoding="utf-8")
        for method, declared in re.findall(
            r"web\.(get|post|put|delete|patch)\(\s*\"(/[^\"]*)\"", source
        ):
            path = re.sub(r"\{(\w+)(?::[^}]*)?\}", r"{\1}", declared).replace("{tenant}", "{t}")
            routes.add(f"{method.upper()} {path}")
    assert len(routes) >= 20, routes
    text = (DOCS / "http-api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^### `([A-Z]+ /\S*)`", text, re.M))
    # The HTML pages' routes (the forms they post to) are named in their section's prose.
    pages = text.split("\n## Pages and portal links\n", 1)[1].split("\n## ", 1)[0]
    documented |= {
        route
        for route in re.findall(r"`([A-Z]+ /\S*)`", pages)
        if route.split()[1].startswith(("/ui", "/portal"))
    }
    assert routes - documented == set(), "routes without a section in docs/http-api.md"
    assert documented - routes == set(), "sections in docs/http-api.md for no route"
