#!/usr/bin/env bash
# gpu-check: the llama.cpp engine on a GPU, checked and measured. On a
# machine with an NVIDIA GPU, given the binaries (make build), the test
# model, the CPU libraries (make deps-llama) and the CUDA ones (make
# deps-llama-cuda), it starts router + context + generation server four
# times — CPU↔CPU, GPU↔GPU, GPU context → CPU generation, CPU context → GPU
# generation — sends the same greedy prompts to each and prints one result
# line per pair: every output must equal the CPU↔CPU one (which make test
# proves equal to the in-process reference). Then kvload measures GPU↔GPU
# and CPU↔CPU at concurrency 1, 8, 32 and 64 into OUT.
#
# Usage: gpu-check.sh BIN_DIR MODEL.gguf CPU_LIB_DIR CUDA_LIB_DIR OUT [DURATION]
set -euo pipefail
bin=$1 model=$2 cpu=$3 cuda=$4 out=$5 dur=${6:-15s}
mkdir -p "$out"
name=$(basename "$model" .gguf)
threads=$(( $(nproc) / 4 > 0 ? $(nproc) / 4 : 1 )) # each server's CPU share (kvload and the router need some)
pids=()
stop() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap stop EXIT INT TERM

# up CTX_LIBS GEN_LIBS LOGDIR: the stack on the default ports, ready.
up() {
  local common=(--engine=llamacpp --model-path="$model" --llama-slots=64 --llama-threads="$threads")
  mkdir -p "$3"
  # A library's own dependencies (libggml-cuda.so beside libggml.so) are
  # found through the loader's path.
  LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$bin/ctxserver" "${common[@]}" --llama-lib-dir="$1" >"$3/ctxserver.log" 2>&1 & pids+=($!)
  LD_LIBRARY_PATH="$2${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$bin/genserver" "${common[@]}" --llama-lib-dir="$2" >"$3/genserver.log" 2>&1 & pids+=($!)
  "$bin/router" --engine=llamacpp --model-path="$model" --llama-lib-dir="$cpu" >"$3/router.log" 2>&1 & pids+=($!)
  for _ in $(seq 1 600); do
    curl -fsS http://127.0.0.1:8002/readyz >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "stack not ready; logs in $3" >&2
  tail -n 5 "$3"/*.log >&2
  return 1
}

prompts=("Once upon a time" "The little dog" "Lily and Ben went to the park" "One day, a big bird" "Tom had a red ball")

# outputs FILE: the greedy completion of every prompt, one per line.
outputs() {
  : >"$1"
  for p in "${prompts[@]}"; do
    curl -fsS http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
      -d "{\"model\":\"$name\",\"prompt\":\"$p\",\"max_tokens\":48,\"temperature\":0}" |
      sed -E 's/.*"text":"(([^"\\]|\\.)*)".*/\1/' >>"$1"
  done
}

# devices LOGDIR: what each server's engine runs on, from its start log,
# and which GPUs NVML says it computes on (kvferry_gpu_engine).
devices() {
  local port=(9101 9201) i=0
  for s in ctxserver genserver; do
    printf '%s: %s; NVML: %s\n' "$s" "$(grep -o '"devices":\[[^]]*\]' "$1/$s.log" | head -n 1)" \
      "$(curl -fsS "http://127.0.0.1:${port[$i]}/metrics" | grep '^kvferry_gpu_engine' | tr '\n' ' ')"
    i=$((i + 1))
  done
}

fail=0
check() { # NAME CTX_LIBS GEN_LIBS [REFERENCE]
  up "$2" "$3" "$out/$1"
  outputs "$out/$1/outputs.txt"
  devices "$out/$1" >"$out/$1/devices.txt"
  stop
  if [ -z "${4:-}" ]; then
    echo "$1: reference taken ($(wc -l <"$out/$1/outputs.txt") prompts)"
  elif cmp -s "$out/$4/outputs.txt" "$out/$1/outputs.txt"; then
    echo "$1: ok, every output equals $4's"
  else
    echo "$1: FAILED, outputs differ from $4's:"; diff "$out/$4/outputs.txt" "$out/$1/outputs.txt" || true
    fail=1
  fi
}
# A pair decodes on its generation server's device: KV computed on the
# other device must continue exactly as KV computed on that one. (CPU and
# GPU kernels themselves round differently: their greedy texts may part
# after some tokens; the H200 run recorded in BENCHMARKS.md saw 1 of 5.)
check cpu-cpu "$cpu" "$cpu"
check gpu-gpu "$cuda" "$cuda"
check gpu-cpu "$cuda" "$cpu" cpu-cpu
check cpu-gpu "$cpu" "$cuda" gpu-gpu
if cmp -s "$out/cpu-cpu/outputs.txt" "$out/gpu-gpu/outputs.txt"; then
  echo "gpu-gpu: its texts equal cpu-cpu's as well"
else
  echo "gpu-gpu: its texts differ from cpu-cpu's (CPU and GPU arithmetic):"; diff "$out/cpu-cpu/outputs.txt" "$out/gpu-gpu/outputs.txt" || true
fi
cat "$out"/gpu-gpu/devices.txt

bench() { # NAME CTX_LIBS GEN_LIBS
  up "$2" "$3" "$out/bench-$1"
  "$bin/kvload" --url http://127.0.0.1:8000/v1 --model "$name" --concurrency 1,8,32,64 --prompt-words uniform:16:128 \
    --max-tokens 64 --ignore-eos --duration "$dur" --requests 4096 --label "kvferry $1" --out "$out/bench-$1"
  # How many sequences each decode step and prompts each prefill step ran.
  curl -fsS http://127.0.0.1:9201/metrics | grep -E '^kvferry_scheduler_batch_sequences_(sum|count)' >"$out/bench-$1/batches.txt" || true
  curl -fsS http://127.0.0.1:9101/metrics | grep -E '^kvferry_scheduler_prefill_batch_(prompts|tokens)_(sum|count)' >>"$out/bench-$1/batches.txt" || true
  cat "$out/bench-$1/batches.txt"
  stop
}
bench gpu-gpu "$cuda" "$cuda"
bench cpu-cpu "$cpu" "$cpu"
exit $fail
