# The Runpod serverless worker: NVIDIA's Triton image plus the gateway, models baked in at build time so
# that a cold start downloads nothing. `python -m gateway` starts Triton inside the container on loopback
# (explicit model control, loading on first use) and then the Runpod worker.
#
#   docker build -f Dockerfile -t depth-gateway .
#   docker build -f Dockerfile --build-arg MODELS=all -t depth-gateway .
# Local check of the Runpod API: docker run --gpus all -p 8000:8000 depth-gateway \
#   python3 -m gateway --rp_serve_api --rp_api_host 0.0.0.0 --rp_api_port 8000
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.01-py3

FROM python:3.11-slim AS export
WORKDIR /src
COPY pyproject.toml README.md ./
COPY catalogue ./catalogue
COPY export ./export
COPY gateway ./gateway
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[export]"  # versions pinned in pyproject.toml
ARG MODELS=depth-anything/Depth-Anything-V2-Small-hf
ARG EXPORT_ARGS=""
# MODELS and EXPORT_ARGS are word-split on purpose: several ids, several flags.
RUN python -m export $MODELS $EXPORT_ARGS --repository /models

FROM ${TRITON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    MODEL_REPOSITORY=/app/model_repository \
    DEPTH_MODEL=depth-anything/Depth-Anything-V2-Small-hf
WORKDIR /app
COPY pyproject.toml README.md ./
# The worker needs the model table, not the exporter.
COPY catalogue ./catalogue
COPY gateway ./gateway
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --break-system-packages ".[gateway]"  # versions pinned in pyproject.toml
COPY --from=export --chown=triton-server:triton-server /models /app/model_repository
# TensorRT's engine and timing caches: the configs name /opt/depth/tensorrt-cache; the worker points it
# at TENSORRT_CACHE_DIR (/runpod-volume/tensorrt-cache when a network volume is attached) at start.
RUN mkdir -p /opt/depth/tensorrt-cache && chown -R triton-server:triton-server /opt/depth
# hadolint ignore=DL3066
USER triton-server
CMD ["python3", "-m", "gateway"]
