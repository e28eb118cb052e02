"""scripts/serve.sh and scripts/test.sh (the README's two commands) and scripts/venv.sh, run as written on
a stand-in `.venv`: its `python` records every call and simulates pip and torch (anything else runs on
the real interpreter), `nvidia-smi` is a stub on PATH. Checked: which torch build is installed from
which index, the fall-back when PyTorch's CPU index cannot be reached, and that a set-up still current
runs no pip. Seconds, no network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for .venv/bin/python: logs each call; pip, torch and the index probe are simulated.
printf '%s\n' "$*" >> "$FAKE_LOG"
site="$(dirname "$0")/../lib/python3.11/site-packages"
case "$1 $2 $3" in
    "-m pip install")
        if [[ " $* " == *" torch=="* ]]; then
            rm -rf "$site"/torch-*.dist-info
            mkdir -p "$site/torch-$FAKE_TORCH_DIST.dist-info"
        fi
        exit 0 ;;
    "-m pip uninstall") rm -rf "$site"/torch-*.dist-info; exit 0 ;;
    "-m ruff "* | "-m pytest "*) exit 0 ;;
esac
case "$*" in
    *"import torch; c ="*)
        if [ "$FAKE_CUDA" = 1 ]; then echo "torch $FAKE_TORCH_DIST, a CUDA 12.8 build"
        else echo "torch $FAKE_TORCH_DIST, a CPU-only build"; fi
        exit 0 ;;
    *"import sys, torch"*) [ "$FAKE_CUDA" = 1 ]; exit ;;
    "- "*) cat > /dev/null; [ "$FAKE_INDEX" = 1 ]; exit ;;
esac
exec "$REAL_PYTHON" "$@"
"""


class Checkout:
    """A scratch copy of the scripts and pyproject.toml with a stand-in `.venv`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "scripts").mkdir(parents=True)
        for name in ("serve.sh", "test.sh", "venv.sh"):
            shutil.copy2(REPO / "scripts" / name, root / "scripts" / name)
        shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
        bin_dir = root / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        (root / ".venv" / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
        self._script(bin_dir / "python", FAKE_PYTHON)
        self._script(bin_dir / "vpt-serve", '#!/usr/bin/env bash\necho "vpt-serve $*" >> "$FAKE_LOG"\n')
        self.stubs = root / "stubs"
        self.stubs.mkdir()
        self.log = root / "calls.log"
        self.gpu(False)

    @staticmethod
    def _script(path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o755)

    def gpu(self, present: bool) -> None:
        out = "echo 'GPU 0: NVIDIA H200 (UUID: GPU-0)'" if present else "echo 'No devices were found'; exit 6"
        self._script(self.stubs / "nvidia-smi", f"#!/usr/bin/env bash\n{out}\n")

    def torch_installed(self, dist: str | None) -> None:
        site = self.root / ".venv" / "lib" / "python3.11" / "site-packages"
        for old in site.glob("torch-*.dist-info"):
            old.rmdir()
        if dist:
            (site / f"torch-{dist}.dist-info").mkdir()

    def run(
        self,
        script: str,
        *args: str,
        index: bool = False,
        cuda: bool = False,
        dist: str = "2.13.0+cpu",
        **env: str,
    ) -> tuple[list[str], str]:
        """(the calls the stand-ins saw, stderr) of `bash scripts/<script> args`."""
        self.log.write_text("")
        proc = subprocess.run(
            ["bash", f"scripts/{script}", *args],
            cwd=self.root,
            env={
                "PATH": f"{self.stubs}:/usr/bin:/bin",
                "HOME": str(self.root),
                "FAKE_LOG": str(self.log),
                "FAKE_INDEX": "1" if index else "0",
                "FAKE_CUDA": "1" if cuda else "0",
                "FAKE_TORCH_DIST": dist,
                "REAL_PYTHON": sys.executable,
                **env,
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr}"
        return self.log.read_text().splitlines(), proc.stderr


def pip_calls(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("-m pip ")]


@pytest.fixture
def checkout(tmp_path) -> Checkout:
    return Checkout(tmp_path / "checkout")


def test_serve_installs_once_then_starts_without_pip(checkout):
    calls, err = checkout.run("serve.sh", "--port", "9", index=True)
    assert pip_calls(calls) == [
        f"-m pip install -q --index-url {CPU_INDEX} torch==2.13.0",
        "-m pip install -q -e .[server]",
    ]
    assert calls[-1] == "vpt-serve --port 9"
    assert "chose the cpu build (no GPU" in err and "installed torch 2.13.0+cpu, a CPU-only build" in err

    calls, err = checkout.run("serve.sh", "--port", "9")
    assert pip_calls(calls) == [], calls  # up to date: straight to the server
    assert calls[-1] == "vpt-serve --port 9"
    assert "torch 2.13.0+cpu, a CPU-only build (chose the cpu build: no GPU" in err and "up to date" in err

    with open(checkout.root / "pyproject.toml", "a") as f:
        f.write("# a new dependency\n")
    calls, err = checkout.run("serve.sh")
    assert pip_calls(calls) == ["-m pip install -q -e .[server]"]  # torch is kept
    assert "keeping the installed torch 2.13.0+cpu" in err


def test_cpu_index_out_of_reach_falls_back_to_the_pinned_install_and_says_so(checkout):
    calls, err = checkout.run("test.sh", "-q", index=False)
    assert pip_calls(calls) == ["-m pip install -q torch==2.13.0", "-m pip install -q -e .[test]"]
    assert f"PyTorch's CPU index ({CPU_INDEX}) could not be reached" in err
    assert "CUDA build" in err and "TORCH_INDEX_URL" in err  # what the fall-back may bring, and the way out
    assert calls[-3:] == ["-m ruff check .", "-m ruff format --check .", "-m pytest -q"]


def test_test_sh_installs_the_cpu_build_and_keeps_an_installed_2_13(checkout):
    calls, _ = checkout.run("test.sh", index=True)
    assert pip_calls(calls)[0] == f"-m pip install -q --index-url {CPU_INDEX} torch==2.13.0"
    checkout.torch_installed("2.13.0")  # e.g. serve.sh's CUDA build on a GPU machine: the stamp is stale
    calls, err = checkout.run("test.sh", index=True, cuda=True, dist="2.13.0")
    assert pip_calls(calls) == ["-m pip install -q -e .[test]"]
    assert "keeping the installed torch 2.13.0, a CUDA 12.8 build" in err
    checkout.torch_installed("2.5.1+cpu")  # another version: replaced by the pinned one
    calls, _ = checkout.run("test.sh", index=True)
    assert pip_calls(calls)[0] == f"-m pip install -q --index-url {CPU_INDEX} torch==2.13.0"


def test_torch_index_url_is_used_as_given(checkout):
    calls, err = checkout.run("test.sh", index=False, TORCH_INDEX_URL="https://mirror.example/whl/cpu")
    assert not any(c.startswith("- ") for c in calls), "no probe of PyTorch's index when one is given"
    assert pip_calls(calls)[0] == "-m pip install -q --index-url https://mirror.example/whl/cpu torch==2.13.0"
    assert "could not be reached" not in err


def test_serve_on_a_gpu_host_replaces_a_cpu_only_torch_with_the_cuda_build(checkout):
    checkout.gpu(True)
    checkout.torch_installed("2.13.0+cpu")
    calls, err = checkout.run("serve.sh", cuda=False, dist="2.13.0")
    assert pip_calls(calls) == [
        "-m pip uninstall -q -y torch",
        "-m pip install -q torch==2.13.0",  # pip's configured index: its Linux wheel is the CUDA build
        "-m pip install -q -e .[server]",
    ]
    assert "chose the cuda build (nvidia-smi lists a GPU)" in err
    # The stand-in index served a CPU-only build again: said, and not retried at every start.
    assert "has no CUDA support, so the server runs on the CPU" in err
    calls, _ = checkout.run("serve.sh", cuda=False, dist="2.13.0")
    assert pip_calls(calls) == []

    checkout.torch_installed("2.13.0")
    (checkout.root / ".venv" / ".vpt-setup-server").unlink()
    calls, err = checkout.run("serve.sh", cuda=True, dist="2.13.0")
    assert pip_calls(calls) == ["-m pip install -q -e .[server]"]  # a CUDA build is kept
    assert "keeping the installed torch 2.13.0, a CUDA 12.8 build" in err and "no CUDA support" not in err


def test_torch_build_chooses_instead_of_the_host(checkout):
    checkout.gpu(True)
    calls, err = checkout.run("serve.sh", index=True, TORCH_BUILD="cpu")
    assert pip_calls(calls)[0] == f"-m pip install -q --index-url {CPU_INDEX} torch==2.13.0"
    assert "chose the cpu build (TORCH_BUILD=cpu)" in err
