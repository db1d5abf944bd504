# syntax=docker/dockerfile:1
#
# refreshd worker image.
#
#   docker build -t refreshd:0.1.0 .
#   docker run --rm --read-only -e REFRESHD_REDIS_URL=redis://:PASSWORD@redis:6379/0 \
#       -p 9464:9464 refreshd:0.1.0            # `refreshd run` is the default command
#
# Two stages on the same slim Python base: the first builds the refreshd wheel
# and installs it with every dependency pinned by constraints.txt into a
# virtualenv that has no pip; the second copies only that virtualenv. No
# compiler, no pip, no build backend and no source tree reach the image.
#
# Pin the base by digest in your build pipeline for reproducible builds:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# The build backend (pyproject's build-system) is pinned here: it is not a
# runtime dependency, so it lives in this stage only.
RUN pip install --no-cache-dir setuptools==84.2.1 wheel==0.48.0

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out).
COPY pyproject.toml constraints.txt README.md ./
COPY worker/ worker/

# Build the wheel without network access to a build backend, then install it
# and its dependencies, exactly as pinned in constraints.txt, into a venv that
# has no pip of its own (pip --python installs into it from outside).
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels . \
    && python -m venv --without-pip /opt/refreshd \
    && pip --python /opt/refreshd/bin/python install --no-cache-dir \
        --constraint constraints.txt /wheels/refreshd-*.whl \
    && /opt/refreshd/bin/refreshd --help > /dev/null


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="refreshd" \
      org.opencontainers.image.description="Keeps OAuth credentials fresh ahead of expiry; a refresh token is never sent twice." \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid, so Kubernetes can verify runAsNonRoot and volumes
# can be given to it with fsGroup.
RUN groupadd --system --gid 10001 refreshd \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin refreshd \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/refreshd

COPY --from=build /opt/refreshd /opt/refreshd

# Read-only root filesystem friendly: bytecode was compiled at install time and
# is never written at run time; the only writable path refreshd may need is
# REFRESHD_DATA_DIR, which is used only when REFRESHD_REDIS_URL is unset (the
# embedded Valkey server for trying it out): mount a volume there in that case.
# REFRESHD_HTTP_HOST=0.0.0.0: probes and Prometheus reach /healthz, /readyz
# and /metrics from outside the container.
ENV PATH=/opt/refreshd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    REFRESHD_DATA_DIR=/var/lib/refreshd \
    REFRESHD_HTTP_HOST=0.0.0.0 \
    REFRESHD_HTTP_PORT=9464

WORKDIR /var/lib/refreshd
USER 10001:10001
EXPOSE 9464

# No HEALTHCHECK on purpose: Kubernetes ignores it (the Deployment's startup,
# liveness and readiness probes on /healthz and /readyz are the health checks),
# and a second check running inside the container would only cost a Python
# start-up every interval. Outside Kubernetes, add one at run time:
#   docker run --health-cmd 'python -c "import urllib.request as u; u.urlopen(\"http://127.0.0.1:9464/healthz\", timeout=3)"' ...

# Exec form: refreshd is PID 1 and receives SIGTERM itself; it then stops
# claiming, drains in-flight refreshes for REFRESHD_DRAIN_GRACE_SECONDS and
# exits 0. It starts no child processes when REFRESHD_REDIS_URL is set.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/refreshd/bin/refreshd"]
CMD ["run"]
