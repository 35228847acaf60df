# CPU image of the BIG service on the embedded model:
#   docker build -t big . && docker run -p 51000:51000 -e BIG_JWT_SECRET=... big
# For a GPU host see Dockerfile.cuda.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 JINA_HIDE_SURVEY=1 JINA_OPTOUT_TELEMETRY=1 PYTHONPATH=/app
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt
COPY . .
RUN useradd -m big && mkdir -p /app/workspace && chown -R big /app/workspace
USER big
EXPOSE 51000
VOLUME /app/workspace
# The supervisor runs `jina flow --uses flow.yml`, probes it, and restarts it when its executor dies; it stops the
# flow (SIGINT, then its process group) on SIGINT or SIGTERM. The health check is Jina's own readiness probe of the
# gateway and the executor behind it, for an orchestrator that replaces unhealthy containers.
STOPSIGNAL SIGINT
HEALTHCHECK --interval=30s --timeout=15s --start-period=600s --retries=3 \
    CMD jina ping flow grpc://127.0.0.1:51000 --timeout 10000 || exit 1
CMD ["python", "-m", "executor.supervise", "--port", "51000"]
