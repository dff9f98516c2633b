# One task runner for people and CI. Each target creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test bench lint install clean

$(BIN)/handrail: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/handrail

run: install  ## run Handrail (all processes in one; embedded Redis when REDIS_URL is unset)
	$(BIN)/handrail up

test: install  ## run the test suite (a real Redis: REDIS_URL, else an embedded one; Dovecot for the email tests)
	@bash .ci/install-dovecot
	$(BIN)/pytest

bench: install  ## drive full approval cycles and print throughput, latency and memory figures
	$(BIN)/python -m bench.cycles

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .handrail .pytest_cache .mypy_cache .ruff_cache
