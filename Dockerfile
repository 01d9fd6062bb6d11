FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY projections ./projections
COPY webhooks ./webhooks
RUN pip install --no-cache-dir .
# Servers come from REDIS_URL / DATABASE_URL; the embedded ones are for laptops and tests.
USER nobody
ENTRYPOINT []
CMD ["agentrt", "--help"]
