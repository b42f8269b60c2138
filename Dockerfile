# Samvad: one instance per container (docs/deploy.md has the Cloud Run recipe).
#
#   docker build -t samvad .
#   docker run -p 8080:8080 -e GOOGLE_CLOUD_PROJECT=my-project -e SAMVAD_STORE=firestore samvad
#
# PORT is honoured (Cloud Run sets it); everything else is SAMVAD_* configuration.

FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SAMVAD_HOST=0.0.0.0 \
    SAMVAD_LOG_FORMAT=json \
    SAMVAD_DATA_DIR=/tmp/samvad

# The package as this repository defines it (.dockerignore keeps the rest out).
COPY pyproject.toml README.md /src/
COPY samvad /src/samvad
RUN pip install --no-cache-dir /src \
    && rm -rf /src \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin samvad

# A numeric non-root user, so that Kubernetes' runAsNonRoot can check it.
USER 10001
EXPOSE 8080

# Ready, not merely alive: 503 while starting and once a shutdown has begun.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('SAMVAD_PORT') or os.environ.get('PORT') or '8080'; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:' + port + '/readyz', timeout=2).status == 200 else 1)"]

# samvad is PID 1 and drains on SIGTERM: WebSockets closed with 1001, writes flushed.
STOPSIGNAL SIGTERM
CMD ["samvad", "serve"]
