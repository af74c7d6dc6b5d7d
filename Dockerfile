# GPU images for A3PO Lab. No Docker engine builds them in CI; `hadolint` lints this file there
# (tests/test_dockerfile.py) and the versions below are the pins of the packages they install.
#
#   docker build -t a3po-lab .                          # default target: app + engine + vLLM
#   docker build --target verl -t a3po-lab-verl .       # verl 0.9.1 (its own torch/vLLM/transformers pins)
#   docker run --gpus all -p 8501:8501 a3po-lab                       # the app on http://localhost:8501
#   docker run --gpus all -v $PWD/runs:/opt/a3po/runs a3po-lab a3po train rollout.backend=vllm model.path=/models/qwen
#   docker run --gpus all a3po-lab bash scripts/gpu_check.sh
#
# Why CUDA 13.0: vLLM 0.33.0 pins torch 2.14.0 and verl[vllm] 0.9.1 pins torch 2.11.0, both CUDA 13.0
# builds on PyPI. A CUDA 12.x base would run them on a driver stack they were not built for.
# Why two images: verl pins transformers<5.11 while vLLM 0.33 needs >=5.16.1; one environment cannot hold both.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# Triton compiles its CUDA driver stub at run time: it needs a C compiler and Python.h, which
# --no-install-recommends would otherwise leave out. The Ubuntu release is pinned by the base image tag.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-pip python3-dev build-essential git make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/a3po
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir pip==26.3
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY app ./app
COPY configs ./configs
COPY data ./data
COPY scripts ./scripts
COPY examples ./examples

# verl's image: verl with its own vLLM/torch/transformers pins, the project on top without its deps
# (its app dependencies are light and unpinned by verl).
FROM base AS verl
# verl's default (v1) trainer imports TransferQueue and the rollout server's packages, which its extras omit.
RUN pip install --no-cache-dir "verl[vllm,math]==0.9.1" \
    && pip install --no-cache-dir TransferQueue==0.1.11 cachetools==8.0.2 fastapi==0.165.0 uvicorn==0.54.0 \
    && pip install --no-cache-dir duckdb==2.0.1 streamlit==1.67.0 plotly==7.1.0 tabulate==0.10.0 \
    && pip install --no-cache-dir --no-deps -e .
CMD ["bash", "examples/verl_a3po_multinode.sh"]

# The default image: the engine, the app and vLLM (which brings its own CUDA 13.0 torch build).
FROM base AS app
RUN pip install --no-cache-dir "vllm==0.33.0" && pip install --no-cache-dir -e '.[gpu]'
EXPOSE 8501
# Inside the container the app must listen beyond loopback for -p to reach it, so its Launch page
# (which starts training jobs) is off; add --allow-launch to this command on a trusted network only.
CMD ["a3po", "app", "--host", "0.0.0.0", "--headless", "--store", "/opt/a3po/runs"]
