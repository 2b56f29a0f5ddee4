# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch first: a plain `pip install torch` pulls gigabytes of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check
DEMO_DIR ?= demo-data
DEMO_DB ?= $(DEMO_DIR)/demo.db
PHOTOS ?=
DEMO_PHOTOS := $(if $(PHOTOS),$(PHOTOS),$(DEMO_DIR)/photos)
DEMO_QUERY ?= a cat

.PHONY: demo test lint venv clean install-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) "$(TORCH_SPEC)"

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

# the wheel as a user installs it (pip's defaults): the core without torch, and the torch extra
install-check: $(VENV)/.installed-dev
	scripts/install_check.sh all

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
