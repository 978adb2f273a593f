# censusvi: `make demo` runs the main job on ../shared/data; `make test` passes the suite.
SHELL := /bin/bash
PY := .venv/bin/python
DATA ?= ../shared/data
DEMO_OUT ?= demo_out
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup browser demo test bench lint format clean

setup:
	@bash .ci/setup-venv

browser:  # Debian chromium + chromedriver for the explorer's browser test
	@bash .ci/setup-browser

demo: setup
	$(PY) -m censusvi.demo --data $(DATA) --out $(DEMO_OUT)

test: setup browser
	$(PY) -m pytest -q --durations=15 tests

bench: setup
	$(PY) bench/train_throughput.py

lint: setup
	.venv/bin/ruff check platform tests bench jobs serve
	.venv/bin/ruff format --check platform tests bench jobs serve

format: setup
	.venv/bin/ruff format platform tests bench jobs serve
	.venv/bin/ruff check --fix platform tests bench jobs serve

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
