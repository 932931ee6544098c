"""The alerting that ships in deploy/: the Prometheus rules pass `promtool check rules`, their
unit tests (`promtool test rules`) fire every alert and keep each silent for healthy series,
every runbook link resolves in README.md, the Grafana dashboard is importable and its
queries are valid PromQL summed over instances, and every metric the rules and the
dashboard name is one a running daemon (on SQLite and on PostgreSQL) really exports.

promtool comes from Debian's `prometheus` package (.ci/run installs it); its server is not
used.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Receiver, StartDaemon, tenant, wait_for

RULES = ROOT / "deploy" / "prometheus" / "webhookd-rules.yml"
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "webhookd.json"
README = ROOT / "README.md"
EVENT = "CHECK_COMPLETED"

# Made by Prometheus itself for each target, not exported by the daemon.
PROMETHEUS_OWN = {"up"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool is not installed: `apt-get install prometheus` (.ci/run does)"
    return subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_queries() -> list[str]:
    """Every target's expression, as Grafana sends it once its variables are set."""
    return [
        target["expr"].replace("$__rate_interval", "5m").replace("$job", "webhookd")
        for panel in dashboard()["panels"]
        for target in panel["targets"]
    ]


# -- metric names in PromQL ----------------------------------------------------------------------

KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: the identifiers left once strings,
    label matchers, ranges and label lists (`by (…)`, `on (…)`, …) are taken out, that
    are neither a function or an aggregation (followed by "(") nor a keyword."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group().lower() in KEYWORDS:
            continue
        names.add(match.group())
    return names


def test_metric_names_are_read_from_promql() -> None:
    """The reader the checks below rely on: names, not functions, labels or durations."""
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"x", code=~"5.."}[5m])))'
        " / on (job, instance) group_left () b_total > bool 1e3 unless c offset 5m"
    ) == {"a_bucket", "b_total", "c"}
    assert metric_names("max by (job, tenant) (w) > 30 * 60") == {"w"}
    assert metric_names('up{job="webhookd"} == 0') == {"up"}


# -- the rules -----------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout, result.stdout


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no unit tests of the rules in deploy/prometheus/tests/"
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout, result.stdout


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        document = yaml.safe_load(path.read_text())
        assert document["rule_files"] == ["../webhookd-rules.yml"], path
        for case in document["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "alerts no unit test fires"
    assert names - silent == set(), "alerts no unit test shows silent"
    assert (fired | silent) - names == set(), "unit tests of alerts that do not exist"


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (code blocks skipped)."""
    anchors = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_every_alert_says_what_and_links_a_runbook_that_resolves() -> None:
    rules = alert_rules()
    assert len(rules) >= 9
    for rule in rules:
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        path, _, anchor = annotations["runbook"].partition("#")
        target = (RULES.parent / path).resolve()
        assert target == README, (rule["alert"], annotations["runbook"])
        assert anchor in github_anchors(target.read_text()), (rule["alert"], anchor)
    # The tenant alerts lead to the stalled-tenant walk-through.
    runbooks = {rule["alert"]: rule["annotations"]["runbook"] for rule in rules}
    for name in ("WebhookdTenantStalled", "WebhookdOldestWaiting"):
        assert runbooks[name] == "../../README.md#when-a-tenant-is-stalled"
    assert "\n## When a tenant is stalled\n" in README.read_text()


# -- the dashboard -------------------------------------------------------------------------------


def test_the_dashboard_is_importable() -> None:
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] and board["title"] and "id" not in board
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["job"]["datasource"] == source
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(panel["title"] for panel in board["panels"]).lower()
    for shown in ("queue depth", "oldest waiting", "deliveries by outcome", "latency", "ingest"):
        assert shown in titles, shown
    for panel in board["panels"]:
        assert panel["datasource"] == source, panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
            assert target["refId"] and target["expr"], panel["title"]


def test_the_dashboard_sums_over_instances_in_valid_promql(tmp_path: Path) -> None:
    """Per-tenant gauges come from the instance holding the tenant's lease, and counters
    count each instance's own work: every query aggregates over instances. Each one is
    checked by promtool, as a recording rule."""
    queries = dashboard_queries()
    for query in queries:
        assert re.match(r"(sum|max|min|topk|histogram_quantile)\b", query), query
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{n}", "expr": q} for n, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the metrics they name -------------------------------------------------------------------------


def named_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is used (an alert, a dashboard panel, a variable)."""
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    board = dashboard()
    for panel in board["panels"]:
        for target in panel["targets"]:
            for name in metric_names(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['title']!r}")
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])
            assert match, variable["definition"]
            used.setdefault(match.group(1), set()).add(f"variable {variable['name']}")
    return used


def sample_names(text: str) -> set[str]:
    """The names of the series a scrape holds (`_total`, `_bucket`, `_sum`, `_count` as
    Prometheus stores them)."""
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


async def test_every_metric_the_rules_and_the_dashboard_name_is_exported(
    receiver: Receiver, start_daemon: StartDaemon, postgres_url: str
) -> None:
    used = named_metrics()
    assert {"webhookd_delivery_duration_seconds_bucket", "webhookd_deliveries_total"} <= set(used)

    # On SQLite: deliveries that succeed and fail (the histogram and the counters get
    # series), ingest answered 202 and 404.
    receiver.script("/flaky", 503)
    daemon = await start_daemon(
        tenants={"ok": tenant(receiver.url("/ok")), "flaky": tenant(receiver.url("/flaky"))}
    )
    await daemon.ingest("ok", [{"event": EVENT}, {"event": EVENT}])
    await daemon.ingest("flaky", {"event": EVENT})
    await daemon.ingest("nobody", {"event": EVENT}, expect=404)
    await wait_for(lambda: len(receiver.at("/ok", ok_only=True)) == 2, timeout=10)
    await wait_for(lambda: len(receiver.at("/flaky", ok_only=True)) == 1, timeout=10)
    status, text = await daemon.request("GET", "/metrics")
    assert status == 200
    exported = sample_names(text)

    # On PostgreSQL, alone on its database: the cluster's metrics.
    on_postgres = await start_daemon(
        tenants={"acme": tenant(receiver.url("/acme"))},
        daemon={"database": postgres_url, "lease_seconds": 2.0},
        name="postgres.toml",
    )
    cluster = on_postgres.service.cluster
    assert cluster is not None
    await wait_for(lambda: cluster.holds("acme") and cluster.live_instances == 1, timeout=10)
    status, text = await on_postgres.request("GET", "/metrics")
    assert status == 200
    exported |= sample_names(text)

    missing = {name: sorted(where) for name, where in used.items() if name not in exported}
    for name in PROMETHEUS_OWN:
        missing.pop(name, None)
    assert missing == {}, f"named in deploy/ but not exported: {missing}"
