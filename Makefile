# Flywheel: the two commands a newcomer needs are `make demo` and `make test`.
# Both install what is missing first (a virtualenv in .venv, or $(VENV)), and start nothing else.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.installed-$(LOCK_HASH)

.PHONY: install demo up down status test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml deploy/checkov-requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[dev]'
	@# checkov (tests/deploy) pins packaging<24 and cachetools<6, which the project's pytest 9 and cachetools 8
	@# cannot share: it gets a virtualenv of its own inside this one.
	@test -x $(VENV)/checkov/bin/python || $(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/python -m pip install -q -r deploy/checkov-requirements.txt
	@# The CPU build of onnxruntime hides the CUDA provider of onnxruntime-gpu: never let it in.
	@if $(PY) -m pip show -q onnxruntime >/dev/null 2>&1; then \
		echo "removing onnxruntime (CPU): it shadows onnxruntime-gpu"; \
		$(PY) -m pip uninstall -y onnxruntime && $(PY) -m pip install --force-reinstall --no-deps onnxruntime-gpu; \
	fi
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install
	$(VENV)/bin/flywheel demo

up: install
	$(VENV)/bin/flywheel up --detach

down:
	$(VENV)/bin/flywheel down

status:
	$(VENV)/bin/flywheel status

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) -m bench

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info
