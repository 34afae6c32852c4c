"""The Grafana boards: generated JSON committed, Grafana conventions kept, every metric real.

The metric check reads what tunewatch and the installed vLLM declare from their source (the
constructors of prometheus_client's metric types), so a renamed or misspelt metric in a
board or a rule fails here rather than as an empty panel in production.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import dashboards
from dashboards.common import EVENT_RANGE, RATE_INTERVAL
from dashboards.promql import metric_names, unguarded_divisions

ROOT = Path(__file__).resolve().parents[2]
NOT_SHIPPED = {"tests", "bench"}
RULE_FILES = sorted((ROOT / "dashboards" / "alerts").glob("*.yml"))
# Series Prometheus makes itself, per target and for alerting rules.
PROMETHEUS_BUILTINS = {
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
    "ALERTS",
    "ALERTS_FOR_STATE",
}
# The series prometheus_client exposes for each metric type, as suffixes of the base name.
SUFFIXES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("_sum", "_count", "_created"),
    "Info": ("_info",),
    "Enum": ("",),
}
UNKNOWN_TYPE = ("", "_total", "_bucket", "_sum", "_count")


# prometheus_client strips these from a declared name before adding its own suffixes.
STRIPPED = {"Counter": "_total", "Info": "_info"}


def _series(kind: str | None, name: str) -> set[str]:
    if kind is None:
        return {name + suffix for suffix in UNKNOWN_TYPE}
    base = name.removesuffix(STRIPPED.get(kind, ""))
    return {base + suffix for suffix in SUFFIXES[kind]}


def _string(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _declared_name(call: ast.Call) -> str | None:
    """The metric name a constructor call declares, namespace and subsystem joined."""
    keywords = {k.arg: k.value for k in call.keywords}
    name = _string(call.args[0] if call.args else keywords.get("name"))
    if name is None:
        return None
    parts = [_string(keywords.get("namespace")), _string(keywords.get("subsystem")), name]
    return "_".join(p for p in parts if p)


def _prometheus_client_types(tree: ast.Module) -> dict[str, str]:
    """How the module calls prometheus_client's types: `Counter`, `pc.Counter` -> 'Counter'."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client":
            names.update({a.asname or a.name: a.name for a in node.names if a.name in SUFFIXES})
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "prometheus_client":
                    local = alias.asname or alias.name
                    names.update({f"{local}.{kind}": kind for kind in SUFFIXES})
    return names


def _called(call: ast.Call) -> str:
    return ast.unparse(call.func)


def _shipped_sources() -> Iterator[Path]:
    """Every module of every top-level package the project ships, wherever a refactor puts it."""
    for package in sorted(ROOT.iterdir()):
        if (package / "__init__.py").exists() and package.name not in NOT_SHIPPED:
            yield from sorted(package.rglob("*.py"))


def tunewatch_metrics() -> set[str]:
    defined = set()
    for path in _shipped_sources():
        tree = ast.parse(path.read_text(), str(path))
        types = _prometheus_client_types(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called(node) in types:
                name = _declared_name(node)
                if name:
                    defined |= _series(types[_called(node)], name)
    return defined


def vllm_metrics() -> set[str]:
    """vLLM's metric names, typed by the class it builds them with (`self._counter_cls(...)`)."""
    spec = importlib.util.find_spec("vllm")
    assert spec and spec.submodule_search_locations, "vLLM is not installed"
    typed, untyped = {}, set()
    for location in spec.submodule_search_locations:
        for path in Path(location).rglob("*.py"):
            text = path.read_text(errors="replace")
            if '"vllm:' not in text:
                continue
            for node in ast.walk(ast.parse(text, str(path))):
                name = _declared_name(node) if isinstance(node, ast.Call) else _string(node)
                if not (name and re.fullmatch(r"vllm:[\w:]+", name)):
                    continue
                kind = _vllm_kind(_called(node)) if isinstance(node, ast.Call) else None
                if kind:
                    typed[name] = kind
                else:
                    untyped.add(name)
    defined = {series for name, kind in typed.items() for series in _series(kind, name)}
    return defined.union(*(_series(None, name) for name in untyped - typed.keys()))


def _vllm_kind(called: str) -> str | None:
    lowered = called.lower()
    return next(
        (k for k in ("Counter", "Histogram", "Summary", "Gauge") if k.lower() in lowered), None
    )


@pytest.fixture(scope="module")
def defined_metrics() -> set[str]:
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    return tunewatch_metrics() | vllm_metrics() | PROMETHEUS_BUILTINS | recorded


def undefined(exprs: dict[str, str], defined: set[str]) -> dict[str, set[str]]:
    """Where each expression uses a metric nothing declares, and which."""
    missing = {where: metric_names(expr) - defined for where, expr in exprs.items()}
    return {where: names for where, names in missing.items() if names}


def _rules() -> list[dict]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def _models() -> dict[str, dict]:
    return {board.name: json.loads(dashboards.render(board)) for board in dashboards.BOARDS}


def _panels() -> Iterator[tuple[str, dict]]:
    for name, model in _models().items():
        for panel in model["panels"]:
            if panel["type"] != "row":
                yield name, panel


def _panel_exprs() -> dict[str, str]:
    return {
        f"{name} / {panel['title']} / {target['refId']}": target["expr"]
        for name, panel in _panels()
        for target in panel["targets"]
    }


def _annotation_exprs() -> dict[str, str]:
    return {
        f"{name} / annotation {annotation['name']}": annotation["expr"]
        for name, model in _models().items()
        for annotation in model["annotations"]["list"]
    }


def _variable(model: dict, name: str) -> dict:
    return next(v for v in model["templating"]["list"] if v["name"] == name)


def test_committed_json_is_what_the_code_generates():
    committed = {path.stem for path in dashboards.GRAFANA_DIR.glob("*.json")}
    assert committed == {board.name for board in dashboards.BOARDS}, "run `python -m dashboards`"
    for board in dashboards.BOARDS:
        path = dashboards.GRAFANA_DIR / f"{board.name}.json"
        assert path.read_text() == dashboards.render(board), f"{path}: run `python -m dashboards`"


def test_boards_have_stable_uids_and_the_tunewatch_tag():
    for name, model in _models().items():
        assert model["uid"] == f"tunewatch-{name}"
        assert model["tags"] == ["tunewatch"]


def test_every_board_has_the_datasource_and_adapter_variables():
    for model in _models().values():
        datasource = _variable(model, "datasource")
        assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
        adapter = _variable(model, "adapter")
        assert adapter["type"] == "query" and adapter["multi"] and adapter["includeAll"]
        assert adapter["datasource"]["uid"] == "${datasource}"
        assert re.fullmatch(r"label_values\(tunewatch_\w+, adapter\)", adapter["query"])


def test_every_board_marks_retrains_promotions_and_rollbacks():
    for model in _models().values():
        events = {a["name"]: a["expr"] for a in model["annotations"]["list"]}
        assert 'tunewatch_retrain_trigger_decisions_total{action="retrain"}' in events["Retrains"]
        assert 'tunewatch_rollouts_total{outcome="promoted"}' in events["Promotions"]
        assert 'tunewatch_rollouts_total{outcome="rolled_back"}' in events["Rollbacks"]
        for annotation in model["annotations"]["list"]:
            assert annotation["datasource"]["uid"] == "${datasource}"


def test_every_target_has_its_own_ref_id_and_queries_the_datasource_variable():
    for name, panel in _panels():
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(set(ref_ids)) == len(ref_ids), (name, panel["title"])
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_panel_titles_are_unique_within_a_board_and_say_what_to_read():
    for model in _models().values():
        titles = [p["title"] for p in model["panels"]]
        assert len(set(titles)) == len(titles)
        assert all(p["description"] for p in model["panels"] if p["type"] != "row")


def _ranges(expr: str) -> list[str]:
    """The range of every rate(), irate() and increase() in `expr`."""
    return re.findall(r"\b(?:rate|irate|increase)\((?:[^()\[]|\([^()]*\))*\[([^\]]+)\]", expr)


def test_rates_run_over_the_rate_interval_and_annotations_over_their_fixed_window():
    assert _ranges('sum(rate(x{a=~"b"}[5m])) / increase(y[$__rate_interval])') == [
        "5m",
        "$__rate_interval",
    ]
    panel_ranges = {r for expr in _panel_exprs().values() for r in _ranges(expr)}
    assert panel_ranges == {RATE_INTERVAL}
    annotation_ranges = {r for expr in _annotation_exprs().values() for r in _ranges(expr)}
    assert annotation_ranges == {EVENT_RANGE}


def test_every_divisor_is_guarded_against_zero():
    exprs = {**_panel_exprs(), **_annotation_exprs()}
    assert {where: d for where, expr in exprs.items() if (d := unguarded_divisions(expr))} == {}


def test_unguarded_divisions_finds_a_bare_divisor():
    assert unguarded_divisions("sum(rate(a[1m])) / sum(rate(b[1m]))") == ["sum(rate(b[1m]))"]
    assert unguarded_divisions("(a - b) / (sum by (x) (c) > 0)") == []
    assert unguarded_divisions("a / on (check) (b > 0)") == []
    assert unguarded_divisions("a / 100") == []
    assert unguarded_divisions("a / (b)") == ["b"]


def test_every_metric_a_board_uses_is_declared(defined_metrics):
    variables = {
        f"{name} / variable adapter": re.sub(
            r"label_values\((.*), adapter\)", r"\1", _variable(model, "adapter")["query"]
        )
        for name, model in _models().items()
    }
    exprs = {**_panel_exprs(), **_annotation_exprs(), **variables}
    assert undefined(exprs, defined_metrics) == {}


@pytest.mark.skipif(not RULE_FILES, reason="no rule files yet")
def test_every_metric_a_rule_uses_is_declared(defined_metrics):
    exprs = {rule.get("alert") or rule["record"]: rule["expr"] for rule in _rules()}
    assert undefined(exprs, defined_metrics) == {}


def test_the_metric_check_catches_a_misspelt_name(defined_metrics):
    exprs = {
        "gateway": "sum(rate(tunewatch_requests_totl[1m]))",
        "engine": "vllm:num_requests_runing",
        "histogram without its suffix": "rate(tunewatch_request_duration_seconds[1m])",
        "removed from vLLM": "vllm:gpu_cache_usage_perc",
        "vLLM counter without _total": "rate(vllm:num_preemptions[1m])",
        "fine": 'rate(vllm:num_preemptions_total[1m]) + on () up{job="vllm"}',
    }
    assert undefined(exprs, defined_metrics) == {
        "gateway": {"tunewatch_requests_totl"},
        "engine": {"vllm:num_requests_runing"},
        "histogram without its suffix": {"tunewatch_request_duration_seconds"},
        "removed from vLLM": {"vllm:gpu_cache_usage_perc"},
        "vLLM counter without _total": {"vllm:num_preemptions"},
    }


def test_metric_names_skips_functions_labels_keywords_and_numbers():
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(x_bucket{adapter=~"$adapter", '
        'le!="+Inf"}[$__rate_interval]))) > bool 1e3 or sum without (instance) '
        "(tunewatch:errors:ratio_rate5m offset 5m) / on (job) group_left (adapter) "
        'label_replace(y, "dst", "$1", "src", "(.*)") unless {__name__="z"}'
    )
    assert metric_names(expr) == {"x_bucket", "tunewatch:errors:ratio_rate5m", "y", "z"}


def test_panel_queries_are_plain_promql_and_name_the_event_only_panels():
    queries = dashboards.panel_queries("30s")
    assert len(queries) == len(_panel_exprs()) + len(_annotation_exprs())
    assert not [q.expr for q in queries if "$" in q.expr]
    assert all("[30s]" in q.expr or "[2m]" in q.expr for q in queries if "rate(" in q.expr)
    event_only = {(q.board, q.panel) for q in queries if q.only_after}
    assert ("tunewatch / Loop", "Training jobs") in event_only
    assert ("tunewatch / Overview", "Rollbacks") in event_only
    assert ("tunewatch / Overview", "Requests") not in event_only
    for board in dashboards.BOARDS:
        panels = {q.panel for q in queries if q.board == board.dashboard.title}
        assert set(board.only_after) <= panels
