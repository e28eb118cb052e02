"""The Dockerfile: its structure, and its build and entry steps run as written on this machine.

CI has no Docker engine, so `test_build_stage_and_entry_command_run_as_written` runs the builder
stage's ARG/ENV/WORKDIR/COPY/RUN lines (tests/deploy/dockerfile.py) in a fresh virtual environment made
from the base interpreter, then starts the runtime stage's ENTRYPOINT with the runtime ENV and polls it
with the HEALTHCHECK command. A broken install line, a missing COPY, a package left out of the image or
an entry point that does not start fails here instead of in a user's `docker build`.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tomllib

from tests.deploy import dockerfile as dfm
from tests.server.server_proc import free_port

REPO = Path(__file__).resolve().parents[2]
DF = dfm.parse((REPO / "Dockerfile").read_text())
BUILDER, RUNTIME = DF.stage("builder"), DF.stage("runtime")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def runtime_env(build_args: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for ins in RUNTIME.instructions:
        if ins.keyword == "ARG":
            k, eq, v = ins.args.partition("=")
            env[k] = build_args.get(k, v if eq else DF.global_args.get(k) or "")
        elif ins.keyword == "ENV":
            env.update(dfm.parse_env(ins.args, env))
    return env


# --- structure ------------------------------------------------------------------------------------------


def test_multi_stage_slim_runtime_copies_only_the_venv():
    assert len(DF.stages) >= 2
    base = dfm.expand(RUNTIME.base, {k: v or "" for k, v in DF.global_args.items()})
    assert "slim" in base, base
    copies = [i.args for i in RUNTIME.all("COPY")]
    assert copies == ["--from=builder ${VENV} ${VENV}"], copies


def test_runs_as_a_numeric_non_root_user():
    user = RUNTIME.last("USER")
    assert user is not None, "the runtime stage must set USER"
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user.args}: numeric and non-root (k8s runAsNonRoot)"


def test_expose_volumes_and_healthcheck_match_the_runtime_env():
    env = runtime_env({})
    assert env["VPT_HOST"] == "0.0.0.0"
    exposed = [p for i in RUNTIME.all("EXPOSE") for p in i.args.split()]
    assert exposed == [env["VPT_PORT"], env["VPT_METRICS_PORT"]]  # the API, then /metrics alone
    volumes = [v for i in RUNTIME.all("VOLUME") for v in dfm.exec_form(i.args)]
    assert sorted(volumes) == sorted([env["VPT_STORE"], env["HF_HOME"]])
    hc = RUNTIME.last("HEALTHCHECK")
    assert hc is not None
    opts, cmd = dfm.healthcheck(hc.args)
    assert "/healthz" in " ".join(cmd)
    assert {"interval", "timeout", "start-period", "retries"} <= set(opts)


def test_entry_command_is_the_project_console_script():
    entry = RUNTIME.last("ENTRYPOINT")
    assert entry is not None and dfm.exec_form(entry.args) == ["vpt-serve"]
    assert RUNTIME.last("CMD") is None or dfm.exec_form(RUNTIME.last("CMD").args) == []  # type: ignore[union-attr]
    assert PYPROJECT["project"]["scripts"]["vpt-serve"] == "server.__main__:main"
    assert "vpt-serve" in (REPO / "scripts" / "serve.sh").read_text()  # the README's run command
    stop = RUNTIME.last("STOPSIGNAL")
    assert stop is None or stop.args == "SIGTERM"


def test_torch_defaults_to_cuda_with_a_cpu_build_arg():
    args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in BUILDER.all("ARG")}
    assert args["TORCH_VARIANT"] == "cuda"
    torch_run = next(i.args for i in BUILDER.all("RUN") if "torch==" in i.args)
    assert "cpu)" in torch_run and "cuda)" in torch_run


def test_torch_pins_and_cpu_index_match_the_scripts():
    """One torch version and one CPU index for the image and for scripts/serve.sh and test.sh."""
    script = (REPO / "scripts" / "venv.sh").read_text()
    pins = dict(re.findall(r"^(TORCH_VERSION|TORCH_CPU_INDEX_URL)=(\S+)$", script, re.M))
    args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in BUILDER.all("ARG")}
    assert args["TORCH_VERSION"] == pins["TORCH_VERSION"]
    torch_run = next(i.args for i in BUILDER.all("RUN") if "torch==" in i.args)
    assert f'cpu) index="${{TORCH_INDEX_URL:-{pins["TORCH_CPU_INDEX_URL"]}}}"' in torch_run, torch_run


def test_image_installs_the_server_extra():
    """The base dependencies are the client alone; the image needs the `server` extra too."""
    deps_run = next(i.args for i in BUILDER.all("RUN") if "requirements.txt" in i.args)
    project = PYPROJECT["project"]
    code = deps_run.split('python -c "', 1)[1].split('" >', 1)[0]
    lines = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert lines == project["dependencies"] + project["optional-dependencies"]["server"]
    assert any(line.startswith("torch") for line in lines)


def test_dependencies_install_before_the_source_is_copied():
    """Layer caching: torch, then pyproject's dependencies, then the packages."""
    seq = [(i.keyword, i.args) for i in BUILDER.instructions if i.keyword in ("COPY", "RUN")]
    torch_at = next(n for n, (k, a) in enumerate(seq) if k == "RUN" and "torch==" in a)
    deps_at = next(n for n, (k, a) in enumerate(seq) if k == "RUN" and "requirements.txt" in a)
    first_package_copy = next(
        n for n, (k, a) in enumerate(seq) if k == "COPY" and (REPO / a.split()[0]).is_dir()
    )
    copies_before_deps = [a.split()[0] for k, a in seq[:deps_at] if k == "COPY"]
    assert torch_at < deps_at < first_package_copy
    assert copies_before_deps == ["pyproject.toml"], copies_before_deps


def test_every_installed_package_is_copied_and_not_dockerignored():
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(
        p.name
        for p in REPO.iterdir()
        if (p / "__init__.py").exists() and any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)
    )
    copied = {i.args.split()[0].rstrip("/") for i in BUILDER.all("COPY")}
    assert set(packages) <= copied, f"packages missing from the image: {set(packages) - copied}"
    ignore = dfm.read_dockerignore(REPO / ".dockerignore")
    for src in copied:
        assert not dfm.ignored(src, ignore), f"COPY {src} is excluded by .dockerignore"


def test_dockerignore_keeps_secrets_and_state_out_of_the_context():
    ignore = dfm.read_dockerignore(REPO / ".dockerignore")
    for path in (".env", ".git", ".venv", "data/store/x", "config/tenants.toml", "tests", "vpt/__pycache__"):
        assert dfm.ignored(path, ignore), path
    for path in ("vpt/model.py", "server/__main__.py", "pyproject.toml", "README.md"):
        assert not dfm.ignored(path, ignore), path


# --- the build and entry steps, as written -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)  # installs every dependency into a fresh venv: ~175 s here, more on a slow mirror
def test_build_stage_and_entry_command_run_as_written(tmp_path):
    root = tmp_path / "root"  # stands in for the image's file system
    shim = tmp_path / "base-bin"  # the base image's `python`: this interpreter's base, not a venv
    shim.mkdir()
    base_python = getattr(sys, "_base_executable", sys.executable)
    for name in ("python", "python3"):
        (shim / name).symlink_to(base_python)
    # The default variant (cuda) as written: torch==2.13.0 from pip's configured index. PyTorch's CPU
    # index (the cpu variant's) is unreachable from CI, and this machine's pip takes the CPU build from
    # its own wheel directory; with only the default index this would be the CUDA build (GBs).
    build_args = {"VENV": str(root / "opt" / "venv")}
    base_env = dfm.clean_env()
    base_env["PATH"] = f"{shim}:{base_env.get('PATH', '')}"
    t0 = time.monotonic()
    run = dfm.run_stage(
        DF, BUILDER, context=REPO, root=root, build_args=build_args, base_env=base_env, timeout=600
    )
    print(f"builder stage as written: {time.monotonic() - t0:.0f}s", *run.log, sep="\n  ")
    venv_bin = root / "opt" / "venv" / "bin"
    assert (venv_bin / "vpt-serve").exists()
    # The image must not depend on the source tree: nothing may import from the build directory.
    probe = subprocess.run(
        [venv_bin / "python", "-c", "import server, vpt; print(server.__file__, vpt.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "site-packages" in probe.stdout, probe.stdout

    env = runtime_env(build_args)
    for key in ("VPT_STORE", "HF_HOME", "VPT_TENANTS_FILE"):  # the image's absolute paths, under root
        env[key] = str(root / env[key].lstrip("/"))
    env["VPT_HOST"] = "127.0.0.1"  # the image binds 0.0.0.0; a CI machine serves loopback only
    env["VPT_PORT"] = str(free_port())
    env["VPT_METRICS_PORT"] = str(free_port())
    env["VPT_BACKBONE"] = "random:vit_test_tiny@0"  # no downloads in CI
    env["HOME"] = str(root / "home" / "vpt")
    Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
    entry = RUNTIME.last("ENTRYPOINT")
    assert entry is not None
    argv = dfm.exec_form(entry.args)
    # Resolved through the runtime ENV's PATH, as in the container: it must find the venv's script.
    argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
    assert Path(argv[0]).parent == venv_bin, f"ENTRYPOINT resolves to {argv[0]}, not the image's venv"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=env["HOME"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        hc = RUNTIME.last("HEALTHCHECK")
        assert hc is not None
        _, check = dfm.healthcheck(hc.args)
        check[0] = shutil.which(check[0], path=env["PATH"]) or check[0]
        assert Path(check[0]).parent == venv_bin, check[0]
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"vpt-serve exited {proc.returncode}:\n{log_path.read_text()}"
            if subprocess.run(check, env=env, capture_output=True, check=False).returncode == 0:
                break
            assert time.monotonic() < deadline, f"HEALTHCHECK never passed:\n{log_path.read_text()}"
            time.sleep(0.3)
        base = f"http://127.0.0.1:{env['VPT_PORT']}"
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
        assert httpx.get(f"{base}/metrics", timeout=5).status_code == 404  # only on the metrics port
        metrics = httpx.get(f"http://127.0.0.1:{env['VPT_METRICS_PORT']}/metrics", timeout=5)
        assert "vpt_batch_size" in metrics.text
        assert Path(env["VPT_STORE"]).is_dir()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, f"SIGTERM must exit 0, got {rc}:\n{log_path.read_text()}"
    shutil.rmtree(root / "opt", ignore_errors=True)  # ~1 GB of venv; pytest keeps old tmp dirs around
