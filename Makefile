# Herald. `make test` is the one command that checks everything (see README.md).
#
#   make build     release build: target/release/herald
#   make run       build and run with defaults (MQTT on 0.0.0.0:1883); flags: make run ARGS='--listen 127.0.0.1:1884'
#   make test      install missing tools (scripts/deps.sh), build, cargo test, interop suite
#   make deps      only the tool check/install
#   make unit      only cargo test
#   make interop   only the interop suite (interop/run.sh) against a fresh release build
#   make bench     benchmarks (scripts/bench.sh); one case: make bench ARGS='--only http' (the
#                  HTTP API against MQTT, memory and Redis store, about a minute; --quick: 20 s)
#   make cluster   release build, then a 3-node cluster on loopback with a private Redis until
#                  Ctrl-C (scripts/cluster.sh); flags: make cluster ARGS='--for 30'; a rolling
#                  restart (each node in turn: SIGTERM, exit, start again, ready) once it is up:
#                  make cluster ARGS='--rolling' (ends by itself with ARGS='--rolling --for 40')
#   make attack    release build, then the network attack suite (scripts/attack.py): hostile
#                  clients against a fresh Herald per case, memory and Redis stores, checking
#                  Herald's RSS, honest push latency and liveness; under 10 minutes. Flags:
#                  make attack ARGS='--quick' (or '--case slow-readers --store memory
#                  --json results.json'); another binary: make attack HERALD=path
#   make soak      soak test, not part of `make test` (scripts/soak.py): release build, then a private
#                  Redis and Herald, 15,000 persistent-session devices with churn and 500 QoS 1
#                  pushes/s for 10 min; checks no acknowledged message is lost, RSS stays flat, and
#                  fds and Redis go back to their baseline. make soak ARGS=--quick (2,000 devices,
#                  60 s); another binary: make soak HERALD=/path/to/herald; see scripts/soak.py --help
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

.PHONY: build run test deps unit interop bench cluster attack soak fuzz

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

attack: build
	$(PYTHON) scripts/attack.py --herald $(HERALD) $(ARGS)

soak: build
	$(PYTHON) scripts/soak.py --herald $(HERALD) $(ARGS)

fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash scripts/fuzz.sh
