# Hydro Serving. Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev run test lint typecheck protos bench-deps bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $@

install: $(STAMP)

install-dev: $(DEV_STAMP)

## Start the embedded stack (etcd, xds_control, manager_api, ingress Envoy) with the demo application.
run: $(STAMP)
	$(VENV)/bin/hydro up --demo

## Regenerate the Open Inference Protocol Python code and type stubs from protos/*.proto.
protos: $(DEV_STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=. \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=. \
		protos/inference.proto

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(DEV_STAMP)
	$(VENV)/bin/mypy

## Lint, type check and the whole test suite (unit, integration with real etcd/Envoy/runtimes, end-to-end).
test: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -p no:cacheprovider

## Load generators for benchmarks/ (Debian packages): h2load for gRPC/HTTP2, wrk for HTTP/1.1.
bench-deps: $(DEV_STAMP)
	command -v h2load >/dev/null && command -v wrk >/dev/null || \
		( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client wrk )

bench: bench-deps
	$(PY) benchmarks/mesh_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
