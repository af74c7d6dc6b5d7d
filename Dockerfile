# GPU image: CUDA + torch + vLLM + A3PO Lab.
#   docker build -t a3po-lab .
#   docker run --gpus all -p 8501:8501 a3po-lab                       # the app on http://localhost:8501
#   docker run --gpus all -v $PWD/runs:/opt/a3po/runs a3po-lab a3po train rollout.backend=vllm model.path=/models/qwen
#   docker run --gpus all a3po-lab bash scripts/gpu_check.sh
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/a3po
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY app ./app
COPY configs ./configs
COPY data ./data
COPY scripts ./scripts
COPY examples ./examples
# vLLM brings its own CUDA torch build; the project accepts it through the [gpu] extra.
RUN pip install --upgrade pip && pip install -e '.[gpu]'
EXPOSE 8501
# Inside the container the app must listen beyond loopback for -p to reach it, so its Launch page
# (which starts training jobs) is off; add --allow-launch to this command on a trusted network only.
CMD ["a3po", "app", "--host", "0.0.0.0", "--headless", "--store", "/opt/a3po/runs"]
