#!/usr/bin/env bash
# make bench-serve: kvload against make run's stack (router, one context
# server, one generation server on localhost), first on the synthetic
# engine with make run's GPU-like timing (a decode step of 20 ms whatever
# the batch), then on the llama.cpp engine with the test model when it
# and the libraries are present. Results, charts and a table go to OUT
# (docs/bench by default): OUT/ENGINE/results.json and *.png. Each engine
# runs twice, disaggregated (make run: one context and one generation
# server) and aggregated (RUN_AGGREGATED=2: two generation servers that each
# prefill and decode — as many engines — no context server, no transfer),
# and OUT/ENGINE-vs-aggregated/ draws the two side by side.
# Usage: bench-serve.sh BIN_DIR OUT MODEL_PATH
set -euo pipefail
bin=$1 out=$2 model_path=${3:-}
pid=
stop() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=; }
trap stop EXIT INT TERM

# up ENGINE ARGS...: start make run's stack in the background, wait for ready.
# KVFERRY_AGGREGATED=N in the environment starts the aggregated stack.
up() {
  local logs
  logs=$(mktemp -d -t kvferry-bench-serve-XXXXXX)
  KVFERRY_RUN_LOGS=$logs scripts/run-local.sh "$bin" "$@" >"$logs/run.out" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    curl -fsS http://127.0.0.1:8002/readyz >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$logs/run.out" >&2; return 1; }
    sleep 0.1
  done
  echo "stack not ready; logs in $logs" >&2
  return 1
}

# load NAME MODEL LEVELS ARGS...: one kvload run into OUT/NAME; goodput
# counts the requests that never waited 100 ms for their next token.
load() {
  local name=$1 model=$2 levels=$3
  shift 3
  "$bin/kvload" --url http://127.0.0.1:8000/v1 --model "$model" --concurrency "$levels" \
    --prompt-words uniform:64:512 --ignore-eos --slo-itl-max 100ms --label "kvferry $name" --out "$out/$name" "$@"
}

mkdir -p "$out"
# both NAME MODEL LEVELS UP_ARGS -- LOAD_ARGS: NAME disaggregated, then
# NAME-aggregated, then the comparison.
both() {
  local name=$1 model=$2 levels=$3 upargs=() loadargs=()
  shift 3
  while [ $# -gt 0 ] && [ "$1" != -- ]; do upargs+=("$1"); shift; done
  shift
  loadargs=("$@")
  up "${upargs[@]}"
  load "$name" "$model" "$levels" "${loadargs[@]}"
  stop
  KVFERRY_AGGREGATED=2 up "${upargs[@]}"
  load "$name-aggregated" "$model" "$levels" "${loadargs[@]}"
  stop
  "$bin/kvload" compare "$out/$name/results.json" "$out/$name-aggregated/results.json" --out "$out/$name-vs-aggregated"
}

echo "== synthetic engine (tiny), GPU-like timing: prefill 20,000 tokens/s, 20 ms a decode step"
both synthetic tiny 1,8,32,64 tiny 20000 20ms -- --max-tokens 64 --duration 20s --requests 512

if [ -n "$model_path" ] && [ -f "$model_path" ] && [ -f "${KVFERRY_LLAMA_LIB_DIR:-.llama/lib}/libllama.so" ]; then
  echo "== llama.cpp engine ($(basename "$model_path"), CPU)"
  both llamacpp "$(basename "$model_path" .gguf)" 1,8,32 tiny 0 0 llamacpp "$model_path" -- \
    --max-tokens 64 --duration 15s --requests 256 --prompt-words uniform:16:128
else
  echo "== llama.cpp engine: skipped (no model at '$model_path' or no libraries: make deps-llama)"
fi
