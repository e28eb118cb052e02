"""Kubernetes manifests in deploy/k8s: they parse, and they are wired up the way docs/deploy.md says.

No cluster (or kubectl) in CI: PyYAML parses every document and the checks below cover what a schema
validator would not — probes on /healthz and /readyz, one GPU per pod, the tenants Secret mounted where
VPT_TENANTS_FILE points, settings that exist, a grace period that covers the drain, selectors that
match, and an example tenants file the server's own parser accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from server.metrics import Metrics
from server.settings import Settings
from server.tenants import parse_tenants

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KINDS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "Ingress": "networking.k8s.io/v1",
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def container() -> dict[str, Any]:
    (c,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def test_every_document_parses_with_a_known_kind_and_api_version():
    docs = documents()
    assert docs
    for file, doc in docs:
        assert doc["kind"] in KINDS, f"{file}: {doc['kind']}"
        assert doc["apiVersion"] == KINDS[doc["kind"]], f"{file}: {doc['kind']} {doc['apiVersion']}"
        assert doc["metadata"]["name"], file


def test_kustomization_lists_existing_files_and_no_secret():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    kinds = {yaml.safe_load((K8S / r).read_text())["kind"] for r in kust["resources"]}
    assert "Secret" not in kinds, "no placeholder Secret may be deployed by `kubectl apply -k`"
    assert {"Deployment", "Service", "ConfigMap"} <= kinds


def test_probes_point_at_healthz_and_readyz(container):
    port = container["ports"][0]
    assert port["containerPort"] == 8000
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in (port["name"], port["containerPort"]), probe


def test_one_gpu_per_pod(container):
    res = container["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == 1
    assert (
        res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"])
        == res["limits"]["nvidia.com/gpu"]
    )


def test_settings_come_from_the_configmap_and_are_real_settings(container):
    cm = one("ConfigMap", "vpt-settings")
    refs = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    assert refs == ["vpt-settings"]
    fields = {f"VPT_{n.upper()}" for n in Settings.model_fields}
    unknown = {k for k in cm["data"] if k.startswith("VPT_")} - fields
    assert not unknown, f"not server settings: {sorted(unknown)}"
    assert all(isinstance(v, str) for v in cm["data"].values()), "ConfigMap values must be strings"
    assert cm["data"]["VPT_STORE"].startswith("s3://"), "replicas share an S3 store"
    assert cm["data"].get("VPT_OPEN_MODE", "false") != "true"


def test_tenants_secret_is_mounted_where_the_settings_point(container):
    cm = one("ConfigMap", "vpt-settings")
    tenants_file = Path(cm["data"]["VPT_TENANTS_FILE"])
    pod = one("Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(tenants_file.parent))
    assert "subPath" not in mount, "a subPath mount never sees Secret updates (no live key changes)"
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    secret_name = volume["secret"]["secretName"]
    secret = one("Secret", secret_name)
    toml = secret["stringData"][tenants_file.name]
    tenants = parse_tenants(toml, "secret.example.yaml")  # the server's own parser
    assert any(t.role == "admin" for t in tenants.values())


def test_s3_credentials_come_from_a_secret(container):
    refs = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
    assert refs and refs[0].get("optional") is True
    secret = one("Secret", refs[0]["name"])
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])


def test_graceful_shutdown_has_time_to_drain(container):
    cm = one("ConfigMap", "vpt-settings")
    pod = one("Deployment")["spec"]["template"]["spec"]
    timeout = float(
        cm["data"].get("VPT_REQUEST_TIMEOUT_S", Settings.model_fields["request_timeout_s"].default)
    )
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(pre_stop[-1]) if pre_stop[0] == "sleep" else 0.0
    assert pod["terminationGracePeriodSeconds"] >= pause + timeout + 10


def test_runs_as_non_root_with_a_read_only_root(container):
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/data/hf"} <= writable, "HF_HOME and /tmp need writable volumes"


def test_selectors_match_the_pod_labels():
    dep = one("Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = one("Service", "vpt")
    assert svc["spec"]["selector"].items() <= labels.items()
    port = next(p for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"] if p["name"] == "http")
    assert svc["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]


def test_metrics_port_is_scraped_from_the_pods_not_served_by_the_service(container):
    """/metrics only on VPT_METRICS_PORT: a container port the annotations point at, left out of the
    Service (and so of the Ingress); the scrape token comes from an optional Secret."""
    cm = one("ConfigMap", "vpt-settings")
    port = cm["data"]["VPT_METRICS_PORT"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert str(named["metrics"]) == port and named["http"] != named["metrics"]
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == port and annotations["prometheus.io/path"] == "/metrics"
    for p in one("Service", "vpt")["spec"]["ports"]:
        assert p["targetPort"] not in ("metrics", int(port)), "the Service must not expose the metrics port"
    token = next(e for e in container["env"] if e["name"] == "VPT_METRICS_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token["optional"] is True
    example = one("Secret", token["name"])["stringData"][token["key"]]
    Settings(metrics_token=example)  # long enough for the server to accept


def test_hpa_and_ingress_target_what_exists():
    hpa = one("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", one("Deployment")["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in Metrics().registry._names_to_collectors, metric
    ing = one("Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    svc = one("Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
