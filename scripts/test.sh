#!/usr/bin/env bash
# The project's one test command (README): sets up a venv on a fresh machine and runs lint + tests.
# torch is the pinned 2.13.0, installed first as the CPU-only build (PyTorch's CPU index, or pip's
# configured index when that cannot be reached: scripts/venv.sh) so nothing pulls a multi-GB CUDA build;
# an installed 2.13.0 of either build is kept. A set-up still current (pyproject.toml and torch
# unchanged) runs no pip.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT_NAME=test.sh
# shellcheck source=scripts/venv.sh
. scripts/venv.sh

venv_create
if ! stamp_matches test cpu; then
    case "$(torch_dist_version)" in
        "$TORCH_VERSION" | "$TORCH_VERSION"+*) say "keeping the installed $(torch_describe)" ;;
        *) install_torch cpu ;;
    esac
    "$VPY" -m pip install -q -e ".[test]"
    stamp_write test cpu
fi
"$VPY" -m ruff check .
"$VPY" -m ruff format --check .
if [ $# -gt 0 ]; then
    exec "$VPY" -m pytest "$@"
fi
# The whole suite in two runs: first every test but the `serial` ones on all cores (pytest-xdist;
# TEST_WORKERS=N sets the workers, 0 runs them in one process), then the `serial` ones, which measure
# latency, memory and capacity under load, with the machine to themselves.
"$VPY" -m pytest -n "${TEST_WORKERS:-auto}" -m "not serial"
"$VPY" -m pytest -m serial
