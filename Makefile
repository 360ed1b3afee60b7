PYTHON ?= python3
export PYTHON

.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/setup.sh

## The main job on the embedded default: one question, ar vs pld vs rest, with statistics.
demo: setup
	$(PYTHON) -m decoding.cli demo

## The whole test suite.
test: setup
	$(PYTHON) -m pytest -q

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow"

## Engine benchmark (CPU, ~15 min): writes bench/results/engine.{json,md}.
bench: setup
	$(PYTHON) -m bench.engine
