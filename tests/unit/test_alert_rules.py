"""The Prometheus rules: promtool accepts them and passes their unit tests, and every alert
carries what a person paged at night needs (severity, component, summary, description, a
runbook section that exists) and is tested both firing and quiet."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "dashboards" / "alerts"
ALERT_FILE = RULES_DIR / "tunewatch.rules.yml"
RECORDING_FILE = RULES_DIR / "recording.rules.yml"
TEST_FILES = sorted((RULES_DIR / "tests").glob("*.test.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/tunewatch/tunewatch/blob/main/docs/runbook.md"

SEVERITIES = {"critical", "warning", "info"}
COMPONENTS = {"gateway", "engine", "monitor", "controller", "rollout", "alerting"}
# Watchdog is the name Alertmanager set-ups route their dead man's switch on.
ALERT_NAME = re.compile(r"^(Tunewatch[A-Z][A-Za-z0-9]+|Watchdog)$")
ALWAYS_FIRING = {"Watchdog"}
ALERT_GROUP = re.compile(r"^tunewatch-[a-z]+(-[a-z]+)*$")
RECORDING_GROUP = re.compile(r"^tunewatch-[a-z]+(-[a-z]+)*\.rules$")
# level:metric:operations (https://prometheus.io/docs/practices/rules/)
RECORD_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")
RANGE = re.compile(r"\[(\d+[smhdw])\]")


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _groups(path: Path) -> list[dict[str, Any]]:
    return _load(path)["groups"]


def _alerts() -> list[dict[str, Any]]:
    return [rule for group in _groups(ALERT_FILE) for rule in group["rules"]]


def _records() -> list[dict[str, Any]]:
    return [rule for group in _groups(RECORDING_FILE) for rule in group["rules"]]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make system-deps` (Debian's prometheus)")
    return subprocess.run(
        [promtool, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=300
    )


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _runbook_anchors() -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    return {_github_anchor(heading) for heading in headings}


def _alert_cases() -> list[dict[str, Any]]:
    return [
        case
        for path in TEST_FILES
        for group in _load(path)["tests"]
        for case in group.get("alert_rule_test", [])
    ]


def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", ALERT_FILE.name, RECORDING_FILE.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    assert TEST_FILES, "no promtool unit tests in dashboards/alerts/tests/"
    result = _promtool("test", "rules", *(str(p.relative_to(RULES_DIR)) for p in TEST_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_and_recording_rules_live_in_their_own_files() -> None:
    assert all("alert" in rule and "record" not in rule for rule in _alerts())
    assert all("record" in rule and "alert" not in rule for rule in _records())


def test_groups_are_named_by_convention() -> None:
    for group in _groups(ALERT_FILE):
        assert ALERT_GROUP.match(group["name"]), group["name"]
    for group in _groups(RECORDING_FILE):
        assert RECORDING_GROUP.match(group["name"]), group["name"]


def test_rules_are_named_by_convention() -> None:
    names = [rule["alert"] for rule in _alerts()]
    assert len(names) == len(set(names)), "an alert name is used twice"
    for name in names:
        assert ALERT_NAME.match(name), name
    for rule in _records():
        assert RECORD_NAME.match(rule["record"]), rule["record"]


def test_each_windowed_ratio_reads_its_own_window() -> None:
    """`..._rate30m` computed over [30m] only: the copies per window must not drift apart."""
    for rule in _records():
        window = re.search(r"_rate(\d+[smhdw])$", rule["record"])
        if window:
            assert set(RANGE.findall(rule["expr"])) == {window[1]}, rule["record"]


@pytest.mark.parametrize("rule", _alerts(), ids=lambda rule: rule["alert"])
def test_alert_carries_labels_and_annotations(rule: dict[str, Any]) -> None:
    labels, annotations = rule.get("labels", {}), rule.get("annotations", {})
    assert labels.get("severity") in SEVERITIES
    assert labels.get("component") in COMPONENTS
    assert annotations.get("summary", "").strip()
    assert annotations.get("description", "").strip()
    assert annotations.get("runbook_url") == f"{RUNBOOK_URL}#{rule['alert'].lower()}"


def test_every_alert_has_its_runbook_section() -> None:
    anchors = _runbook_anchors()
    missing = [rule["alert"] for rule in _alerts() if rule["alert"].lower() not in anchors]
    assert not missing, f"docs/runbook.md has no section for {missing}"


def test_every_runbook_alert_section_is_an_alert() -> None:
    text = RUNBOOK.read_text().split("\n## Alerts\n", 1)[1]
    sections = set(re.findall(r"^### (\S+)$", text, flags=re.MULTILINE))
    assert sections == {rule["alert"] for rule in _alerts()}


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases = _alert_cases()
    for name in (rule["alert"] for rule in _alerts()):
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"{name}: no test where it fires"
        if name not in ALWAYS_FIRING:
            assert any(not case.get("exp_alerts") for case in mine), f"{name}: never tested quiet"


def test_unit_tests_evaluate_every_group_in_a_fixed_order() -> None:
    """promtool orders the groups a file does not name at random: an alert could read the
    ratios of the previous evaluation in one run and of this one in the next."""
    recording = [group["name"] for group in _groups(RECORDING_FILE)]
    alerting = [group["name"] for group in _groups(ALERT_FILE)]
    for path in TEST_FILES:
        order = _load(path).get("group_eval_order", [])
        assert sorted(order) == sorted(recording + alerting), path.name
        assert order[: len(recording)] == recording, f"{path.name}: recording groups first"
