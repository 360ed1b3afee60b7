PYTHON ?= python3
export PYTHON

.PHONY: setup demo demo-engine test test-fast bench

setup:
	@bash scripts/setup.sh

## The main job on the embedded default: a datastore from a GSM8K slice (Ray Data pipeline), its
## index, Ray Serve, one question over HTTP with SENSE and with plain decoding, speedup and MAT.
demo: setup
	$(PYTHON) -m pipelines.quickstart
	$(PYTHON) -m serving.quickstart

## The engine alone, in process: one question with ar, pld, rest, dense and sense.
demo-engine: setup
	$(PYTHON) -m decoding.cli demo

## The whole test suite.
test: setup
	$(PYTHON) -m pytest -q --durations=40

## The inner loop (a minute or two): no model, no cluster, nothing slow.
test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow and not cluster and not model"

## Engine benchmark (CPU, ~20 min on 2 cores): writes bench/results/engine.{json,md}.
bench: setup
	$(PYTHON) -m bench.engine
