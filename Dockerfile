# The ratequeue image: one image for the worker, the exporter, the HTTP API, the simulator and the CLI
# (docker-compose.yml picks the command). Build: docker build -t ratequeue:local .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the package needs (see .dockerignore): the metadata first, then the package:
# ratequeue/ (whose config, worker, producer and sim are symlinks) and the folders they point to.
COPY pyproject.toml README.md ./
COPY ratequeue ./ratequeue
COPY config ./config
COPY worker ./worker
COPY producer ./producer
COPY sim ./sim
RUN pip install . \
    && useradd --create-home --uid 10001 ratequeue

USER ratequeue
ENV RATEQUEUE_DATA_DIR=/home/ratequeue/data
# 9808 worker metrics (RATEQUEUE_METRICS_PORT), 9809 exporter, 8900 simulator, 8080 HTTP API
EXPOSE 9808 9809 8900 8080
CMD ["ratequeue", "--help"]
