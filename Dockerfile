# The gateway on a slim Python image, run as an unprivileged user.
# Configuration: mount a file at /etc/gateway/gateway.toml (or set GATEWAY_CONFIG)
# and pass secrets and overrides as environment variables, e.g.
#   docker run -p 8000:8000 -v $PWD/gateway.toml:/etc/gateway/gateway.toml:ro \
#     -e DIFY_API_KEY=app-... -e GATEWAY_DATABASE_URL=postgresql://... gateway
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_CONFIG=/etc/gateway/gateway.toml

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway \
    && mkdir -p /etc/gateway
# The repository's default configuration; the SQLite file lands in the working
# directory below, which the gateway user owns.
COPY gateway.toml /etc/gateway/gateway.toml

USER gateway
WORKDIR /var/lib/gateway
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
ENTRYPOINT ["gateway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
