# GPU image: CUDA + torch + vLLM + A3PO Lab.
#   docker build -t a3po-lab .
#   docker run --gpus all -p 8501:8501 a3po-lab                       # the app (once it ships)
#   docker run --gpus all a3po-lab a3po train rollout.backend=hf model.path=/models/qwen
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/a3po
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY configs ./configs
COPY data ./data
# vLLM brings its own CUDA torch build; the project accepts it through the [gpu] extra.
RUN pip install --upgrade pip && pip install -e '.[gpu]'
EXPOSE 8501
CMD ["a3po", "train", "--config", "configs/demo.yaml"]
