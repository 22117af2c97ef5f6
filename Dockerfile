# lotcast image: one image for both roles. The k8s manifests run it as
#   lotcast broadcaster   and   lotcast relay
# with every setting from LOTCAST_<FIELD> environment variables (lotcast/config.py).
# Build: docker build -t lotcast:0.1.0 .   (the tag k8s/base/kustomization.yaml refers to)

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# gcc + libc headers build the native fan-out extension (lotcast/media/_fanout.c); without
# them pip silently installs the pure-Python path
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py ./
COPY lotcast ./lotcast
COPY broadcaster ./broadcaster
COPY relay ./relay
COPY viewer_web ./viewer_web
RUN pip install .

FROM python:3.11-slim
# tini is PID 1: it forwards SIGTERM to lotcast (the relay drains on it) and reaps children.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 lotcast \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin lotcast
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOTCAST_HOST=0.0.0.0
# Numeric, so Kubernetes can verify runAsNonRoot; matches runAsUser in k8s/.
USER 10001:10001
# 8080: broadcaster HTTP, 8081: relay HTTP (WHIP/WHEP, WebSocket, /metrics, /healthz, /readyz).
# WebRTC media uses UDP ports picked per session (hostNetwork in k8s).
EXPOSE 8080 8081
# Kubernetes probes /healthz and /readyz; no Docker HEALTHCHECK needed there.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/bin/tini", "--", "lotcast"]
CMD ["relay"]
