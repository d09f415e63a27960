# syntax=docker/dockerfile:1
# The one TrustMesh image: registry, sidecar, webhook and reconciler are all
# `trustmesh <command>`. Build from the repository root:
#   docker build -t trustmesh/trustmesh:0.1.0 .
# The tag must match the manifests in k8s/ (tests/k8s/test_k8s_image.py checks it).

# -- builder: make wheels for trustmesh[k8s] and everything it needs ----------------
FROM python:3.11-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trustmesh/ trustmesh/
COPY sidecar/ sidecar/
COPY registry/ registry/
RUN pip wheel --wheel-dir /wheels '.[k8s]'

# -- runtime: the wheels installed into a slim Python, no compilers, non-root ----------
FROM python:3.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="trustmesh" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="TrustMesh: registry, sidecar, injector and reconciler" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# The wheels are bind-mounted from the builder, so no layer of this image holds them.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels 'trustmesh[k8s]' \
    && groupadd --system --gid 65532 trustmesh \
    && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin trustmesh
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["trustmesh"]
CMD ["--help"]
