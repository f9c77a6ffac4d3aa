# The bring-your-own-container runtime of jina-embeddings-v3 (JV3_RUNTIME=byoc; the CDK stacks build and
# push it at deploy). SageMaker runs `docker run IMAGE serve`, mounts model.tar.gz unpacked at
# /opt/ml/model and talks to port 8080 (GET /ping, POST /invocations, GET /execution-parameters).
#   docker build -t jv3 .
#   docker run -p 8080:8080 -v $PWD/fixtures/jina-v3-tiny:/opt/ml/model jv3 serve
# A Debian base that still receives security patches (the PyTorch 2.6 inference DLC stopped receiving
# them on 2026-06-30). PyPI's torch wheel carries its CUDA libraries, so one image serves GPU instances
# (SageMaker provides the driver) and CPU ones; for a smaller CPU-only image pass
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG BASE=python:3.12-slim-bookworm
FROM ${BASE}

# Nothing is fetched at run time: the model is in /opt/ml/model, the Hub is never asked.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1 \
    JV3_DEVICE=auto

# torch 2.11 is the build the H100 figures in bench/RESULTS.md were measured with; the engine needs >= 2.6.
ARG TORCH_SPEC="torch==2.11.0"
ARG TORCH_INDEX=https://pypi.org/simple
ARG NUMPY_SPEC="numpy==2.4.6"
# both are exact pins, passed as build arguments (hadolint cannot see through the variables)
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" && pip install "${NUMPY_SPEC}"

# The endpoint's dependencies: the one pinned list the archive vendors and the tests run with.
# The list is their whole closure, hence --no-deps: exactly these versions, nothing resolved here.
WORKDIR /opt/program
COPY inference/requirements.txt /opt/program/requirements.txt
RUN pip install --no-deps -r /opt/program/requirements.txt

COPY inference/ /opt/program/inference/
ENV PYTHONPATH=/opt/program

EXPOSE 8080
ENTRYPOINT ["python", "-m", "inference.serve"]
CMD ["serve"]
