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
# jina flow stops its executor processes on SIGINT; on SIGTERM (docker stop's default) it orphans them.
STOPSIGNAL SIGINT
CMD ["jina", "flow", "--uses", "flow.yml"]
