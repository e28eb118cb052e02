"""Prometheus config, alert rules and the Grafana dashboard against a real server's /metrics.

- `promtool check config` / `check rules` (Debian's prometheus package, installed by .ci/run) validate
  the Prometheus files; the dashboard's PromQL goes through the same parser as a generated rules file.
- Every metric the dashboard and the alerts query must exist in the /metrics of a real `vpt-serve`
  (tiny random backbone, scraped as Prometheus does: its metrics port, with the token) after one upload
  and one classify request, with the labels they group or filter by, and every `route=~` regex must
  match a route the server really reports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics
from tests.deploy.test_dockerfile import runtime_env
from tests.server.helpers import BACKBONE_SPEC, METRICS_AUTH, METRICS_TOKEN, artifact_bytes, png_bytes
from tests.server.server_proc import ServerProcess, free_port
from vpt.hub import load_backbone

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "vpt-serve.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install -y prometheus; .ci/run does this)",
)
# Labels Prometheus attaches to every scraped series (target labels), and histogram buckets' `le`.
TARGET_LABELS = {"instance", "job", "deployment", "le"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
METRICS_PORT = runtime_env({})["VPT_METRICS_PORT"]  # the image's


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def as_promql(expr: str) -> str:
    """Grafana's variables replaced by what they expand to, for the PromQL parser."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


# --- Prometheus files ------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_config_and_rules(tmp_path):
    # promtool checks that credentials files exist: the token file compose mounts is put in tmp.
    shutil.copytree(PROM_DIR, tmp_path, dirs_exist_ok=True)
    (tmp_path / "metrics-token").write_text(METRICS_TOKEN)
    text = (PROM_DIR / "prometheus.yml").read_text()
    assert text.count("/run/secrets/metrics_token") == 1
    (tmp_path / "prometheus.yml").write_text(
        text.replace("/run/secrets/metrics_token", str(tmp_path / "metrics-token"))
    )
    proc = subprocess.run(
        [PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


@needs_promtool
def test_dashboard_promql_parses(tmp_path):
    queries = [as_promql(e) for e in dashboard_exprs() if not e.startswith("label_values(")]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"q{i}", "expr": q} for i, q in enumerate(queries)]}
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_scrapes_vpt_metrics_endpoint():
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "vpt")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(t.endswith(f":{METRICS_PORT}") for t in targets), "the metrics port, not the API's"
    assert job["authorization"].get("type", "Bearer") == "Bearer" and job["authorization"]["credentials_file"]
    for rule_file in cfg["rule_files"]:
        assert (PROM_DIR / rule_file).is_file(), rule_file


def test_dashboard_is_wellformed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    ds = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    var = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert var["current"]["value"] == uid
    text = " ".join(dashboard_exprs())
    for topic in ("histogram_quantile", "vpt_batch_size", "vpt_queue_depth_images", "vpt_bank_hits_total"):
        assert topic in text
    assert re.search(r"sum by \(tenant\)", text), "per-tenant traffic panel"
    assert "vpt_rejections_total" in text
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]


# --- against a running server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("metrics")
    backbone = load_backbone(BACKBONE_SPEC)
    metrics_port = free_port()
    proc = ServerProcess(
        tmp, backbone=BACKBONE_SPEC, open_mode="true", metrics_port=metrics_port, metrics_token=METRICS_TOKEN
    ).wait_ready()
    try:
        data = artifact_bytes(backbone, P=2, mode="deep", C=3, seed=0)
        r = httpx.put(
            f"{proc.url}/v1/tasks/birds", content=data, headers={"content-type": "application/octet-stream"}
        )
        assert r.status_code in (200, 201), r.text
        r = httpx.post(
            f"{proc.url}/v1/tasks/birds/classify", content=png_bytes(0), headers={"content-type": "image/png"}
        )
        assert r.status_code == 200, r.text
        r = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", headers=METRICS_AUTH)
        assert r.status_code == 200, r.text
        return r.text
    finally:
        assert proc.stop() == 0, proc.log()


def exposed(text: str) -> tuple[dict[str, str], dict[str, set[str]], dict[str, set[str]]]:
    """(name → type, name → label names, label → values seen) for every series name /metrics exposes.
    Counter and histogram families are registered under every name a query can use."""
    types: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    values: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            types[m.group(1)] = m.group(2)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            types.setdefault(s.name, fam.type)
            labels.setdefault(s.name, set()).update(s.labels)
            for k, v in s.labels.items():
                values.setdefault(k, set()).add(v)
        for base in (fam.name, f"{fam.name}_total"):
            labels.setdefault(base, set())
    # A labelled family with no child yet (vpt_rejections_total before any rejection) exposes no sample
    # to read its label names from: take them from the metric's declaration.
    for name, collector in Metrics().registry._names_to_collectors.items():
        labels.setdefault(name, set()).update(getattr(collector, "_labelnames", ()))
    for name, kind in list(types.items()):
        if kind == "histogram":
            for suffix in HISTOGRAM_SUFFIXES:
                types.setdefault(name + suffix, kind)
                labels.setdefault(name + suffix, set()).update(labels.get(name, set()))
    return types, labels, values


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(vpt_[a-z0-9_]+)", expr))


@pytest.mark.integration
@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_queried_metric_exists_on_a_running_server(source, metrics_text):
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    types, labels, values = exposed(metrics_text)
    missing = sorted({n for e in exprs for n in metric_names(e)} - set(types))
    assert not missing, f"{source} queries metrics /metrics does not expose: {missing}"
    for expr in exprs:
        names = metric_names(expr)
        for n in names:
            if n.endswith(HISTOGRAM_SUFFIXES[0]):
                assert types[n] == "histogram", f"{n}: _bucket of a non-histogram"
        known = set().union(*(labels[n] for n in names)) | TARGET_LABELS if names else TARGET_LABELS
        grouped = {lab.strip() for g in re.findall(r"by \(([^)]*)\)", expr) for lab in g.split(",")}
        matched = set(re.findall(r"[{,]\s*(\w+)\s*(?:=~|!~|!=|=)", expr))
        assert grouped | matched <= known, f"{expr}\nunknown labels: {(grouped | matched) - known}"
        for regex in re.findall(r'route=~"([^"]+)"', expr):
            assert any(re.fullmatch(regex, r) for r in values["route"]), f"route=~{regex!r} matches no route"


@pytest.mark.integration
def test_the_classify_request_shows_up_in_the_dashboard_series(metrics_text):
    """The series the key panels read have samples after one request (not only declarations)."""
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(metrics_text)
        for s in fam.samples
    }
    inference = [
        v
        for (name, lab), v in samples.items()
        if name == "vpt_request_duration_seconds_count"
        and dict(lab)["route"] == "/v1/tasks/{task_id}/classify"
    ]
    assert inference == [1.0]
    assert samples[("vpt_batch_size_count", ())] >= 1
    assert any(n == "vpt_tenant_requests_total" and v >= 1 for (n, _), v in samples.items())
    assert samples[("vpt_bank_loads_total", ())] >= 1
