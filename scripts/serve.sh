#!/usr/bin/env bash
# The project's run command (README): sets up a venv on a fresh machine and starts vpt-serve on the
# embedded defaults (settings from VPT_* environment variables; flags are passed through).
# torch: an already-installed build (e.g. CUDA) is kept; otherwise the pinned 2.13.0 wheel is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e .
exec .venv/bin/vpt-serve "$@"
