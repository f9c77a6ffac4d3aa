# BYOC image for jina-embeddings-v3: SageMaker runs `docker run IMAGE serve` and talks to port 8080
# (GET /ping, POST /invocations, GET /execution-parameters). The model archive is mounted at /opt/ml/model.
#   docker build -t jv3 .            (GPU: --build-arg BASE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime)
#   docker run -p 8080:8080 -v $PWD/fixtures/jina-v3-tiny:/opt/ml/model jv3 serve
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    JV3_DEVICE=auto
ARG TORCH_SPEC="torch==2.6.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# torch first (CPU wheels by default; a CUDA base image already has it and pip keeps it), then the rest
RUN python -c "import torch" 2>/dev/null || pip install --index-url ${TORCH_INDEX} "${TORCH_SPEC}"
RUN pip install "transformers==5.23.0" "tokenizers==0.23.3" "safetensors==0.8.0" "huggingface_hub==2.4.0" "numpy>=1.26"

WORKDIR /opt/program
COPY inference/ /opt/program/inference/
ENV PYTHONPATH=/opt/program

EXPOSE 8080
ENTRYPOINT ["python", "-m", "inference.serve"]
CMD ["serve"]
