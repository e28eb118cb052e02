# vpt-serve container image (docs/deploy.md).
#
#   docker build -t vpt-serve .                                    # CUDA build of torch (default)
#   docker build -t vpt-serve:cpu --build-arg TORCH_VARIANT=cpu .  # CPU-only torch, no CUDA libraries
#
# The CUDA build needs no CUDA base image: the default index's Linux torch wheels bring their CUDA runtime
# as pip packages, and the NVIDIA Container Toolkit mounts the driver (`--gpus all`, compose
# `deploy.resources`). The image installs the `server` extra (pyproject.toml): the base dependencies
# alone are the client (README "Client only").
#
# tests/deploy/test_dockerfile.py runs the builder stage's ARG/ENV/WORKDIR/COPY/RUN lines as written in
# a fresh venv on the CI machine, then the runtime stage's entry command and HEALTHCHECK, so a broken
# step fails CI without a Docker engine. Keep RUN lines plain `sh` (no heredocs, no `--mount`).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# Where the virtual environment lives; the runtime stage copies this one directory.
ARG VENV=/opt/venv
# cuda (pip's default index: its Linux wheel is the CUDA build) or cpu (PyTorch's CPU-only index; the same
# default URL as scripts/venv.sh's TORCH_CPU_INDEX_URL, checked by tests/deploy/test_dockerfile.py).
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.13.0
# Overrides the index torch comes from (a mirror, or a specific CUDA build such as .../whl/cu126).
ARG TORCH_INDEX_URL=

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv "$VENV"
ENV VIRTUAL_ENV=${VENV} \
    PATH=${VENV}/bin:${PATH}

# Layer 1: torch alone (GBs for CUDA; changes only with the build args).
RUN set -eu; \
    case "$TORCH_VARIANT" in \
        cuda) index="${TORCH_INDEX_URL:-}" ;; \
        cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
        *) echo "TORCH_VARIANT must be cuda or cpu, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac; \
    set --; \
    if [ -n "$index" ]; then set -- --index-url "$index"; fi; \
    python -m pip install "$@" "torch==${TORCH_VERSION}"; \
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Layer 2: the project's dependencies with the `server` extra, read from pyproject.toml alone, so editing
# the source does not reinstall them. torch is already satisfied, so this never pulls a second torch build.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > requirements.txt \
    && python -m pip install -r requirements.txt

# Layer 3: the project itself (no dependency resolution: they are all installed above).
COPY README.md ./
COPY vpt ./vpt
COPY prompt_store ./prompt_store
COPY server ./server
COPY clients ./clients
RUN python -m pip install --no-deps . \
    && vpt-serve --help > /dev/null

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VENV=/opt/venv

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it and volumes can be chowned to it.
RUN groupadd --system --gid 10001 vpt \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/vpt --create-home --shell /usr/sbin/nologin vpt \
    && mkdir -p /data/store /data/hf /etc/vpt \
    && chown -R 10001:10001 /data /etc/vpt

COPY --from=builder ${VENV} ${VENV}

# The server's defaults for a container: every interface, the API on port 8000 and /metrics only on
# port 9464 (for Prometheus on the internal network: publish 8000 alone), the store and the backbone
# cache on volumes. Tenants: mount a directory holding tenants.toml at /etc/vpt (see docs/deploy.md).
ENV VIRTUAL_ENV=${VENV} \
    PATH=${VENV}/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VPT_HOST=0.0.0.0 \
    VPT_PORT=8000 \
    VPT_METRICS_PORT=9464 \
    VPT_STORE=/data/store \
    VPT_TENANTS_FILE=/etc/vpt/tenants.toml \
    HF_HOME=/data/hf

USER 10001:10001
WORKDIR /home/vpt
VOLUME ["/data/store", "/data/hf"]
EXPOSE 8000 9464

# Liveness only (the process answers HTTP); readiness is /readyz. The start period covers the first
# download of the backbone into HF_HOME. No curl in the slim image: Python's urllib does it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VPT_PORT', '8000'), timeout=4)"]

# SIGTERM: stop accepting, finish in-flight requests, exit 0 (allow VPT_REQUEST_TIMEOUT_S + 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["vpt-serve"]
