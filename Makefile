# Hydro Serving. Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
MLSERVER_VENV := .venv-mlserver
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed
KSERVE_VENV := .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed

.PHONY: install install-dev kserve-venv run test lint typecheck protos bench-deps bench clean

## xds-protos ships its own, older copy of opentelemetry/proto/* (for Envoy's tracer config): whichever package
## pip installs last owns those files. opentelemetry-proto's (a superset) must win, or the OTLP exporter cannot
## import (InstrumentationScope); reinstalling it, same version, last makes that so whatever pip's order was.
OTEL_PROTO_LAST = $(PY) -m pip install --quiet --force-reinstall --no-deps \
	"opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	$(OTEL_PROTO_LAST)
	touch $@

$(DEV_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(OTEL_PROTO_LAST)
	touch $(STAMP) $@

## KServe's Python client in a virtualenv of its own: `kserve` pins another protobuf major than ours and defines its
## own `inference` proto package. Used by tests/runtimes/test_runtime_conformance.py, which skips the KServe checks
## (saying why) if the virtualenv could not be made, e.g. without access to PyPI.
$(KSERVE_STAMP):
	rm -rf $(KSERVE_VENV)
	( $(PYTHON) -m venv $(KSERVE_VENV) && $(KSERVE_VENV)/bin/pip install --quiet 'kserve==0.21.0' && touch $@ ) || \
		( rm -rf $(KSERVE_VENV); echo "warning: could not create $(KSERVE_VENV); the KServe client tests will skip" >&2 )

kserve-venv: $(KSERVE_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

## Start the embedded stack (etcd, xds_control, manager_api, ingress Envoy) with the demo application.
run: $(STAMP)
	$(VENV)/bin/hydro up --demo

## Regenerate the Open Inference Protocol Python code, type stubs and descriptor set (read by the ingress's
## gRPC field extraction) from protos/*.proto.
protos: $(DEV_STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=. \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=. \
		--descriptor_set_out=protos/inference_descriptor.pb \
		protos/inference.proto

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(DEV_STAMP)
	$(VENV)/bin/mypy

## Lint, type check and the whole test suite (unit, integration with real etcd/Envoy/runtimes, end-to-end).
test: $(DEV_STAMP) $(KSERVE_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=20

## Load generators for benchmarks/ (Debian packages): h2load for gRPC/HTTP2, wrk for HTTP/1.1; and MLServer.
bench-deps: $(DEV_STAMP) $(MLSERVER_STAMP)
	command -v h2load >/dev/null && command -v wrk >/dev/null || \
		( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client wrk )

## MLServer, the peer of benchmarks/runtime_vs_mlserver.py, in a venv of its own: it pins fastapi, pydantic and
## protobuf versions that .venv must not get.
$(MLSERVER_STAMP):
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MLSERVER_VENV)/bin/python -m pip install --quiet mlserver==1.7.1 mlserver-sklearn==1.7.1
	touch $@

bench: bench-deps
	$(PY) benchmarks/mesh_overhead.py

clean:
	rm -rf $(VENV) $(KSERVE_VENV) $(MLSERVER_VENV) build *.egg-info .mypy_cache .ruff_cache
