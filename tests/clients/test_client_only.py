"""The client-only install (README "Client only"): this repository installed without extras into a fresh
virtual environment has the SDK and the `vpt` commands that talk to a server, and no torch. Against
the real server of tests/clients/conftest.py: `vpt upload`, `vpt info`, `vpt classify` and
`Client.classify` from that environment work, and `vpt train` says which extra to install.

The sources are copied to a scratch directory first (the build writes `build/` and `*.egg-info` next to
them, and other tests share this checkout), then installed as a user would, `pip install <checkout>`,
with the tests' own pip (`pip --python`: a venv without pip is made in a fraction of the seconds
ensurepip takes). Measured here: ~10 s, most of it the isolated build and httpx/pydantic/tqdm from the
index.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

from clients import Client
from clients.cli import SERVER_EXTRA_MODULES
from tests.server.helpers import BACKBONE_SPEC, png_bytes

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TASK = "client-only"
LABELS = ["apple", "banana", "cherry", "damson"]
# Not one of these may come with the client-only install (the `server` extra's heavy part).
SERVER_ONLY = ("torch", "numpy", "safetensors", "PIL", "fastapi", "uvicorn", "boto3", "huggingface_hub")


def copy_sources(dest: Path) -> Path:
    """What the build needs: pyproject.toml, the files it names, and the packages it finds."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dest / name)
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in REPO.iterdir():
        if (pkg / "__init__.py").exists() and any(fnmatch.fnmatchcase(pkg.name, p) for p in patterns):
            shutil.copytree(pkg, dest / pkg.name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding `pip install <this repository>` (no extras)."""
    tmp = tmp_path_factory.mktemp("client-only")
    src = copy_sources(tmp / "src")
    venv = tmp / "venv"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", str(src)],
        capture_output=True,
        text=True,
        timeout=400,
        env=clean_env(),
        check=False,
    )
    assert install.returncode == 0, f"pip install {src} failed:\n{install.stdout}\n{install.stderr}"
    print(f"client-only venv: {time.monotonic() - t0:.1f}s")
    return venv / "bin"


def clean_env(**extra: str) -> dict[str, str]:
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("VPT_")}
    return {**env, **extra}


def run(bin_dir: Path, cwd: Path, *argv: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A command of the client-only venv, in `cwd` (not the checkout: nothing may import from it)."""
    path = f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=clean_env(PATH=path, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.integration
def test_client_only_install_has_no_torch(client_venv, tmp_path):
    probe = run(
        client_venv,
        tmp_path,
        "python",
        "-c",
        "import importlib.util, json, sys, clients; "
        f"print(json.dumps([clients.__file__, [m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)]]))",
    )
    assert probe.returncode == 0, probe.stderr
    where, server_only = json.loads(probe.stdout)
    assert where.startswith(str(client_venv.parent)), where  # the venv's copy, not the checkout's
    assert server_only == [], f"the client-only install brought {server_only}"
    torch = run(client_venv, tmp_path, "python", "-c", "import torch")
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_client_only_sdk_and_cli_against_a_live_server(client_venv, live, tmp_path):
    env = {"VPT_URL": live.url, "VPT_API_KEY": live.keys["acme"]}
    artifact = tmp_path / "task.safetensors"
    artifact.write_bytes(live.artifact(seed=41, C=len(LABELS), labels=LABELS))
    image = tmp_path / "img.png"
    image.write_bytes(png_bytes(5))

    up = run(client_venv, tmp_path, "vpt", "upload", TASK, artifact, "--json", **env)
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["task_id"] == TASK

    info = run(client_venv, tmp_path, "vpt", "info", **env)
    assert info.returncode == 0, info.stderr
    assert f"backbone     {BACKBONE_SPEC}" in info.stdout, info.stdout

    cli = run(client_venv, tmp_path, "vpt", "classify", TASK, image, "--top-k", "2", "--json", **env)
    assert cli.returncode == 0, cli.stderr
    (result,) = json.loads(cli.stdout)["results"]
    cli_top = [[p["label"], p["score"]] for p in result["predictions"]]

    sdk = run(
        client_venv,
        tmp_path,
        "python",
        "-c",
        "import json, sys\nfrom clients import Client\n"
        "with Client() as c:\n"
        "    r = c.classify(sys.argv[1], sys.argv[2], top_k=2)\n"
        "print(json.dumps([[p.label, p.score] for p in r.predictions[0]]))",
        TASK,
        image,
        **env,
    )
    assert sdk.returncode == 0, sdk.stderr
    sdk_top = json.loads(sdk.stdout)

    # The same answers as the tests' own SDK (the server's environment) gives.
    with Client(live.url, live.keys["acme"]) as c:
        want = [[p.label, p.score] for p in c.classify(TASK, image, top_k=2).predictions[0]]
    assert len(want) == 2 and {label for label, _ in want} <= set(LABELS)
    assert sdk_top == want
    assert cli_top == want


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "photos", "--out", "x.safetensors", "--backbone", "random:vit_test_tiny"],
        ["presets"],
    ],
)
def test_client_only_local_commands_say_what_to_install(client_venv, tmp_path, argv):
    (tmp_path / "photos" / "a").mkdir(parents=True)
    proc = run(client_venv, tmp_path, "vpt", *argv)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'vpt-serve[server]'" in proc.stderr and "torch" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_client_only_vpt_serve_says_what_to_install(client_venv, tmp_path):
    proc = run(client_venv, tmp_path, "vpt-serve")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'vpt-serve[server]'" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_cli_knows_every_module_of_the_server_extra():
    """`vpt` names the extra to install when a command misses one of the server extra's modules: each
    distribution of that extra must be known to it by one of its import names (Pillow: PIL, ...)."""

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    provides: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            provides.setdefault(norm(dist), set()).add(module)
    for req in PYPROJECT["project"]["optional-dependencies"]["server"]:
        name = norm(re.match(r"[A-Za-z0-9_.-]+", req).group())  # type: ignore[union-attr]
        if ";" in req and name not in provides:
            continue  # behind a marker this interpreter does not meet (tomli on Python >= 3.11)
        assert provides[name] & SERVER_EXTRA_MODULES, f"clients.cli.SERVER_EXTRA_MODULES lacks {req}"
