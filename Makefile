# Herald. `make test` is the one command that checks everything (see README.md).
#
#   make build     release build: target/release/herald
#   make run       build and run with defaults (MQTT on 0.0.0.0:1883); flags: make run ARGS='--listen 127.0.0.1:1884'
#   make test      install missing tools (scripts/deps.sh), build, cargo test, interop suite
#   make deps      only the tool check/install
#   make unit      only cargo test
#   make interop   only the interop suite (interop/run.sh) against a fresh release build
#   make bench     benchmarks (scripts/bench.sh)
#   make cluster   release build, then a 3-node cluster on loopback with a private Redis until
#                  Ctrl-C (scripts/cluster.sh); flags: make cluster ARGS='--for 30'
#   make fuzz      cargo-fuzz targets in fuzz/ (codec_decode, codec_roundtrip, session), each
#                  for FUZZ_SECONDS (default 60), one at a time under nice -n 19; needs the
#                  nightly toolchain, installs cargo-fuzz if missing (scripts/fuzz.sh). Not
#                  part of `make test` or CI. Crashes: fuzz/artifacts/<target>/

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
HERALD := target/release/herald
ARGS ?=
FUZZ_SECONDS ?= 60
export PYTHON CARGO

.PHONY: build run test deps unit interop bench cluster fuzz

build:
	$(CARGO) build --release

run:
	$(CARGO) run --release -- $(ARGS)

test: deps build
	HERALD=$(HERALD) bash scripts/test.sh

deps:
	bash scripts/deps.sh

unit:
	$(CARGO) test --no-fail-fast

interop: deps build
	bash interop/run.sh $(HERALD)

bench: build
	bash scripts/bench.sh $(ARGS)

cluster: build
	bash scripts/cluster.sh $(ARGS)

fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash scripts/fuzz.sh
