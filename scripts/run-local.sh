#!/usr/bin/env bash
# Starts router + one ctxserver + one genserver on localhost (make run) and
# stops all three on Ctrl-C.
# Usage: run-local.sh BIN_DIR MODEL PREFILL_TPS DECODE_STEP [ENGINE MODEL_PATH]
# ENGINE=llamacpp serves the GGUF file MODEL_PATH (libraries from
# KVFERRY_LLAMA_LIB_DIR, which make run sets). KVFERRY_AGGREGATED=N (N ≥ 1)
# starts no ctxserver but N genservers that prefill too (router and
# genservers --aggregated; the i-th on ports 9200+10i..9202+10i), the
# baseline disaggregation is measured against: N=2 runs as many engines as
# the disaggregated pair.
set -euo pipefail
bin=$1 model=$2 tps=$3 step=$4 engine=${5:-synthetic} model_path=${6:-}
aggregated=${KVFERRY_AGGREGATED:-0}
case $aggregated in
  '' | *[!0-9]*) echo "RUN_AGGREGATED / KVFERRY_AGGREGATED must be a number of generation servers, got '$aggregated'" >&2; exit 2 ;;
esac
logs=${KVFERRY_RUN_LOGS:-$(mktemp -d -t kvferry-run-XXXXXX)}
pids=()
# The servers run in their own sessions (setsid), so a Ctrl-C on the
# terminal reaches this script only: it stops them one way, gracefully
# (SIGTERM: drain, release every block), instead of racing the signal.
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping kvferry (${#pids[@]} processes)..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  local bad=0
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || bad=1; done
  if [ "$bad" = 0 ]; then
    echo "kvferry stopped cleanly; logs in $logs"
    exit 0
  fi
  echo "kvferry stopped, but a process exited with an error; see $logs" >&2
  exit 1
}
trap stop INT TERM EXIT

srv_eng=()
if [ "$engine" = llamacpp ]; then
  [ -f "$model_path" ] || { echo "make run RUN_ENGINE=llamacpp needs RUN_MODEL_PATH=FILE.gguf (got '$model_path')" >&2; exit 1; }
  eng=(--engine=llamacpp --model-path="$model_path")
  # The two servers share this host: each gets half its CPUs (llama.cpp's
  # threads spin, and oversubscribed they slow each other down severalfold).
  threads=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
  [ "$aggregated" -gt 0 ] && threads=$(( $(nproc) / aggregated > 0 ? $(nproc) / aggregated : 1 ))
  srv_eng=(--llama-threads="${KVFERRY_LLAMA_THREADS:-$threads}")
  model=$(basename "$model_path" .gguf)
  prompt="Once upon a time"
else
  eng=(--model="$model")
  prompt="the quiet river carries light"
fi
# Every port on loopback: make run is for this machine only.
router_listen=(--http-addr=127.0.0.1:8000 --grpc-addr=127.0.0.1:8001 --admin-addr=127.0.0.1:8002)
common=("${eng[@]}" "${srv_eng[@]}" --prefill-tokens-per-second="$tps" --decode-step-time="$step")
if [ "$aggregated" -gt 0 ]; then
  gens=()
  for i in $(seq 0 $((aggregated - 1))); do
    port=$((9200 + 10 * i))
    setsid "$bin/genserver" "${common[@]}" --aggregated --grpc-addr="127.0.0.1:$port" --http-addr="127.0.0.1:$((port + 1))" \
      --data-addr="127.0.0.1:$((port + 2))" >"$logs/genserver-$i.log" 2>&1 & pids+=($!)
    gens+=("127.0.0.1:$port")
  done
  servers="genserver ${gens[*]} (aggregated: each prefills too)"
  setsid "$bin/router" "${eng[@]}" "${router_listen[@]}" --aggregated --gen-servers="$(IFS=,; echo "${gens[*]}")" >"$logs/router.log" 2>&1 & pids+=($!)
else
  servers="ctxserver :9100; genserver :9200"
  setsid "$bin/ctxserver" "${common[@]}" --grpc-addr=127.0.0.1:9100 --http-addr=127.0.0.1:9101 --data-addr=127.0.0.1:9102 >"$logs/ctxserver.log" 2>&1 & pids+=($!)
  setsid "$bin/genserver" "${common[@]}" --grpc-addr=127.0.0.1:9200 --http-addr=127.0.0.1:9201 --data-addr=127.0.0.1:9202 >"$logs/genserver.log" 2>&1 & pids+=($!)
  setsid "$bin/router" "${eng[@]}" "${router_listen[@]}" >"$logs/router.log" 2>&1 & pids+=($!)
fi

for _ in $(seq 1 300); do
  if curl -fsS http://127.0.0.1:8002/readyz >/dev/null 2>&1; then
    cat <<MSG
kvferry is ready: router :8000 (OpenAI) :8001 (gRPC) :8002 (admin); $servers
logs: $logs

  curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model":"$model","prompt":"$prompt","max_tokens":16}'

Ctrl-C stops them all.
MSG
    wait -n "${pids[@]}" || true
    trap - EXIT
    echo "a kvferry process exited on its own; see $logs" >&2
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    exit 1
  fi
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "a kvferry process failed to start; see $logs" >&2; tail -n 5 "$logs"/*.log >&2; exit 1; }
  done
  sleep 0.1
done
echo "kvferry did not become ready within 30s; see $logs" >&2
exit 1
