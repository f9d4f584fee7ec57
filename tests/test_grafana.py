"""The Grafana dashboard shipped in `manifests/grafana/` must import cleanly and query only what
vllm-chill really exports.

Structure: unique panel ids, a grid position for each panel and no two overlapping, every
query on the `${datasource}` variable (no hard-coded datasource uid). Queries: every metric
name, label matcher, grouping label (`by (...)`) and legend `{{label}}` in every PromQL
expression exists in what `Metrics` exports, and every series selector matches a sample of a
real `/metrics` scrape, taken from the whole proxy run in-process after loads, a failed load,
a 503, an eviction and an unload."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.configs import make_settings
from tests.support import chat, spec
from vllm_chill import ModelSwitchMiddleware, StaticRegistry
from vllm_chill.backends.sim._app import SimApp
from vllm_chill.observability._metrics import Metrics
from vllm_chill.testing import ASGIUpstream, FakeBackend

DASHBOARD_PATH = Path(__file__).resolve().parents[1] / "manifests" / "grafana" / "vllm-chill.json"
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text())
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: What Grafana puts in place of its variables before the query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "6h",
    "$model": ".*",
}

#: PromQL functions and aggregation operators the dashboard may call: anything else is a typo.
FUNCTIONS = frozenset(
    {"sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile"}
    | {"rate", "irate", "increase", "delta", "changes", "resets", "deriv"}
    | {"histogram_quantile", "clamp_min", "clamp_max", "abs", "ceil", "floor", "round"}
    | {"vector", "scalar", "absent", "label_replace", "time"}
    | {f"{agg}_over_time" for agg in ("avg", "max", "min", "sum", "count", "last")}
)
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
STRING = r'"(?:[^"\\]|\\.)*"'
SELECTOR = re.compile(rf"(?P<name>{NAME})?\s*\{{(?P<body>(?:[^{{}}\"]|{STRING})*)\}}")
MATCHER = re.compile(rf"\s*(?P<label>[a-zA-Z_]\w*)\s*(?P<op>=~|!~|!=|=)\s*(?P<value>{STRING})\s*,?")
GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\((?P<labels>[^)]*)\)"
)
CALL = re.compile(rf"(?P<name>{NAME})\s*\(")
BARE_NAME = re.compile(rf"(?<![\w.]){NAME}")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
PLACEHOLDER = "__selector__"


@dataclass(frozen=True)
class Selector:
    metric: str
    #: (label, operator, value) for each matcher, the value unquoted.
    matchers: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class Query:
    where: str
    expr: str
    selectors: tuple[Selector, ...]
    grouping: frozenset[str]
    calls: frozenset[str]
    #: `{{label}}`s in the legend, titles or tags Grafana fills from the result's labels.
    legend: frozenset[str]


def parse(where: str, expr: str, legend: str = "") -> Query:
    """The series selectors, grouping labels and function calls of a PromQL expression."""
    text = expr
    for variable, value in GRAFANA_VARIABLES.items():
        text = text.replace(variable, value)
    assert "$" not in text, f"{where}: an unknown Grafana variable in {expr!r}"
    selectors: list[Selector] = []

    def cut(match: re.Match[str]) -> str:
        body = match["body"]
        assert MATCHER.sub("", body).strip() == "", f"{where}: cannot read matchers {body!r}"
        matchers = tuple(
            (m["label"], m["op"], json.loads(m["value"])) for m in MATCHER.finditer(body)
        )
        assert match["name"], f"{where}: a selector without a metric name in {expr!r}"
        selectors.append(Selector(match["name"], matchers))
        return f" {PLACEHOLDER} "

    text = SELECTOR.sub(cut, text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    grouping = frozenset(
        label.strip()
        for match in GROUPING.finditer(text)
        for label in match["labels"].split(",")
        if label.strip()
    )
    text = GROUPING.sub(" ", text)
    calls = frozenset(m["name"] for m in CALL.finditer(text))
    text = CALL.sub(" (", text)
    for name in BARE_NAME.findall(text):
        if name != PLACEHOLDER and name.lower() not in KEYWORDS:
            selectors.append(Selector(name))
    return Query(
        where,
        expr,
        tuple(selectors),
        grouping,
        calls,
        frozenset(LEGEND_LABEL.findall(legend)),
    )


def panels() -> Iterator[dict[str, Any]]:
    for panel in DASHBOARD["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries() -> list[Query]:
    """Every PromQL expression of the dashboard: panels' targets and annotations."""
    found = []
    for panel in panels():
        for target in panel.get("targets", []):
            where = f"panel {panel['id']} {panel['title']!r} target {target['refId']}"
            found.append(parse(where, target["expr"], target.get("legendFormat", "")))
    for annotation in DASHBOARD["annotations"]["list"]:
        if "expr" in annotation:
            legend = " ".join(
                [
                    annotation.get("titleFormat", ""),
                    annotation.get("textFormat", ""),
                    *(f"{{{{{k}}}}}" for k in annotation.get("tagKeys", "").split(",") if k),
                ]
            )
            found.append(parse(f"annotation {annotation['name']!r}", annotation["expr"], legend))
    return found


QUERIES = queries()


def variable(name: str) -> dict[str, Any]:
    [found] = [v for v in DASHBOARD["templating"]["list"] if v["name"] == name]
    return dict(found)


# -- structure ------------------------------------------------------------------------------


def test_the_dashboard_is_importable_with_its_own_identity() -> None:
    assert DASHBOARD["uid"] == "vllm-chill"
    assert DASHBOARD["title"] == "vllm-chill"
    assert DASHBOARD["schemaVersion"] >= 36
    assert DASHBOARD["id"] is None  # Grafana assigns it on import
    assert re.fullmatch(r"\d+[smh]", DASHBOARD["refresh"])
    assert DASHBOARD["time"]["from"].startswith("now-")
    assert "__inputs" not in DASHBOARD  # the sidecar would not substitute them


def test_the_datasource_and_model_variables() -> None:
    datasource = variable("datasource")
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    model = variable("model")
    assert model["type"] == "query"
    assert model["datasource"] == DATASOURCE
    assert model["definition"] == "label_values(vllm_chill_requests_total, model)"
    assert model["query"]["query"] == model["definition"]
    assert model["multi"] and model["includeAll"] and model["allValue"] == ".*"


def test_no_datasource_is_hard_coded() -> None:
    def walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    yield path, value
                yield from walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from walk(value, f"{path}[{index}]")

    found = list(walk(DASHBOARD, "$"))
    assert found
    for path, value in found:
        assert value == DATASOURCE, f"{path}: {value!r}"


def test_panel_ids_are_unique_and_each_panel_queries_the_variable() -> None:
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), ids
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), panel["id"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_every_panel_has_a_place_and_none_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in DASHBOARD["panels"]:  # collapsed rows' panels are laid out when expanded
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}, panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"


def test_the_panels_an_operator_needs_are_there() -> None:
    exprs = " ".join(q.expr for q in QUERIES)
    for needed in (
        'vllm_chill_requests_total{model=~"$model", status="503"}',
        "histogram_quantile(0.95, sum by (le, model) (rate(vllm_chill_request_duration",
        "vllm_chill_requests_in_flight",
        "vllm_chill_requests_waiting",
        "vllm_chill_active_model",
        "vllm_chill_model_resident",
        "sum by (result, kind) (increase(vllm_chill_model_switches_total",
        "histogram_quantile(0.5, sum by (le, model) (rate(vllm_chill_switch_duration",
        "sum by (reason) (increase(vllm_chill_evictions_total",
        "sum by (direction, reason) (increase(vllm_chill_scale_events_total",
    ):
        assert needed in exprs, needed


# -- the queries against what vllm-chill exports ------------------------------------------


def test_the_parser_reads_selectors_groupings_and_calls() -> None:
    query = parse(
        "example",
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$model", '
        'x="}"}[$__rate_interval]))) / on (model) sum(b) > 1e-9',
        "{{model}} p95",
    )
    assert query.selectors == (
        Selector("a_bucket", (("model", "=~", ".*"), ("x", "=", "}"))),
        Selector("b"),
    )
    assert query.grouping == {"le", "model"}
    assert query.calls == {"histogram_quantile", "sum", "rate"}
    assert query.legend == {"model"}


def exported_by_metrics() -> dict[str, frozenset[str]]:
    """Sample name -> its label names, from a `Metrics` with a sample in every family."""
    metrics = Metrics()
    metrics.count_request("a", 200)
    metrics.count_request("b", 503)
    model = metrics.model("a")
    model.duration.observe(0.3)
    model.in_flight.inc()
    model.waiting.inc()
    metrics.switches.labels("", "a", "success", "cold").inc()
    metrics.switches.labels("a", "b", "failure", "wake").inc()
    metrics.switch_duration.labels("a", "success").observe(12)
    metrics.set_active({"a"}, {"a", "b"}, ["a", "b"])
    metrics.evictions.labels("idle, least recently used").inc()
    metrics.scale_events.labels("up", "request").inc()
    metrics.refusals.labels("m", "model_switching_in_progress").inc()
    exported: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        assert family.samples, f"{family.name}: drive it above so that it has samples"
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in exported.items()}


EXPORTED = exported_by_metrics()


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.where)
def test_every_name_and_label_of_a_query_is_exported(query: Query) -> None:
    assert query.selectors, f"{query.where}: no series in {query.expr!r}"
    assert query.calls <= FUNCTIONS, f"{query.where}: unknown {query.calls - FUNCTIONS}"
    for selector in query.selectors:
        assert selector.metric in EXPORTED, f"{query.where}: {selector.metric} is not exported"
        labels = EXPORTED[selector.metric]
        for label, _, _ in selector.matchers:
            assert label in labels, f"{query.where}: {selector.metric} has no label {label}"
        missing = query.grouping - labels
        assert not missing, f"{query.where}: {selector.metric} has no label {missing}"
    # A legend can name only the labels the result keeps.
    kept = query.grouping or frozenset.intersection(*(EXPORTED[s.metric] for s in query.selectors))
    assert query.legend <= kept, f"{query.where}: the legend names {query.legend - kept}"


def test_the_model_variable_reads_an_exported_label() -> None:
    match = re.fullmatch(rf"label_values\(({NAME}),\s*(\w+)\)", variable("model")["definition"])
    assert match is not None
    assert match[2] in EXPORTED[match[1]]


def test_every_metric_family_is_on_the_dashboard() -> None:
    used = {s.metric for q in QUERIES for s in q.selectors}
    families = {name.removesuffix("_count") for name in EXPORTED if name.endswith("_count")}
    families |= {n for n in EXPORTED if not n.endswith(("_count", "_sum", "_bucket", "_created"))}
    for family in families:
        assert any(m == family or m.startswith(f"{family}_") for m in used), family


# -- the queries against a real scrape -------------------------------------------------------


async def scrape_after_switches() -> str:
    """`/metrics` of the whole proxy after a load, a failed load (answered 503), a load that
    evicts, and an unload (FakeBackend, simulated vLLM apps in process)."""
    names = ("alpha", "broken", "beta")
    apps = {}
    for name in names:
        app = SimApp(name, tokens_per_second=0, root=f"org/{name}")
        app.ready = True
        apps[f"http://{name}.models"] = app
    backend = FakeBackend(
        base_urls={n: f"http://{n}.models" for n in names}, failures={"broken": "no weights"}
    )
    proxy = ModelSwitchMiddleware(
        registry=StaticRegistry(spec(n) for n in names),
        backend=backend,
        transport=ASGIUpstream(apps),
        settings=make_settings(max_wait=10, quiet_gap=0, min_residency=0),
    )
    async with (
        proxy.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://proxy") as c,
    ):
        for name, status in (("alpha", 200), ("broken", 503), ("beta", 200)):
            reply = await c.post("/v1/chat/completions", json=chat(name, max_tokens=2))
            assert reply.status_code == status, reply.text
        assert (await c.post("/proxy/unload")).status_code == 202
        reply = await c.get("/metrics")
        assert reply.status_code == 200
        return reply.text


def matches(labels: dict[str, str], matchers: tuple[tuple[str, str, str], ...]) -> bool:
    for label, op, value in matchers:
        actual = labels.get(label, "")
        found = {
            "=": actual == value,
            "!=": actual != value,
            "=~": re.fullmatch(value, actual) is not None,
            "!~": re.fullmatch(value, actual) is None,
        }[op]
        if not found:
            return False
    return True


@pytest.mark.anyio
async def test_every_series_a_query_selects_is_in_a_real_scrape() -> None:
    samples = [
        (sample.name, sample.labels)
        for family in text_string_to_metric_families(await scrape_after_switches())
        for sample in family.samples
    ]
    scraped = {name for name, _ in samples}
    assert {n for n in EXPORTED if not n.endswith("_created")} <= scraped
    for query in QUERIES:
        for selector in query.selectors:
            assert any(
                name == selector.metric and matches(labels, selector.matchers)
                for name, labels in samples
            ), f"{query.where}: no sample for {selector} in /metrics"
