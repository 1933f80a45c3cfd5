# The gateway on a slim Python image, run as an unprivileged user.
# Configuration: mount a file at /etc/gateway/gateway.toml (or set GATEWAY_CONFIG)
# and pass secrets and overrides as environment variables, e.g.
#   docker run -p 8000:8000 -v $PWD/gateway.toml:/etc/gateway/gateway.toml:ro \
#     -e DIFY_API_KEY=app-... -e GATEWAY_DATABASE_URL=postgresql://... gateway
# deploy/compose.yaml and deploy/kubernetes/ run it; docs/deploy.md explains both.
#
# BASE: any image with python3 (>= 3.11) and its venv module. The default is the
# official one; a machine without a registry can build on a local one (CI builds on
# a Debian bookworm made with mmdebstrap, see .ci/container).
ARG BASE=python:3.12-slim
FROM ${BASE}

# pip inside the build reaches PyPI the way pip does anywhere: pass
# --build-arg PIP_INDEX_URL=... (and PIP_EXTRA_INDEX_URL) for a mirror, and behind
# a TLS-inspecting proxy its CA bundle as the build secret pip_cert
# (--secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt): a secret is
# mounted for the one step, never stored in a layer.
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_CONFIG=/etc/gateway/gateway.toml \
    PATH=/opt/gateway/bin:$PATH

# A virtual environment: the same on the official image and on a distribution's
# Python, which refuses a system-wide pip install (PEP 668). The source is not kept.
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && if [ -z "$PIP_INDEX_URL" ]; then unset PIP_INDEX_URL; fi \
    && if [ -z "$PIP_EXTRA_INDEX_URL" ]; then unset PIP_EXTRA_INDEX_URL; fi \
    && python3 -m venv /opt/gateway \
    && /opt/gateway/bin/pip install /src \
    && rm -rf /src \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway --create-home gateway \
    && mkdir -p /etc/gateway /var/spool/gateway \
    && chown gateway /var/spool/gateway
# The repository's default configuration; the SQLite file lands in the working
# directory below, which the gateway user owns. A deployment mounts its own.
COPY gateway.toml /etc/gateway/gateway.toml

USER gateway
WORKDIR /var/lib/gateway
# /var/spool/gateway: where deploy/ puts database.spool_file, on a volume of its own
# (usage records the database would not take, replayed at the next start).
EXPOSE 8000
# SIGTERM (the default stop signal) starts the graceful shutdown: open answers get
# server.shutdown_grace seconds, then up to 10 s to be recorded (docs/proxy.md).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
ENTRYPOINT ["gateway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
