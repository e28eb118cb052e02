# Sourced by scripts/serve.sh and scripts/test.sh, not run on its own: the `.venv` they share, the torch
# build in it, and a stamp so that an environment already set up is not reinstalled at every start.
#
# torch is installed first, on its own, so the project's `torch>=2.4` (the `server` extra) is already
# satisfied when pyproject.toml's dependencies are installed and pip never chooses a build by itself:
#   cpu   from PyTorch's CPU-only index ($TORCH_CPU_INDEX_URL: ~200 MB, no CUDA libraries). If that index
#         does not answer within $TORCH_INDEX_TIMEOUT_S seconds, torch==$TORCH_VERSION comes from pip's
#         configured index instead, and the script says so: from the default index on Linux x86_64 that
#         is the CUDA build (several GB); a machine whose pip has a local CPU wheel takes that one.
#   cuda  from pip's configured index (the default index's Linux wheels are CUDA builds).
# TORCH_INDEX_URL, when set, is the index for either build, as given (a mirror of the CPU index, or
# PyTorch's index for another CUDA version), with no fallback.
#
# The stamp (.venv/.vpt-setup-<extra>) holds a hash of pyproject.toml, the torch build asked for and the
# torch installed; while it matches, pip is not run. `rm .venv/.vpt-setup-*` forces a new set-up.

TORCH_VERSION=2.13.0
# PyTorch's own download index for its CPU-only wheels (not a general package index). The scripts name
# it here only; the Dockerfile's `cpu` variant has the same default (tests/deploy checks they agree).
TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_TIMEOUT_S=${TORCH_INDEX_TIMEOUT_S:-10}

VENV=.venv
VPY=$VENV/bin/python

say() {
    echo "${SCRIPT_NAME:-setup}: $*" >&2
}

venv_create() {
    if [ ! -x "$VPY" ]; then
        "${PYTHON:-python3}" -m venv "$VENV"
        "$VPY" -m pip install -q --upgrade pip
    fi
}

# The installed torch's version as its distribution names it (2.13.0+cpu, 2.13.0, ...), or nothing.
# Read from the file system: importing torch takes seconds.
torch_dist_version() {
    local info
    for info in "$VENV"/lib/python*/site-packages/torch-*.dist-info; do
        if [ -d "$info" ]; then
            info=${info##*/torch-}
            echo "${info%.dist-info}"
            return
        fi
    done
}

# One line on the installed torch, e.g. "torch 2.13.0+cpu, a CPU-only build".
torch_describe() {
    "$VPY" -W ignore -c "import torch; c = torch.version.cuda; \
print(f'torch {torch.__version__}, ' + (f'a CUDA {c} build' if c else 'a CPU-only build'))"
}

torch_has_cuda() {
    "$VPY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"
}

# Whether an index answers at all, bounded in time: pip itself retries a dropped connection for minutes.
index_reachable() {
    "$VPY" - "$1" "$TORCH_INDEX_TIMEOUT_S" 2>/dev/null <<'PY'
import sys, threading, urllib.request

url, timeout = sys.argv[1].rstrip("/") + "/torch/", float(sys.argv[2])
answered = []


def probe():
    with urllib.request.urlopen(url, timeout=timeout):
        answered.append(True)


worker = threading.Thread(target=probe, daemon=True)  # the join also bounds a slow name lookup
worker.start()
worker.join(timeout)
sys.exit(0 if answered else 1)
PY
}

# install_torch cpu|cuda: torch==$TORCH_VERSION of that build (see the top of this file).
install_torch() {
    local build=$1 url=${TORCH_INDEX_URL:-}
    if [ "$build" = cpu ] && [ -z "$url" ]; then
        if index_reachable "$TORCH_CPU_INDEX_URL"; then
            url=$TORCH_CPU_INDEX_URL
        else
            say "PyTorch's CPU index ($TORCH_CPU_INDEX_URL) could not be reached (waited up to" \
                "${TORCH_INDEX_TIMEOUT_S}s);" \
                "installing torch==$TORCH_VERSION from pip's configured index instead (from the default" \
                "index on Linux x86_64 that is the CUDA build, several GB: set TORCH_INDEX_URL to a" \
                "mirror of the CPU index to avoid it)"
        fi
    fi
    if [ -n "$url" ]; then
        say "installing torch==$TORCH_VERSION ($build build) from $url"
        "$VPY" -m pip install -q --index-url "$url" "torch==$TORCH_VERSION"
    else
        say "installing torch==$TORCH_VERSION from pip's configured index"
        "$VPY" -m pip install -q "torch==$TORCH_VERSION"
    fi
    say "installed $(torch_describe)"
}

_pyproject_hash() {
    "$VPY" -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read()).hexdigest())"
}

# stamp_matches <extra> <build>: the last set-up for this extra and build is still what is installed.
stamp_matches() {
    local stamp=$VENV/.vpt-setup-$1
    [ -f "$stamp" ] && [ -x "$VENV/bin/vpt-serve" ] \
        && [ "$(head -n 1 "$stamp")" = "$(_pyproject_hash) $2 torch-$(torch_dist_version)" ]
}

# stamp_write <extra> <build>: after a completed set-up; the second line describes torch for later starts.
stamp_write() {
    printf '%s\n%s\n' "$(_pyproject_hash) $2 torch-$(torch_dist_version)" "$(torch_describe)" \
        >"$VENV/.vpt-setup-$1"
}

# The description stamp_write kept (no torch import).
stamp_torch() {
    sed -n 2p "$VENV/.vpt-setup-$1"
}
