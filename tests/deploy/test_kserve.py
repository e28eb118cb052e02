"""The KServe InferenceService in deploy/kserve: it parses, and it is wired to the image and the app.

No cluster (or KServe) in CI: PyYAML parses the manifests and the checks below cover what the CRD's
schema would not — the port the image listens on, probe paths the app really routes, settings that
exist (and values the server accepts), Secrets the example defines, the tenants Secret mounted where
VPT_TENANTS_FILE points, the metrics port and token as in deploy/k8s, one GPU, the v2 protocol.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.app import create_app
from server.settings import Settings
from server.tenants import parse_tenants
from tests.deploy import dockerfile as dfm

REPO = Path(__file__).resolve().parents[2]
KSERVE = REPO / "deploy" / "kserve"
KINDS = {"InferenceService": "serving.kserve.io/v1beta1", "Secret": "v1"}
# Environment names the container may set that are not server settings, and who reads them.
NOT_SETTINGS = {
    "PROTOCOL": "KServe: the protocol of a custom predictor",
    "AWS_ACCESS_KEY_ID": "boto3: S3 credentials",
    "AWS_SECRET_ACCESS_KEY": "boto3: S3 credentials",
}
SETTINGS_FIELDS = {f"VPT_{n.upper()}": n for n in Settings.model_fields}


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KSERVE / name).read_text()) if d is not None]


def runtime_env() -> tuple[dict[str, str], list[str]]:
    """The image's runtime ENV and EXPOSEd ports, from the Dockerfile as written."""
    df = dfm.parse((REPO / "Dockerfile").read_text())
    runtime = df.stage("runtime")
    env: dict[str, str] = {}
    for ins in runtime.instructions:
        if ins.keyword == "ENV":
            env.update(dfm.parse_env(ins.args, env))
    exposed = [p for i in runtime.all("EXPOSE") for p in i.args.split()]
    return env, exposed


def flat_routes() -> set[tuple[str, str]]:
    """(method, path) of every route of the app (recent FastAPI nests included routers)."""
    app = create_app(Settings(backbone="random:vit_test_tiny@0", store="unused", open_mode=True))
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        routes = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    return {(m, r.path) for r in routes for m in (getattr(r, "methods", None) or {"GET"})}


@pytest.fixture(scope="module")
def isvc() -> dict[str, Any]:
    (doc,) = documents("inferenceservice.yaml")
    return doc


@pytest.fixture(scope="module")
def container(isvc) -> dict[str, Any]:
    (c,) = isvc["spec"]["predictor"]["containers"]
    return c


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["stringData"] for d in documents("secret.example.yaml")}


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_every_document_parses_with_a_known_kind_and_api_version():
    for path in sorted(KSERVE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in documents(path.name):
            assert KINDS.get(doc["kind"]) == doc["apiVersion"], (
                f"{path.name}: {doc['kind']} {doc['apiVersion']}"
            )
            assert doc["metadata"]["name"], path.name


def test_kustomization_lists_the_inference_service_and_no_secret():
    kust = yaml.safe_load((KSERVE / "kustomization.yaml").read_text())
    kinds = set()
    for res in kust["resources"]:
        assert (KSERVE / res).is_file(), res
        kinds |= {d["kind"] for d in documents(res)}
    assert kinds == {"InferenceService"}, "no placeholder Secret may be deployed by `kubectl apply -k`"
    assert kust["namespace"] == next(iter(documents("secret.example.yaml")))["metadata"]["namespace"]


def test_a_custom_predictor_of_our_image_speaking_v2(isvc, container):
    assert container["name"] == "kserve-container"  # the container KServe reads the protocol from
    k8s = yaml.safe_load((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())
    (k8s_container,) = k8s["spec"]["template"]["spec"]["containers"]
    assert container["image"] == k8s_container["image"]
    assert env_values(container)["PROTOCOL"] == "v2"


def test_the_port_is_the_one_the_image_listens_on(container):
    env, exposed = runtime_env()
    (port,) = container["ports"]  # Knative routes to exactly one port
    assert str(port["containerPort"]) == env["VPT_PORT"] == exposed[0]
    assert port.get("name", "http1") in ("http1", "h2c")  # the names Knative knows
    assert env_values(container).get("VPT_PORT", env["VPT_PORT"]) == env["VPT_PORT"]


def test_probes_use_routes_the_app_serves(container):
    routes = flat_routes()
    port = container["ports"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] in ("/healthz", "/v2/health/live")
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert ("GET", get["path"]) in routes, f"{probe}: the app has no GET {get['path']}"
        assert get.get("port", port["containerPort"]) in (port.get("name"), port["containerPort"]), probe


def test_liveness_waits_for_the_slowest_start_the_k8s_manifest_allows(container):
    """The server answers nothing until the backbone is loaded: liveness must not kill a start that the
    plain Deployment's startupProbe would still wait for."""
    k8s = yaml.safe_load((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())
    (k8s_container,) = k8s["spec"]["template"]["spec"]["containers"]
    start = k8s_container["startupProbe"]
    allowed = start["periodSeconds"] * start["failureThreshold"]
    live = container["livenessProbe"]
    assert live.get("initialDelaySeconds", 0) >= allowed or "startupProbe" in container


def test_env_names_are_real_settings_with_values_the_server_accepts(container, secrets):
    names = [e["name"] for e in container["env"]] + list(secrets["vpt-s3"])
    unknown = {n for n in names if n not in SETTINGS_FIELDS and n not in NOT_SETTINGS}
    assert not unknown, f"neither server settings nor known: {sorted(unknown)}"
    values = {SETTINGS_FIELDS[k]: v for k, v in env_values(container).items() if k in SETTINGS_FIELDS}
    values |= {SETTINGS_FIELDS[k]: v for k, v in secrets["vpt-s3"].items() if k in SETTINGS_FIELDS}
    values["metrics_token"] = secrets["vpt-metrics"]["token"]
    s = Settings(**values)  # what the pod's server would build at start-up
    assert s.store.startswith("s3://"), "replicas (and canary revisions) share an S3 store"
    assert not s.open_mode


def test_every_secret_referenced_is_in_the_example(isvc, container, secrets):
    refs: list[tuple[str, str | None]] = []
    for e in container["env"]:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            refs.append((ref["name"], ref["key"]))
    refs += [(e["secretRef"]["name"], None) for e in container.get("envFrom", []) if "secretRef" in e]
    refs += [(v["secret"]["secretName"], None) for v in isvc["spec"]["predictor"]["volumes"] if "secret" in v]
    assert {name for name, _ in refs} == set(secrets)
    for name, key in refs:
        assert key is None or key in secrets[name], f"{name} has no key {key}"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "VPT_S3_ENDPOINT_URL"} <= set(secrets["vpt-s3"])


def test_tenants_secret_is_mounted_read_only_where_the_settings_point(isvc, container, secrets):
    tenants_file = Path(env_values(container)["VPT_TENANTS_FILE"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(tenants_file.parent))
    assert mount["readOnly"] is True
    assert "subPath" not in mount, "a subPath mount never sees Secret updates (no live key changes)"
    volume = next(v for v in isvc["spec"]["predictor"]["volumes"] if v["name"] == mount["name"])
    # The server's user must be able to read it: without a pod fsGroup (Knative refuses one unless a
    # feature flag is set) the mounted files are root's, so "other" needs the read bit.
    mode = volume["secret"].get("defaultMode", 0o644)
    assert mode & 0o004, (
        f"defaultMode {mode:o}: uid {container['securityContext']['runAsUser']} cannot read it"
    )
    toml = secrets[volume["secret"]["secretName"]][tenants_file.name]
    tenants = parse_tenants(toml, "secret.example.yaml")  # the server's own parser
    assert any(t.role == "admin" for t in tenants.values())


def test_metrics_port_and_token_as_in_the_k8s_manifests(isvc, container):
    env, exposed = runtime_env()
    port = env_values(container)["VPT_METRICS_PORT"]
    assert port == env["VPT_METRICS_PORT"] == exposed[1] and port != env["VPT_PORT"]
    annotations = isvc["spec"]["predictor"]["annotations"]
    assert annotations["prometheus.io/port"] == port and annotations["prometheus.io/path"] == "/metrics"
    token = next(e for e in container["env"] if e["name"] == "VPT_METRICS_TOKEN")["valueFrom"]["secretKeyRef"]
    k8s = yaml.safe_load((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())
    (k8s_container,) = k8s["spec"]["template"]["spec"]["containers"]
    k8s_token = next(e for e in k8s_container["env"] if e["name"] == "VPT_METRICS_TOKEN")
    assert token == k8s_token["valueFrom"]["secretKeyRef"] and token["optional"] is True


def test_one_gpu_and_a_timeout_that_covers_the_request_deadline(isvc, container):
    res = container["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == 1
    assert int(res["requests"].get("nvidia.com/gpu", 1)) == 1
    predictor = isvc["spec"]["predictor"]
    deadline = float(env_values(container)["VPT_REQUEST_TIMEOUT_S"])
    assert predictor["timeout"] >= deadline + 5, "the ingress must not cut a request the server still serves"
    assert 0 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] in ("concurrency", "rps", "cpu", "memory")


def test_runs_as_non_root_with_a_read_only_root(container):
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/data/hf"} <= writable, "HF_HOME and /tmp need writable volumes"


def test_only_fields_knative_accepts(isvc, container):
    """Serverless KServe runs the predictor as a Knative revision, which refuses lifecycle hooks and
    pod-level security contexts, and more than one container port."""
    assert "lifecycle" not in container
    assert "securityContext" not in isvc["spec"]["predictor"]
    assert "terminationGracePeriodSeconds" not in isvc["spec"]["predictor"]
    assert all(re.fullmatch(r"[a-z0-9-]+", v["name"]) for v in isvc["spec"]["predictor"]["volumes"])
