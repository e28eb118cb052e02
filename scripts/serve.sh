#!/usr/bin/env bash
# The project's run command (README): sets up a venv on a fresh machine and starts vpt-serve on the
# embedded defaults (settings from VPT_* environment variables; flags are passed through).
#
# torch: the build that fits this host, CUDA where `nvidia-smi` lists a GPU, the CPU-only build
# otherwise (TORCH_BUILD=cpu|cuda chooses instead). An installed torch is kept unless the host has a GPU
# and it is a CPU-only build. Where torch comes from: scripts/venv.sh. A later start whose set-up is
# still current (pyproject.toml and torch unchanged) runs no pip.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT_NAME=serve.sh
# shellcheck source=scripts/venv.sh
. scripts/venv.sh

case "${TORCH_BUILD:-}" in
    cpu | cuda)
        build=$TORCH_BUILD why="TORCH_BUILD=$TORCH_BUILD"
        ;;
    "")
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
            build=cuda why="nvidia-smi lists a GPU"
        else
            build=cpu why="no GPU: nvidia-smi is not installed or lists none"
        fi
        ;;
    *)
        say "TORCH_BUILD must be cpu or cuda, not '$TORCH_BUILD'"
        exit 2
        ;;
esac

venv_create
if stamp_matches server "$build"; then
    say "$(stamp_torch server) (chose the $build build: $why); .venv is up to date"
else
    say "torch: chose the $build build ($why)"
    if [ -z "$(torch_dist_version)" ]; then
        install_torch "$build"
    elif [ "$build" = cuda ] && ! torch_has_cuda; then
        say "replacing the installed $(torch_describe) with the CUDA build"
        "$VPY" -m pip uninstall -q -y torch
        install_torch cuda
    else
        say "keeping the installed $(torch_describe)"
    fi
    if [ "$build" = cuda ] && ! torch_has_cuda; then
        say "warning: this torch has no CUDA support, so the server runs on the CPU. For the CUDA build:" \
            "$VPY -m pip uninstall -y torch, then TORCH_INDEX_URL=<PyTorch's index for your CUDA" \
            "version> bash scripts/serve.sh"
    fi
    "$VPY" -m pip install -q -e ".[server]"
    stamp_write server "$build"
fi
exec "$VENV/bin/vpt-serve" "$@"
