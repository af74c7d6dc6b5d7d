# A3PO Lab: every command creates the environment on first use.
#   make demo    install, train A3PO on the embedded model (~2 min on 2 CPU cores), then open the app
#   make test    install if needed, run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo train-demo test bench build-tiny-model clean

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

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/bench_step.py

build-tiny-model: install
	$(VENV)/bin/a3po build-tiny-model

clean:
	rm -rf $(VENV) runs .pytest_cache
