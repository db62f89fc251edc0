"""contrib/: the alert rules pass promtool's checks and unit tests, the scrape config is valid, and
every metric the rules and the Grafana dashboard query is one a running box exports, with the
labels they select on, so the three cannot drift apart."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.fleet.common import api_with_metrics, scrape

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "contrib" / "prometheus"
DASHBOARD = ROOT / "contrib" / "grafana" / "scanbox-fleet.json"
# what the rules and the dashboard may query besides the box's own: Prometheus' `up`, node_exporter
NOT_THE_BOX = {"up", "node_filesystem_avail_bytes", "node_filesystem_size_bytes"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}

def _promtool(*args: str, cwd: Path) -> str:
    tool = shutil.which("promtool")
    if tool is None:
        raise AssertionError("promtool is missing: bootstrap.sh installs Debian's prometheus package")
    proc = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    assert "SUCCESS: 9 rules found" in _promtool("check", "rules", "scanbox-rules.yml", cwd=PROMETHEUS)
    out = _promtool("test", "rules", "scanbox-rules.test.yml", cwd=PROMETHEUS)
    assert "SUCCESS" in out and "FAILED" not in out


def test_every_alert_has_a_unit_test():
    rules = {r["alert"] for g in yaml.safe_load((PROMETHEUS / "scanbox-rules.yml").read_text())["groups"]
             for r in g["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "scanbox-rules.test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])}
    assert rules == tested


def test_the_scrape_config_example_is_valid(tmp_path):
    for name in ("prometheus.yml", "scanbox-rules.yml"):
        shutil.copy(PROMETHEUS / name, tmp_path / name)
    (tmp_path / "scanbox-metrics.token").write_text("a-metrics-token\n")
    from agent import tls

    tls.make(tls.BoxCertificate(tmp_path / "scanbox-boxes.pem", tmp_path / "box.key"))  # a box's certificate
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml", cwd=tmp_path)


def queries() -> dict[str, str]:
    """Every PromQL expression of the rules and the dashboard, by where it is."""
    out = {}
    for group in yaml.safe_load((PROMETHEUS / "scanbox-rules.yml").read_text())["groups"]:
        for rule in group["rules"]:
            out["rule %s" % rule["alert"]] = rule["expr"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out["panel %r %s" % (panel["title"], target["refId"])] = target["expr"]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query["query"])
            assert match, "variable %s: %s" % (var["name"], query["query"])
            out["variable %s" % var["name"]] = "%s{%s!=\"\"}" % match.groups()
    return out


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it matches on or groups by) for each selector of a PromQL
    expression. Enough of PromQL for our queries: strings, ranges, functions, aggregations."""
    expr = re.sub(r"\$\{?\w+\}?", "5m", expr)  # Grafana's variables
    found: list[tuple[str, set[str]]] = []
    grouping = set()
    for labels in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        grouping |= {name.strip() for name in labels.split(",") if name.strip()}
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", expr):
        name, matchers, call = match.groups()
        if call or name.lower() in KEYWORDS or re.fullmatch(r"[0-9.e+]+", name):
            continue
        labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", matchers or ""))
        found.append((name, labels))
    # a grouping label must exist on at least one selector of the expression
    return [(name, labels) for name, labels in found] + ([("", grouping)] if grouping else [])


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_the_rules_and_the_dashboard_query_only_what_a_box_exports(box, http, tmp_path):
    # a scanner that is there and one that is not (an alarm), one scan verified
    await box.start(api=api_with_metrics(), sources={
        "counter": {"driver": "serial_scanner", "port": str(box.scanner.path), "reconnect_max_s": 0.2},
        "kiosk": {"driver": "serial_scanner", "port": str(tmp_path / "absent"), "reconnect_max_s": 0.2}})
    box.scan(box.resident().static_qr)
    await box.events.wait("verification", lambda d: d["verification"]["ok"])
    status, text = await scrape(http, "http://%s:%d/metrics" % box.daemon.http.address)
    assert status == 200
    exported = exported_labels(text)
    problems = []
    for where, expr in queries().items():
        names = [name for name, _ in selectors(expr) if name]
        if not names:
            problems.append("%s: no metric found in %r" % (where, expr))
        for name, labels in selectors(expr):
            if not name:
                if not any(labels <= exported.get(n, set()) | {"instance", "job"} for n in names
                           if n in exported) and not set(names) & NOT_THE_BOX:
                    problems.append("%s: groups by %s, which no metric it reads has" % (where, sorted(labels)))
                continue
            if name in NOT_THE_BOX:
                continue
            if name not in exported:
                problems.append("%s: %s is not exported" % (where, name))
                continue
            missing = labels - exported[name] - {"instance", "job"}  # added by Prometheus
            if missing:
                problems.append("%s: %s has no label %s" % (where, name, sorted(missing)))
    assert not problems, "\n".join(problems)


def exported_labels(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, from an exposition (families without samples too, by their
    TYPE line: a label-less gauge or a labelled family nothing has touched yet)."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                        "summary": ["_sum", "_count", ""]}.get(kind, [""])
            for suffix in suffixes:
                out.setdefault(name + suffix if not name.endswith(suffix) else name, set())
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            name = name.split(" ")[0]
            labels = set(re.findall(r"(\w+)=\"", rest.rsplit("}", 1)[0])) if rest else set()
            out.setdefault(name, set()).update(labels)
    return out


def test_the_query_parser_finds_names_and_labels():
    assert selectors('sum by (le, operation) (rate(a_bucket{x="1",y=~"$v"}[$__rate_interval]))') == [
        ("a_bucket", {"x", "y"}), ("", {"le", "operation"})]
    assert selectors("count(up{job=\"scanbox\"} == 0) or vector(0)") == [("up", {"job"})]
    assert [n for n, _ in selectors("abs(m_offset) > 60 and on (instance) n_total")] == ["m_offset", "n_total", ""]
