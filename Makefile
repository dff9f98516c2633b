# One task runner for people and CI. Each target creates .venv and installs what it needs: `run` only what
# Handrail needs, `test`, `lint` and `bench` the test tools as well. Each slow step says what it is doing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip --disable-pip-version-check

.PHONY: run test bench lint install clean

$(BIN)/python:
	@echo "Creating $(VENV), a Python environment of Handrail's own…"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Stamps: reinstall when pyproject.toml changes. pip's own output (a line per package) shows the progress.
$(VENV)/.installed-runtime: pyproject.toml | $(BIN)/python
	@echo "Installing Handrail's dependencies (about a minute)…"
	$(PIP) install --progress-bar on -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	@echo "Installing Handrail's dependencies and test tools (about a minute)…"
	$(PIP) install --progress-bar on -e '.[dev]'
	@touch $(VENV)/.installed-runtime $@

install: $(VENV)/.installed-dev  ## everything, test tools included

run: $(VENV)/.installed-runtime  ## run Handrail (all processes in one; embedded Redis when REDIS_URL is unset)
	$(BIN)/handrail up

test: $(VENV)/.installed-dev  ## run the test suite (a real Redis: REDIS_URL, else an embedded one; Dovecot for the email tests, Chromium for the console's)
	@bash .ci/install-dovecot
	@bash .ci/install-chromium
	$(BIN)/pytest

bench: $(VENV)/.installed-dev  ## drive full approval cycles and print throughput, latency and memory figures
	$(BIN)/python -m bench.cycles

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .handrail .pytest_cache .mypy_cache .ruff_cache
