#!/usr/bin/env bash
# Smoke test of the README's two steps: make run, then the README's curl
# must return generated text; Ctrl-C (SIGINT) must stop all three cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
logs=$(mktemp -d -t kvferry-smoke-XXXXXX)
# A background job of a script starts with SIGINT ignored (and a shell
# cannot trap what it inherited ignored); a terminal's Ctrl-C finds it at
# its default. env --default-signal=INT gives make run the terminal's.
KVFERRY_RUN_LOGS=$logs setsid env --default-signal=INT make run >"$logs/make-run.out" 2>&1 &
runner=$!
cleanup() { kill -INT -- "-$runner" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 600); do
  grep -q 'kvferry is ready' "$logs/make-run.out" 2>/dev/null && break
  kill -0 "$runner" 2>/dev/null || { cat "$logs/make-run.out"; exit 1; }
  sleep 0.2
done
grep -q 'kvferry is ready' "$logs/make-run.out" || { echo "make run never became ready"; cat "$logs/make-run.out"; exit 1; }
out=$(curl -fsS http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
  -d '{"model":"tiny","prompt":"the quiet river carries light","max_tokens":16}')
echo "$out"
text=$(printf '%s' "$out" | sed -n 's/.*"text":"\([^"]*\)".*/\1/p')
[ -n "$text" ] || { echo "no generated text in the response"; exit 1; }
kill -INT -- "-$runner"
trap - EXIT
for _ in $(seq 1 150); do kill -0 "$runner" 2>/dev/null || break; sleep 0.2; done
if kill -0 "$runner" 2>/dev/null; then echo "make run did not stop on Ctrl-C"; exit 1; fi
for c in ctxserver genserver router; do
  grep -q '"msg":"stopped"' "$logs/$c.log" || { echo "$c did not stop cleanly"; tail -n 5 "$logs/$c.log"; exit 1; }
done
grep -q 'kvferry stopped cleanly' "$logs/make-run.out" || { echo "make run did not say it stopped cleanly"; tail -n 5 "$logs/make-run.out"; exit 1; }
echo "smoke: ok (text: $text)"
