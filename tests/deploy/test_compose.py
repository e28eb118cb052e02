"""docker-compose.yml resolves with every profile, and what it resolves to is wired up correctly.

`docker-compose config` (Debian's docker-compose 1.29, installed by .ci/run) needs no Docker engine: it
validates the file against the Compose schema, substitutes `${...}` from `.env` and merges anchors. The
project is resolved in a scratch directory holding the compose file and `.env.example` copied to
`.env`, exactly what a user does first. The other checks read the resolved configuration.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.settings import Settings
from tests.deploy.test_dockerfile import runtime_env

REPO = Path(__file__).resolve().parents[2]
COMPOSE_BIN = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE_BIN is None,
    reason="docker-compose is not installed (Debian: apt-get install -y docker-compose; .ci/run does this)",
)
PROFILES = {
    "default": (),
    "monitoring": ("monitoring",),
    "scale": ("scale",),
    "scale+monitoring": ("scale", "monitoring"),
}
SERVER_SERVICES = ("vpt", "vpt-1", "vpt-2")
METRICS_PORT = runtime_env({})["VPT_METRICS_PORT"]  # the image's; compose does not change it


def env_example() -> dict[str, str]:
    out = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


@cache
def resolve(profiles: tuple[str, ...], tmp: Path) -> tuple[dict[str, Any], str]:
    shutil.copy(REPO / "docker-compose.yml", tmp / "docker-compose.yml")
    shutil.copy(REPO / ".env.example", tmp / ".env")
    args = [COMPOSE_BIN or "docker-compose"]
    for p in profiles:
        args += ["--profile", p]
    proc = subprocess.run(
        [*args, "--project-directory", str(tmp), "-f", str(tmp / "docker-compose.yml"), "config"],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"docker-compose config {profiles} failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout), proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compose")


def active(cfg: dict[str, Any], profiles: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Services that `up` starts with these profiles (compose v1's `config` prints all of them)."""
    return {
        name: svc
        for name, svc in cfg["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value))


def repo_path(source: str, tmp: Path) -> Path:
    """A bind-mount source, resolved by compose against the scratch project, mapped back to the repo."""
    return REPO / Path(source).relative_to(tmp)


@needs_compose
@pytest.mark.parametrize("name", PROFILES)
def test_config_resolves_for_every_profile(name, project):
    cfg, stderr = resolve(PROFILES[name], project)
    assert "WARNING" not in stderr and "not set" not in stderr, stderr
    services = set(active(cfg, PROFILES[name]))
    expected = {"vpt"}
    if "scale" in PROFILES[name]:
        expected |= {"vpt-1", "vpt-2", "minio", "minio-init", "nginx"}
    if "monitoring" in PROFILES[name]:
        expected |= {"prometheus", "grafana"}
    assert services == expected


@needs_compose
@pytest.mark.parametrize("service", SERVER_SERVICES)
def test_server_containers_gpu_env_volumes_health_restart(service, project):
    cfg, _ = resolve(("scale",), project)
    svc = cfg["services"][service]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    env = svc["environment"]
    assert env["VPT_BACKBONE"] == env_example()["VPT_BACKBONE"], "settings must come from .env"
    targets = {v.split(":")[1]: v for v in svc["volumes"]}
    assert targets["/etc/vpt"].endswith(":ro"), "tenants are mounted read-only"
    assert "/data/hf" in targets, "the backbone cache is a volume"
    if service == "vpt":
        assert targets["/data/store"].startswith("store:"), "the single server's store is a named volume"
    else:
        assert env["VPT_STORE"].startswith("s3://"), "replicas share the S3 store"
    check = " ".join(svc["healthcheck"]["test"])
    assert "/readyz" in check and ":8000/" in check
    assert svc["restart"] == "unless-stopped"
    grace = seconds(svc["stop_grace_period"])
    assert grace >= float(env["VPT_REQUEST_TIMEOUT_S"]) + 10, "SIGTERM drain needs request timeout + 10 s"
    assert svc["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert Path(svc["build"]["context"]) == project


@needs_compose
def test_single_server_publishes_on_loopback_by_default(project):
    cfg, _ = resolve((), project)
    (port,) = cfg["services"]["vpt"]["ports"]
    host_ip = port.split(":")[0] if isinstance(port, str) else port.get("host_ip")  # v1 / v2 output
    assert host_ip == "127.0.0.1", port


def secret_names(svc: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in svc.get("secrets", [])}


@needs_compose
def test_metrics_port_is_unpublished_and_scrapes_need_the_token(project):
    """Prometheus reaches the servers' metrics port on the compose network only, and sends the token
    the servers read from the same secret file (in the config directory, next to tenants.toml)."""
    cfg, _ = resolve(("scale", "monitoring"), project)
    services = cfg["services"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            target = str(port).rsplit(":", 1)[-1] if isinstance(port, str) else str(port["target"])
            assert target.split("/")[0] != METRICS_PORT, f"{name} publishes the metrics port: {port}"
    secret = cfg["secrets"]["metrics_token"]
    assert repo_path(secret["file"], project) == REPO / env_example()["DEPLOY_CONFIG_DIR"] / "metrics-token"
    for name in SERVER_SERVICES:
        assert "metrics_token" in secret_names(services[name]), name
        assert services[name]["environment"]["VPT_METRICS_TOKEN_FILE"] == "/run/secrets/metrics_token"
    assert "metrics_token" in secret_names(services["prometheus"])
    assert "metrics_token" not in secret_names(services["minio-init"]) | secret_names(services["grafana"])


@needs_compose
def test_scale_profile_wires_replicas_store_and_proxy(project):
    cfg, _ = resolve(("scale",), project)
    services = cfg["services"]
    replicas = [n for n in active(cfg, ("scale",)) if n.startswith("vpt-")]
    assert len(replicas) >= 2
    stores = {services[r]["environment"]["VPT_STORE"] for r in replicas}
    assert len(stores) == 1, "every replica must use the same store"
    endpoint = services[replicas[0]]["environment"]["VPT_S3_ENDPOINT_URL"]
    assert re.fullmatch(r"http://minio:9000", endpoint)
    minio = services["minio"]["environment"]
    assert minio["MINIO_ROOT_USER"] == services[replicas[0]]["environment"]["AWS_ACCESS_KEY_ID"]
    init = services["minio-init"]
    assert init["environment"]["VPT_STORE"] in stores
    mounted = [v.split(":")[0] for v in init["volumes"]]
    assert all(repo_path(m, project).is_file() for m in mounted), mounted
    for r in replicas:
        assert services[r]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    nginx = services["nginx"]
    conf_mount = next(v for v in nginx["volumes"] if v.split(":")[1] == "/etc/nginx/nginx.conf")
    conf = repo_path(conf_mount.split(":")[0], project).read_text()
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", conf, re.M)
    assert sorted(upstreams) == sorted((r, "8000") for r in replicas), upstreams
    assert re.search(r"hash\s+\$\w+\s+consistent;", conf)
    assert {d: c["condition"] for d, c in nginx["depends_on"].items()} == dict.fromkeys(
        replicas, "service_healthy"
    )


@needs_compose
def test_monitoring_profile_scrapes_every_server_and_provisions_grafana(project):
    cfg, _ = resolve(("scale", "monitoring"), project)
    services = cfg["services"]
    prom = services["prometheus"]
    prom_dir = repo_path(next(v for v in prom["volumes"] if ":/etc/prometheus" in v).split(":")[0], project)
    prom_cfg = yaml.safe_load((prom_dir / "prometheus.yml").read_text())
    job = next(j for j in prom_cfg["scrape_configs"] if j["job_name"] == "vpt")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{s}:{METRICS_PORT}" for s in SERVER_SERVICES}
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_token"
    graf = services["grafana"]
    mounts = {
        v.split(":")[1]: repo_path(v.split(":")[0], project) for v in graf["volumes"] if v.startswith("/")
    }
    prov = mounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    provider = yaml.safe_load((prov / "dashboards" / "vpt-serve.yml").read_text())["providers"][0]
    assert provider["options"]["path"] in mounts, "the dashboard provider reads a mounted directory"
    assert list(mounts[provider["options"]["path"]].glob("*.json"))
    assert graf["environment"]["GF_SECURITY_ADMIN_PASSWORD"], "Grafana's admin password comes from .env"


def test_env_example_documents_every_variable_and_only_real_settings():
    env = env_example()
    compose_vars = set(re.findall(r"\$\{(\w+)", (REPO / "docker-compose.yml").read_text()))
    assert compose_vars <= set(env), f"not in .env.example: {sorted(compose_vars - set(env))}"
    fields = {f"VPT_{name.upper()}" for name in Settings.model_fields}
    unknown = {k for k in env if k.startswith("VPT_")} - fields
    assert not unknown, f"not server settings (typo?): {sorted(unknown)}"
    fixed_by_image = {"VPT_HOST", "VPT_PORT", "VPT_METRICS_PORT", "VPT_STORE", "VPT_TENANTS_FILE", "HF_HOME"}
    assert not fixed_by_image & set(env), "the image fixes these to its port and volumes"
    # The token comes from the secret file compose mounts (VPT_METRICS_TOKEN_FILE): not from .env.
    assert not {"VPT_METRICS_TOKEN", "VPT_METRICS_TOKEN_FILE"} & set(env)
    assert env.get("VPT_OPEN_MODE", "false").lower() != "true", (
        "compose is for deployments: keys, not open mode"
    )


def test_compose_server_settings_are_real_settings():
    raw = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    fields = {f"VPT_{name.upper()}" for name in Settings.model_fields}
    for name, svc in raw["services"].items():
        keys = set(svc.get("environment") or {})
        assert {k for k in keys if k.startswith("VPT_")} <= fields, name
