FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY projections ./projections
COPY webhooks ./webhooks
# Without the `embedded` extra: servers come from REDIS_URL / DATABASE_URL (the
# embedded Valkey and PostgreSQL are for laptops and tests; without the URLs a
# command fails naming them and the extra). With `otel`: spans are exported when
# OTEL_EXPORTER_OTLP_ENDPOINT is set (and nothing is when it is not).
RUN pip install --no-cache-dir ".[otel]"
USER nobody
ENTRYPOINT []
CMD ["agentrt", "--help"]
