#!/usr/bin/env bash
# make bench-prefix: prefix-cache routing measured. A router, three context
# servers and one generation server on localhost (synthetic engine, make
# run's timing: prefill 20,000 tokens/s, a decode step 20 ms), loaded by
# kvload with prompts that share a system prompt (--shared-prefix-words),
# once per routing chain: the default (prefix-affinity on the first block)
# and precise-prefix (the context servers' own cache digests). For each:
# kvload's TTFT and the router's kvferry_prefix_blocks_total, whose
# reused / requested is the reuse rate. Results under OUT/CHAIN/.
# Usage: bench-prefix.sh BIN_DIR OUT
set -euo pipefail
bin=$1 out=$2
pids=()
stop() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; pids=(); }
trap stop EXIT INT TERM
eng=(--model=tiny --prefill-tokens-per-second=20000 --decode-step-time=20ms)

run() {
  local name=$1 routing=$2 logs
  logs=$(mktemp -d -t kvferry-bench-prefix-XXXXXX)
  local ctxs=()
  for i in 0 1 2; do
    local p=$((9300 + 10 * i))
    "$bin/ctxserver" "${eng[@]}" --pool-blocks="${CTX_POOL_BLOCKS:-384}" --grpc-addr=127.0.0.1:$p --http-addr=127.0.0.1:$((p + 1)) >"$logs/ctx-$i.log" 2>&1 & pids+=($!)
    ctxs+=("127.0.0.1:$p")
  done
  "$bin/genserver" "${eng[@]}" --pool-blocks=8192 --grpc-addr=127.0.0.1:9400 --http-addr=127.0.0.1:9401 --data-addr=127.0.0.1:9402 >"$logs/gen.log" 2>&1 & pids+=($!)
  "$bin/router" --model=tiny --http-addr=127.0.0.1:8100 --grpc-addr=127.0.0.1:8101 --admin-addr=127.0.0.1:8102 \
    --ctx-servers="$(IFS=,; echo "${ctxs[*]}")" --gen-servers=127.0.0.1:9400 --routing="$routing" >"$logs/router.log" 2>&1 & pids+=($!)
  for _ in $(seq 1 300); do
    curl -fsS http://127.0.0.1:8102/readyz >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$bin/kvload" --url http://127.0.0.1:8100/v1 --model tiny --concurrency 16 --requests 400 --max-tokens 8 \
    --prompt-words fixed:48 --shared-prefix-words 160 --shared-prefixes "${SHARED_PREFIXES:-6}" --out "$out/$name" >"$logs/kvload.log" 2>&1
  curl -fsS http://127.0.0.1:8102/metrics | grep '^kvferry_prefix_blocks_total' >"$out/$name/prefix-blocks.txt"
  stop
  local req reused ttft
  req=$(sed -n 's/.*kind="requested"} //p' "$out/$name/prefix-blocks.txt")
  reused=$(sed -n 's/.*kind="reused"} //p' "$out/$name/prefix-blocks.txt")
  ttft=$(grep -A2 '"ttft_ms"' "$out/$name/results.json" | tr -d ' \n' | sed 's/.*"p50":\([0-9.]*\),"p90":\([0-9.]*\).*/p50 \1 ms, p90 \2 ms/')
  printf '%-8s reused %s of %s blocks (%s%%), TTFT %s\n' "$name" "$reused" "$req" "$(( 100 * ${reused%.*} / ${req%.*} ))" "$ttft"
}

mkdir -p "$out"
run default "ready,least-inflight:1,prefix-affinity:0.5,max-score"
run precise "ready,least-inflight:1,precise-prefix:4,max-score"
