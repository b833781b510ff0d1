# kvferry — the two commands are `make run` and `make test`.
SHELL := /bin/bash
export PATH := $(CURDIR)/.bin:/usr/local/go/bin:$(PATH)
export CGO_CFLAGS := -Wno-deprecated-declarations

GO ?= go
BIN := $(CURDIR)/bin
TOOLS := $(CURDIR)/.bin

# Pinned code generators: regenerated code must match the committed code byte
# for byte, so every machine uses these exact versions.
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.0
BUF_VERSION := v1.75.0

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS := -X github.com/kvferry/kvferry/pkg/buildinfo.Version=$(VERSION) -X github.com/kvferry/kvferry/pkg/buildinfo.Commit=$(COMMIT)

# make run: the synthetic engine with modest GPU-like timings.
RUN_MODEL ?= tiny
RUN_PREFILL_TOKENS_PER_SECOND ?= 20000
RUN_DECODE_STEP_TIME ?= 20ms
RUN_ENGINE ?= synthetic
RUN_MODEL_PATH ?=
# RUN_AGGREGATED=N: no context server; N generation servers that prefill too.
RUN_AGGREGATED ?= 0

SEEDS ?= 100000

# The llama.cpp libraries (make deps-llama); tests and make run read them
# from here through KVFERRY_LLAMA_LIB_DIR.
LLAMA_LIB_DIR ?= $(CURDIR)/.llama/lib
export KVFERRY_LLAMA_LIB_DIR ?= $(LLAMA_LIB_DIR)

# TAGS=ucx builds the ucx transport in (needs libucx-dev: make deps-ucx).
TAGS ?=

.PHONY: bench-prefix deps-llama-cuda gpu-check bench-serve certs all build run deps-llama bench-engine fuzz test test-unit test-e2e sim bench-router bench-transfer deps-ucx test-ucx chaos-ucx verify chaos proto proto-check lint vet fmt-check tools deps clean

all: build

build:
	mkdir -p $(BIN)
	$(GO) build -tags "$(TAGS)" -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/...

# certs writes a dev CA and one certificate per role (URI SAN
# spiffe://TRUST_DOMAIN/kvferry/ROLE) into CERTS_DIR for mTLS runs.
CERTS_DIR ?= certs
TRUST_DOMAIN ?= kvferry.local
certs:
	$(GO) run ./cmd/kvcerts --out $(CERTS_DIR) --trust-domain $(TRUST_DOMAIN)

# make run RUN_ENGINE=llamacpp RUN_MODEL_PATH=FILE.gguf serves a real model
# (installing the llama.cpp libraries first when they are missing).
run: build $(if $(filter llamacpp,$(RUN_ENGINE)),deps-llama)
	@KVFERRY_AGGREGATED=$(RUN_AGGREGATED) scripts/run-local.sh $(BIN) $(RUN_MODEL) $(RUN_PREFILL_TOKENS_PER_SECOND) $(RUN_DECODE_STEP_TIME) $(RUN_ENGINE) $(RUN_MODEL_PATH)

# make test runs every test: the unit tests of every package and the
# multi-process end-to-end suite, all under the race detector, then the
# Helm chart's checks (test/chart: render and check, one goroutine; under
# -race it only compiles Helm and Prometheus twice as long), the
# transfer-lifecycle simulation over 2,000 seeds and the scheduler
# simulation over 1,000 without it (each is one goroutine; -race only
# slows them).
test: deps-llama
	$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v /test/chart)
	$(GO) test -count=1 ./test/chart/
	$(GO) test -count=1 -run TestSimulation ./pkg/kvtransfer/ -seeds 2000
	$(GO) test -count=1 -run TestSchedulerSimulation ./pkg/sched/ -sched-seeds 1000

test-unit: deps-llama
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /test/)

test-e2e: deps-llama
	$(GO) test -race -count=1 -v ./test/e2e/...

# sim runs the deterministic transfer-lifecycle and scheduler simulations
# over SEEDS seeds each (make test runs 2,000 and 1,000). A failure prints the seed and the replay command.
sim:
	$(GO) test -count=1 -timeout 60m -run TestSimulation -v ./pkg/kvtransfer/ -seeds $(SEEDS)
	$(GO) test -count=1 -timeout 60m -run TestSchedulerSimulation -v ./pkg/sched/ -sched-seeds $(SEEDS)

# chaos: every chaos scenario at full size, on tcp then shm (make test runs
# the short gate on both).
chaos:
	$(GO) test -count=1 -timeout 20m -v -run TestChaos ./test/chaos/ -chaos.full

# chaos-ucx: the full gate on the ucx transport (binaries built with -tags
# ucx, UCX over shared memory).
chaos-ucx: deps-ucx
	UCX_TLS=posix,cma $(GO) test -tags ucx -count=1 -timeout 20m -v -run TestChaos ./test/chaos/ -chaos.full -chaos.transports=ucx

# verify: spin, exhaustively, on the transfer-lifecycle model (verify/).
verify:
	scripts/verify.sh

# bench-router: router overhead against calling the servers directly, same
# run, concurrency 1 and 64 (p50 / p99 latency, requests/s), on an instant
# engine and on make run's timing, beside the floor of any gRPC relay.
bench-router:
	$(GO) test -run xxx -bench 'RouterOverhead|GRPCHopFloor' -benchtime 2000x -count 3 ./test/bench/

# bench-prefix: prefix-cache routing measured — three context servers,
# kvload with several shared system prompts, the default chain against
# precise-prefix: reuse rate (kvferry_prefix_blocks_total) and TTFT.
bench-prefix: build
	scripts/bench-prefix.sh $(BIN) $(BENCH_SERVE_OUT)/prefix

# bench-transfer: a 512 MiB KV (llama3-8b, 4,096 tokens) between two
# processes on each transport, beside its same-run baseline (ucx over
# shared memory and over tcp, against ucx_perftest).
bench-transfer: deps-ucx
	$(GO) build -tags ucx -o .bin/bench-transfer ./test/bench/transfer
	.bin/bench-transfer -runs 5
	UCX_TLS=posix,cma .bin/bench-transfer -runs 5 -backends ucx
	UCX_TLS=tcp UCX_NET_DEVICES=lo .bin/bench-transfer -runs 5 -backends ucx

# bench-serve: kvload (cmd/kvload) against make run's stack, synthetic
# engine with GPU-like timing and, when present, the llama.cpp engine with
# the test model: TTFT, inter-token latency and throughput at concurrency
# 1 to 64, charts and results.json under BENCH_SERVE_OUT.
BENCH_SERVE_OUT ?= docs/bench
BENCH_MODEL ?= ../shared/models/stories260K.gguf
bench-serve: build deps-llama
	scripts/bench-serve.sh $(BIN) $(BENCH_SERVE_OUT) $(BENCH_MODEL)

# bench-engine: the test model through the whole stack against the same
# model driven in-process through yzma (the limit), same run: prefill
# tokens/s, TTFT, decode tokens/s.
bench-engine: deps-llama
	$(GO) test -run xxx -bench LlamaEngine -benchtime 20x -count 3 ./test/bench/

# fuzz runs every fuzz target for FUZZTIME each (a duration, or Nx inputs;
# CI: 10000x, since a duration can fail on Go's deadline race); their seed
# corpora (testdata/fuzz) also run as plain tests in make test.
FUZZTIME ?= 10s
FUZZ_TARGETS := ./pkg/executor:FuzzStateDecode ./pkg/router:FuzzBearer ./pkg/router:FuzzCompletionRequest \
	./pkg/router:FuzzChatRequest ./pkg/router:FuzzStopper ./pkg/kvtransfer:FuzzDecodeHeader \
	./pkg/kvtransfer/tcp:FuzzTCPFrames ./pkg/kvtransfer:FuzzLinkFrames ./pkg/kvtransfer:FuzzWriterFrames \
	./pkg/kvtransfer/ucx:FuzzUCXEndpoint ./pkg/ctxserver:FuzzPrefillRequest ./pkg/ctxserver:FuzzTransferRequest \
	./pkg/genserver:FuzzGenerateRequest ./pkg/router:FuzzRouterGenerateRequest ./pkg/gguf:FuzzReadMetadata \
	./pkg/grammar:FuzzSchema
fuzz:
	@set -e; log=$$(mktemp); for t in $(FUZZ_TARGETS); do \
	  echo "fuzz $${t#*:} ($(FUZZTIME))"; \
	  $(GO) test -run xxx -fuzz "^$${t#*:}$$" -fuzztime $(FUZZTIME) $${t%%:*} >$$log 2>&1 || \
	    { tail -n 40 $$log; echo "(a found input, if any, is saved under $${t%%:*}/testdata/fuzz/$${t#*:}/)"; rm -f $$log; exit 1; }; \
	done; rm -f $$log

# deps-llama installs the llama.cpp shared libraries (npm package, pinned
# integrity) into $(LLAMA_LIB_DIR); the llamacpp engine and its tests load
# them from there.
deps-llama:
	@scripts/deps-llama.sh $(LLAMA_LIB_DIR)

# deps-llama-cuda: llama.cpp with the CUDA backend, built from the source of
# the CPU libraries (scripts/deps-llama-cuda.sh) into LLAMA_CUDA_LIB_DIR,
# where a CUDA toolkit exists; elsewhere it fetches the source only (build
# it on the GPU machine with the script's build step). Servers use it with
# --llama-lib-dir=$(LLAMA_CUDA_LIB_DIR).
LLAMA_CUDA_SRC ?= .llama/cuda-src.tar.xz
LLAMA_CUDA_LIB_DIR ?= .llama/lib-cuda
LLAMA_CUDA_SM ?= 90
deps-llama-cuda: deps-llama
	@scripts/deps-llama-cuda.sh source $(LLAMA_CUDA_SRC)
	@if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then \
	  KVFERRY_LLAMA_LIB_DIR=$(LLAMA_LIB_DIR) scripts/deps-llama-cuda.sh build $(LLAMA_CUDA_SRC) $(LLAMA_CUDA_LIB_DIR) $(LLAMA_CUDA_SM); \
	else echo "deps-llama-cuda: no CUDA toolkit here; on a GPU machine: scripts/deps-llama-cuda.sh build $(LLAMA_CUDA_SRC) DIR"; fi

# gpu-check: on a GPU machine, the engine on CPU and GPU in every pairing,
# outputs compared, then kvload at 1, 8, 32, 64 (scripts/gpu-check.sh).
gpu-check: build deps-llama-cuda
	scripts/gpu-check.sh $(BIN) $(BENCH_MODEL) $(LLAMA_LIB_DIR) $(LLAMA_CUDA_LIB_DIR) docs/bench/gpu

# deps-ucx installs UCX (headers, libraries, ucx_perftest) when missing.
deps-ucx:
	@test -f /usr/include/ucp/api/ucp.h && command -v ucx_perftest >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libucx-dev ucx-utils; }

# test-ucx: vet with the ucx tag, then the transport conformance suite (ucx
# rows over posix,cma and tcp beside tcp and shm) and the ucx end-to-end
# test on real processes, under the race detector.
test-ucx: deps-ucx
	$(GO) vet -tags ucx ./...
	$(GO) test -race -tags ucx -count=1 -timeout 15m -run 'Conformance|Shm|UCX' ./pkg/kvtransfer/... ./test/e2e/

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

deps:
	@command -v protoc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler; }

$(TOOLS)/protoc-gen-go:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)

$(TOOLS)/protoc-gen-go-grpc:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

$(TOOLS)/buf:
	GOBIN=$(TOOLS) $(GO) install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)

tools: $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc

proto: deps tools
	protoc -I proto \
	  --go_out=proto --go_opt=paths=source_relative \
	  --go-grpc_out=proto --go-grpc_opt=paths=source_relative \
	  proto/kvferry/v1/*.proto

# proto-check fails when regenerating changes the committed code.
proto-check: proto
	git diff --exit-code -- proto/

.bin/buf: $(TOOLS)/buf

lint: $(TOOLS)/buf
	$(TOOLS)/buf lint

clean:
	rm -rf $(BIN)
