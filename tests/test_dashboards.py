"""The Grafana dashboards in dashboards/: their structure (fast), then every panel's query and
every variable's query answered by a real Prometheus (Debian's package) scraping a real local
`metaopt train` run, and every metric they name found in that run's /metrics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.inrun_spec import e2e_with_eval
from tests.ports import free_port

ROOT = pathlib.Path(__file__).parent.parent
DASHBOARDS = ROOT / "dashboards"
# A uid is part of every link to a dashboard: changing one breaks bookmarks and alert links.
UIDS = {"overview.json": "metaopt-overview", "task_families.json": "metaopt-task-families"}
PANEL_TYPES = {"timeseries", "stat"}
PROMETHEUS = "/usr/bin/prometheus"
JOB_ID = "dash"
# What Grafana puts in place of its variables, for a Prometheus scraping every second.
GRAFANA_VARIABLES = {"job_id": JOB_ID, "task_family": ".+", "__rate_interval": "15s",
                     "__interval": "5s", "__range": "1m"}

# --- reading dashboards and expressions -----------------------------------------------------------

def _load(name: str) -> dict:
    return json.loads((DASHBOARDS / name).read_text())


def _panels(panels: list[dict]):
    for panel in panels:
        if panel.get("type") == "row":
            yield from _panels(panel.get("panels", []))
        else:
            yield panel


def _targets():
    """(id, dashboard file, panel, target) for every query of every panel."""
    for name in sorted(UIDS):
        for panel in _panels(_load(name)["panels"]):
            for target in panel.get("targets", []):
                yield pytest.param(name, panel, target,
                                   id=f"{name}:{panel['id']}:{panel['title']}:{target.get('refId')}")


def _variable(dashboard: dict, name: str) -> dict:
    found = [v for v in dashboard["templating"]["list"] if v["name"] == name]
    assert len(found) == 1, f"{dashboard['uid']}: expected one variable {name!r}, found {len(found)}"
    return found[0]


def _variable_query(variable: dict) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def substitute(expr: str) -> str:
    """The expression as Grafana sends it: `$name` and `${name}` replaced."""
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown dashboard variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers left once strings, label matchers,
    range windows and label lists are removed, other than function names and keywords."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LIST.sub(" ", text)
    return {m.group() for m in _IDENTIFIER.finditer(text)
            if m.group().lower() not in _KEYWORDS and not re.match(r"\s*\(", text[m.end():])}


def exported_names(scrape: str) -> set[str]:
    """Every series name a scrape exports or declares (a labelled metric with no child yet, such
    as rejections before the first one, is declared by its # TYPE line)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count")}
    names = set()
    for family in text_string_to_metric_families(scrape):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


def test_metric_names_reads_only_metrics():
    expr = ('sum by (reason) (rate(a_total{job_id="$job_id", x=~"b|c"}[$__rate_interval])) '
            'or on() label_replace(vector(0), "reason", "none", "", "") / ignoring(le) group_left '
            'sum(b offset 5m) * 1e3 + histogram_quantile(0.9, sum by (le) (rate(c_bucket[1m])))')
    assert metric_names(expr) == {"a_total", "b", "c_bucket"}


# --- structure --------------------------------------------------------------------------------

def test_dashboards_have_stable_unique_uids():
    files = {path.name for path in DASHBOARDS.glob("*.json")}
    assert files == set(UIDS), f"dashboards/ holds {sorted(files)}; add a new one to UIDS with its uid"
    for name, uid in UIDS.items():
        dashboard = _load(name)
        assert dashboard["uid"] == uid and dashboard["title"], name
        assert dashboard.get("id") is None, f"{name}: a fixed id clashes on import; leave it null"


@pytest.mark.parametrize("name", sorted(UIDS))
def test_dashboard_has_datasource_and_job_variables(name):
    dashboard = _load(name)
    datasource = _variable(dashboard, "datasource")
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    job = _variable(dashboard, "job_id")
    assert job["type"] == "query"
    assert re.fullmatch(r"label_values\(metaopt_\w+, job_id\)", _variable_query(job)), _variable_query(job)


@pytest.mark.parametrize("name", sorted(UIDS))
def test_every_panel_has_a_unit_and_queries(name):
    panels = list(_panels(_load(name)["panels"]))
    assert panels, name
    assert len({p["id"] for p in panels}) == len(panels), f"{name}: panel ids repeat"
    for panel in panels:
        where = f"{name}: panel {panel.get('title')!r}"
        assert panel["type"] in PANEL_TYPES, f"{where}: type {panel['type']!r}"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
        assert panel["datasource"]["uid"] == "${datasource}", where
        assert panel["targets"] and all(t.get("expr") for t in panel["targets"]), f"{where}: no query"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), f"{where}: refIds repeat"


@pytest.mark.parametrize(("name", "panel", "target"), _targets())
def test_every_query_selects_the_chosen_job(name, panel, target):
    expr = target["expr"]
    assert "$job_id" in expr, expr
    for selector in re.finditer(r"\bmetaopt_\w+(\{[^}]*\})?", expr):
        assert selector.group(1) and 'job_id="$job_id"' in selector.group(1), (
            f"{selector.group()} in {expr!r} must select job_id=\"$job_id\"")
    for window in re.findall(r"\[([^\]]*)\]", expr):
        assert window in ("$__rate_interval", "$__range"), f"fixed window [{window}] in {expr!r}"


# --- a real Prometheus scraping a real run ----------------------------------------------------

def _get(url: str, **params) -> bytes:
    if params:
        url = f"{url}?{urllib.parse.urlencode(params, doseq=True)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _query(prometheus: str, expr: str) -> dict:
    try:
        return json.loads(_get(f"{prometheus}/api/v1/query", query=expr))
    except urllib.error.HTTPError as err:  # a bad query is a 400 with Prometheus's reason
        return json.loads(err.read())


def _tail(log: pathlib.Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@contextlib.contextmanager
def _process(args: list[str], log: pathlib.Path):
    """A subprocess in a session of its own, logging to `log`; SIGTERM at exit (the run then
    writes its final checkpoint), SIGKILL to its session if it has not ended within 60 s."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait(what: str, check, timeout_s: float, logs: tuple[pathlib.Path, ...], procs=()):
    deadline = time.monotonic() + timeout_s
    while True:
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args[0]} exited ({proc.returncode}) while waiting for {what}:\n"
                            + "\n".join(_tail(log) for log in logs))
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            result = check()
            if result:
                return result
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout_s:.0f} s:\n" + "\n".join(_tail(log) for log in logs))
        time.sleep(0.5)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A `metaopt train` run (with in-run evaluation) past its first outer step and its first
    evaluation, and a Prometheus that has scraped it every second for a few seconds:
    SimpleNamespace(prometheus=URL, scrape=its /metrics text)."""
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.fail(f"{PROMETHEUS} not found: `make test` installs Debian's prometheus package")
    tmp = tmp_path_factory.mktemp("dashboards")
    metrics_port, prometheus_port = free_port(), free_port()
    metrics, prometheus = f"http://127.0.0.1:{metrics_port}/metrics", f"http://127.0.0.1:{prometheus_port}"
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: metaopt-learner\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    logs = (tmp / "train.log", tmp / "prometheus.log")
    with contextlib.ExitStack() as stack:
        # Prometheus first: it waits for its target while the run starts Ray and compiles.
        prom = stack.enter_context(_process(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"], logs[1]))
        run = stack.enter_context(_process(
            [sys.executable, "-m", "metaopt.cli", "train", str(e2e_with_eval(tmp)),
             "--out", str(tmp / "out"), "--job-id", JOB_ID, "--max-outer-steps", "100000",
             "--metrics-port", str(metrics_port), "--json"], logs[0]))
        procs = (run, prom)

        def outer_steps() -> float:
            pattern = rf'^metaopt_outer_steps_total{{job_id="{JOB_ID}"}} (\S+)$'
            found = re.search(pattern, _get(metrics).decode(), re.MULTILINE)
            return float(found.group(1)) if found else 0.0

        _wait("outer step on the run's /metrics", lambda: outer_steps() > 0, 180, logs, procs)
        _wait("ready Prometheus", lambda: _get(f"{prometheus}/-/ready"), 30, logs, procs)
        # Five scrapes after the first outer step: enough for every rate over 15 s.
        samples = f'count_over_time(metaopt_outer_steps_total{{job_id="{JOB_ID}"}}[1m]) >= 5'
        _wait("five scrapes in Prometheus", lambda: _query(prometheus, samples)["data"]["result"],
              30, logs, procs)
        # The evaluation gauges, as Prometheus scraped them from the learner's own /metrics.
        evaluated = f'metaopt_eval_final_loss_ratio{{job_id="{JOB_ID}", suite="tiny"}}'
        _wait("in-run evaluation in Prometheus", lambda: _query(prometheus, evaluated)["data"]["result"],
              120, logs, procs)
        yield SimpleNamespace(prometheus=prometheus, scrape=_get(metrics).decode())


@pytest.mark.parametrize(("name", "panel", "target"), _targets())
def test_panel_query_returns_data(live, name, panel, target):
    expr = substitute(target["expr"])
    # A window may hold no event for a moment (a checkpoint, say): give it a few seconds.
    deadline = time.monotonic() + 15
    while True:
        answer = _query(live.prometheus, expr)
        assert answer["status"] == "success", f"{expr!r}: {answer.get('error')}"
        values = [float(series["value"][1]) for series in answer["data"]["result"]]
        if values and all(math.isfinite(v) for v in values):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{name}: {panel['title']!r}: {expr!r} gave {answer['data']}")
        time.sleep(1)


@pytest.mark.parametrize(("name", "panel", "target"), _targets())
def test_panel_query_names_only_exported_metrics(live, name, panel, target):
    names = metric_names(target["expr"])
    assert names, f"no metric found in {target['expr']!r}"
    missing = names - exported_names(live.scrape)
    assert not missing, f"{name}: {panel['title']!r} queries {sorted(missing)}, which the run does not export"


@pytest.mark.parametrize("name", sorted(UIDS))
def test_variable_queries_find_the_run(live, name):
    """Grafana's `label_values(SELECTOR, LABEL)`, asked of Prometheus as Grafana asks it."""
    for variable in _load(name)["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = substitute(_variable_query(variable))
        selector, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query).groups()
        assert metric_names(selector) <= exported_names(live.scrape), query
        answer = json.loads(_get(f"{live.prometheus}/api/v1/label/{label}/values", **{"match[]": selector}))
        assert answer["status"] == "success" and answer["data"], f"{name}: {query!r} gave {answer}"
        if label == "job_id":
            assert JOB_ID in answer["data"], answer
